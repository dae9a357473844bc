//! The in-flight table: every delivery taken from the current channel, in delivery-tag order,
//! until it is settled and acked. Entities confirm out of order, but the broker is acked with
//! `multiple` only up to the end of a contiguous settled prefix, so no delivery is ever acked
//! before its own entity confirmed it.
//!
//! Deliveries of a channel that died, and deliveries nacked back at their deadline while their
//! message is still with the entities, become *orphans*: never acked again, but counted toward
//! the in-flight bound until their outcome arrives (the controller reports on every message it
//! took), because their messages still occupy memory there. A stuck entity therefore stops the
//! bridge from taking more instead of letting redelivered copies pile up behind it.
//!
//! Sans-IO: the held value `T` (the acker and what dead-lettering needs) is opaque here.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

/// The bridge's name for one delivery; unique for the life of the bridge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeliveryKey(pub u64);

/// How a delivery ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Processed; to be acked.
    Acked,
    /// Copied to the dead-letter queue; to be acked.
    DeadLettered,
    /// Already nacked back to the queue; nothing more to send.
    Requeued,
}

impl Settlement {
    /// True when the broker still has to be told with an ack.
    pub fn needs_ack(self) -> bool {
        matches!(self, Settlement::Acked | Settlement::DeadLettered)
    }
}

/// One delivery on the current channel.
#[derive(Debug)]
pub struct Entry<T> {
    /// Its key.
    pub key: DeliveryKey,
    /// When it was received.
    pub received_at: Instant,
    /// When it is nacked back to the queue if still unsettled.
    pub deadline: Instant,
    /// `None` while its entity is still working on it.
    pub settlement: Option<Settlement>,
    /// Being dead-lettered: its deadline no longer applies (the publish has its own timeout).
    settling: bool,
    /// The driver's data (acker, body, …).
    pub held: T,
}

/// What [`InFlight::settle`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// A pending delivery of the current channel; it now waits to be acked.
    Current,
    /// An orphan of a lost channel; it is gone now.
    Orphan,
    /// Unknown or already settled (e.g. requeued at its deadline); nothing changed.
    Ignored,
}

/// Deliveries taken and not yet finished.
#[derive(Debug)]
pub struct InFlight<T> {
    entries: VecDeque<Entry<T>>,
    orphans: HashSet<DeliveryKey>,
    next_key: u64,
    deadline_after: Duration,
}

impl<T> InFlight<T> {
    /// An empty table whose deliveries must settle within `deadline_after`.
    pub fn new(deadline_after: Duration) -> Self {
        InFlight {
            entries: VecDeque::new(),
            orphans: HashSet::new(),
            next_key: 0,
            deadline_after,
        }
    }

    /// Deliveries counted against the in-flight bound, orphans included.
    pub fn len(&self) -> usize {
        self.entries.len() + self.orphans.len()
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records a delivery of the current channel; deliveries must come in tag order.
    pub fn insert(&mut self, held: T, now: Instant) -> DeliveryKey {
        let key = DeliveryKey(self.next_key);
        self.next_key += 1;
        self.entries.push_back(Entry {
            key,
            received_at: now,
            deadline: now + self.deadline_after,
            settlement: None,
            settling: false,
            held,
        });
        key
    }

    /// The held data of a current delivery that is still unsettled.
    pub fn pending(&self, key: DeliveryKey) -> Option<&T> {
        self.entry(key)
            .filter(|e| e.settlement.is_none())
            .map(|e| &e.held)
    }

    /// Exempts a pending delivery from its deadline while it is being dead-lettered.
    pub fn mark_settling(&mut self, key: DeliveryKey) {
        if let Some(entry) = self.entry_mut(key) {
            entry.settling = true;
        }
    }

    /// Marks a delivery settled.
    pub fn settle(&mut self, key: DeliveryKey, settlement: Settlement) -> Settled {
        if self.orphans.remove(&key) {
            return Settled::Orphan;
        }
        match self.entry_mut(key) {
            Some(entry) if entry.settlement.is_none() => {
                entry.settlement = Some(settlement);
                Settled::Current
            }
            _ => Settled::Ignored,
        }
    }

    /// Moves the contiguous settled prefix into `out`, oldest first. The driver acks once,
    /// with `multiple`, up to the last entry that needs an ack.
    pub fn pop_settled(&mut self, out: &mut Vec<Entry<T>>) {
        while self.entries.front().is_some_and(|e| e.settlement.is_some()) {
            if let Some(entry) = self.entries.pop_front() {
                out.push(entry);
            }
        }
    }

    /// Puts the keys of current deliveries past their deadline into `out` (the driver nacks
    /// and settles them).
    pub fn expire(&self, now: Instant, out: &mut Vec<DeliveryKey>) {
        // Deliveries arrive in time order, so deadlines increase along the queue.
        for entry in self.entries.iter().take_while(|e| e.deadline <= now) {
            if entry.settlement.is_none() && !entry.settling {
                out.push(entry.key);
            }
        }
    }

    /// Settles a pending delivery as requeued (it was nacked) while its message is still being
    /// worked on: it stays counted, as an orphan, until [`Self::settle`] reports its outcome.
    /// Until it leaves the settled prefix it is counted twice, which only makes the bound
    /// stricter for that moment.
    pub fn requeue_held(&mut self, key: DeliveryKey) {
        if self.settle(key, Settlement::Requeued) == Settled::Current {
            self.orphans.insert(key);
        }
    }

    /// The earliest deadline of anything unsettled.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries
            .iter()
            .find(|e| e.settlement.is_none() && !e.settling)
            .map(|e| e.deadline)
    }

    /// The channel was lost: the broker requeued all its deliveries. Settled ones are dropped;
    /// unsettled ones become orphans when `keep` says their message is still being worked on,
    /// and are dropped otherwise. Returns how many deliveries went back to the queue that had
    /// not been requeued already.
    pub fn orphan_all(&mut self, mut keep: impl FnMut(DeliveryKey, &T) -> bool) -> usize {
        let mut returned = 0;
        for entry in self.entries.drain(..) {
            match entry.settlement {
                None => {
                    if keep(entry.key, &entry.held) {
                        self.orphans.insert(entry.key);
                    }
                    returned += 1;
                }
                Some(Settlement::Requeued) => {}
                Some(_) => returned += 1,
            }
        }
        returned
    }

    fn index(&self, key: DeliveryKey) -> Option<usize> {
        let front = self.entries.front()?.key.0;
        let index = usize::try_from(key.0.checked_sub(front)?).ok()?;
        (index < self.entries.len()).then_some(index)
    }

    fn entry(&self, key: DeliveryKey) -> Option<&Entry<T>> {
        self.index(key).and_then(|i| self.entries.get(i))
    }

    fn entry_mut(&mut self, key: DeliveryKey) -> Option<&mut Entry<T>> {
        self.index(key).and_then(|i| self.entries.get_mut(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> InFlight<u64> {
        InFlight::new(Duration::from_secs(60))
    }

    fn popped(table: &mut InFlight<u64>) -> Vec<(u64, Settlement)> {
        let mut out = Vec::new();
        table.pop_settled(&mut out);
        out.into_iter()
            .map(|e| (e.held, e.settlement.unwrap()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn acks_only_a_contiguous_settled_prefix() {
        let mut t = table();
        let now = Instant::now();
        let keys: Vec<DeliveryKey> = (1..=4).map(|tag| t.insert(tag, now)).collect();
        assert_eq!(t.settle(keys[1], Settlement::Acked), Settled::Current);
        assert_eq!(t.settle(keys[3], Settlement::Acked), Settled::Current);
        assert!(popped(&mut t).is_empty(), "tag 1 is still pending");
        t.settle(keys[0], Settlement::Acked);
        assert_eq!(
            popped(&mut t),
            vec![(1, Settlement::Acked), (2, Settlement::Acked)]
        );
        t.settle(keys[2], Settlement::Requeued);
        assert_eq!(
            popped(&mut t),
            vec![(3, Settlement::Requeued), (4, Settlement::Acked)]
        );
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn settling_twice_or_an_unknown_key_changes_nothing() {
        let mut t = table();
        let key = t.insert(1, Instant::now());
        t.settle(key, Settlement::Requeued);
        assert_eq!(t.settle(key, Settlement::Acked), Settled::Ignored);
        assert_eq!(
            t.settle(DeliveryKey(99), Settlement::Acked),
            Settled::Ignored
        );
        assert_eq!(popped(&mut t), vec![(1, Settlement::Requeued)]);
    }

    #[tokio::test(start_paused = true)]
    async fn deliveries_past_their_deadline_are_reported_once_settled_they_are_not() {
        let mut t = table();
        let a = t.insert(1, Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        let b = t.insert(2, Instant::now());
        assert_eq!(
            t.next_deadline(),
            Some(Instant::now() + Duration::from_secs(50))
        );
        tokio::time::advance(Duration::from_secs(50)).await;
        let mut expired = Vec::new();
        t.expire(Instant::now(), &mut expired);
        assert_eq!(expired, vec![a]);
        t.settle(a, Settlement::Requeued);
        assert_eq!(
            t.next_deadline(),
            Some(Instant::now() + Duration::from_secs(10))
        );
        t.settle(b, Settlement::Acked);
        assert_eq!(t.next_deadline(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn orphans_of_a_lost_channel_count_until_confirmed_and_never_block_new_acks() {
        let mut t = table();
        let now = Instant::now();
        let old_pending = t.insert(1, now);
        let old_done = t.insert(2, now);
        t.settle(old_done, Settlement::Acked);
        assert_eq!(t.orphan_all(|_, _| true), 2);
        assert_eq!(t.len(), 1, "only the unsettled one stays counted");
        assert!(t.pending(old_pending).is_none(), "orphans cannot be acked");

        let fresh = t.insert(10, now);
        t.settle(fresh, Settlement::Acked);
        assert_eq!(popped(&mut t), vec![(10, Settlement::Acked)]);

        assert_eq!(t.settle(old_pending, Settlement::Acked), Settled::Orphan);
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_orphan_nobody_works_on_is_not_kept() {
        let mut t = table();
        t.insert(1, Instant::now());
        t.insert(2, Instant::now());
        assert_eq!(t.orphan_all(|_, held| *held == 2), 2);
        assert_eq!(t.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_being_dead_lettered_is_exempt_from_its_deadline() {
        let mut t = table();
        let key = t.insert(1, Instant::now());
        t.mark_settling(key);
        assert_eq!(t.next_deadline(), None);
        tokio::time::advance(Duration::from_secs(61)).await;
        let mut expired = Vec::new();
        t.expire(Instant::now(), &mut expired);
        assert!(expired.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn orphans_stay_counted_past_any_deadline_until_their_outcome() {
        let mut t = table();
        let key = t.insert(1, Instant::now());
        t.orphan_all(|_, _| true);
        tokio::time::advance(Duration::from_secs(3600)).await;
        let mut expired = Vec::new();
        t.expire(Instant::now(), &mut expired);
        assert!(expired.is_empty());
        assert_eq!(t.len(), 1);
        assert_eq!(t.settle(key, Settlement::Acked), Settled::Orphan);
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_requeued_delivery_still_held_keeps_its_place_until_its_outcome() {
        let mut t = table();
        let key = t.insert(1, Instant::now());
        t.requeue_held(key);
        assert_eq!(popped(&mut t), vec![(1, Settlement::Requeued)]);
        assert_eq!(t.len(), 1, "its message is still with the entities");
        assert!(t.pending(key).is_none(), "it cannot be acked any more");
        assert_eq!(t.settle(key, Settlement::Acked), Settled::Orphan);
        assert!(t.is_empty());
    }
}
