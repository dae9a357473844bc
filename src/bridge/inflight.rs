//! The in-flight table: every delivery taken from the current channel, in delivery-tag order,
//! until it is settled and acked. Entities confirm out of order, so the broker is acked with
//! `multiple` up to the end of the contiguous settled prefix, and no delivery is ever acked
//! before its own entity confirmed it.
//!
//! The bound on work (`max_in_flight`) counts only deliveries still with the entities
//! ([`InFlight::working`]): one that is settled and waits for the prefix to reach it holds no
//! entity busy, and counting it let one slow head delivery stall the bridge while most
//! entities sat idle. What waits is bounded by the broker's prefetch instead; before it fills
//! the window, settled deliveries behind the first unsettled one are acked one by one
//! ([`InFlight::take_isolated`]), since a `multiple` ack would cover the unsettled head too.
//!
//! Deliveries of a channel that died, and deliveries nacked back at their deadline while their
//! message is still with the entities, become *orphans*: never acked again, but counted as
//! working until their outcome arrives (the controller reports on every message it took),
//! because their messages still occupy memory there. A stuck entity therefore stops the
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
    /// Settled and acked on its own, ahead of the prefix: never acked again.
    pub acked_alone: bool,
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
    /// Entries not settled yet.
    unsettled: usize,
    next_key: u64,
    deadline_after: Duration,
    /// From this many entries on, settled ones behind an unsettled head are acked alone.
    isolated_above: usize,
}

impl<T> InFlight<T> {
    /// An empty table whose deliveries must settle within `deadline_after`; once it holds
    /// `isolated_above` entries, settled ones that cannot join the acked prefix are acked alone
    /// (set it below the prefetch, so the broker's window never fills with finished work).
    pub fn new(deadline_after: Duration, isolated_above: usize) -> Self {
        InFlight {
            entries: VecDeque::new(),
            orphans: HashSet::new(),
            unsettled: 0,
            next_key: 0,
            deadline_after,
            isolated_above,
        }
    }

    /// Every delivery not finished: taken and unacked, or an orphan still being worked on.
    pub fn len(&self) -> usize {
        self.entries.len() + self.orphans.len()
    }

    /// Deliveries still with the entities, orphans included: what `max_in_flight` bounds.
    pub fn working(&self) -> usize {
        self.unsettled + self.orphans.len()
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
            acked_alone: false,
            held,
        });
        self.unsettled += 1;
        key
    }

    /// The held data of a current delivery that is still unsettled.
    pub fn pending(&self, key: DeliveryKey) -> Option<&T> {
        self.entry(key)
            .filter(|e| e.settlement.is_none())
            .map(|e| &e.held)
    }

    /// Like [`Self::pending`], to change what is held.
    pub fn pending_mut(&mut self, key: DeliveryKey) -> Option<&mut T> {
        self.entry_mut(key)
            .filter(|e| e.settlement.is_none())
            .map(|e| &mut e.held)
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
                self.unsettled -= 1;
                Settled::Current
            }
            _ => Settled::Ignored,
        }
    }

    /// Moves the contiguous settled prefix into `out`, oldest first. The driver acks once,
    /// with `multiple`, up to the last entry that needs an ack and was not acked alone.
    pub fn pop_settled(&mut self, out: &mut Vec<Entry<T>>) {
        while self.entries.front().is_some_and(|e| e.settlement.is_some()) {
            if let Some(entry) = self.entries.pop_front() {
                out.push(entry);
            }
        }
    }

    /// Once the table holds `isolated_above` entries: marks every settled entry that still
    /// needs an ack and sits behind an unsettled one as acked alone, and hands each to `ack`
    /// (the driver acks it without `multiple`). Call after [`Self::pop_settled`], so the prefix
    /// is gone and what remains starts with an unsettled entry.
    pub fn take_isolated(&mut self, mut ack: impl FnMut(&Entry<T>)) {
        if self.entries.len() < self.isolated_above {
            return;
        }
        for entry in self.entries.iter_mut() {
            let needs_ack = entry.settlement.is_some_and(Settlement::needs_ack);
            if needs_ack && !entry.acked_alone {
                entry.acked_alone = true;
                ack(entry);
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
                Some(_) if entry.acked_alone => {}
                Some(_) => returned += 1,
            }
        }
        self.unsettled = 0;
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
    use crate::testkit::Clock;

    fn table() -> InFlight<u64> {
        InFlight::new(Duration::from_secs(60), usize::MAX)
    }

    fn popped(table: &mut InFlight<u64>) -> Vec<(u64, Settlement)> {
        let mut out = Vec::new();
        table.pop_settled(&mut out);
        out.into_iter()
            .map(|e| (e.held, e.settlement.unwrap()))
            .collect()
    }

    #[test]
    fn acks_only_a_contiguous_settled_prefix() {
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

    #[test]
    fn settling_twice_or_an_unknown_key_changes_nothing() {
        let now = Instant::now();
        let mut t = table();
        let key = t.insert(1, now);
        t.settle(key, Settlement::Requeued);
        assert_eq!(t.settle(key, Settlement::Acked), Settled::Ignored);
        assert_eq!(
            t.settle(DeliveryKey(99), Settlement::Acked),
            Settled::Ignored
        );
        assert_eq!(popped(&mut t), vec![(1, Settlement::Requeued)]);
    }

    #[test]
    fn deliveries_past_their_deadline_are_reported_once_settled_they_are_not() {
        let mut clock = Clock::new();
        let mut t = table();
        let a = t.insert(1, clock.now());
        clock.advance(Duration::from_secs(10));
        let b = t.insert(2, clock.now());
        assert_eq!(
            t.next_deadline(),
            Some(clock.now() + Duration::from_secs(50))
        );
        clock.advance(Duration::from_secs(50));
        let mut expired = Vec::new();
        t.expire(clock.now(), &mut expired);
        assert_eq!(expired, vec![a]);
        t.settle(a, Settlement::Requeued);
        assert_eq!(
            t.next_deadline(),
            Some(clock.now() + Duration::from_secs(10))
        );
        t.settle(b, Settlement::Acked);
        assert_eq!(t.next_deadline(), None);
    }

    #[test]
    fn orphans_of_a_lost_channel_count_until_confirmed_and_never_block_new_acks() {
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

    #[test]
    fn an_orphan_nobody_works_on_is_not_kept() {
        let now = Instant::now();
        let mut t = table();
        t.insert(1, now);
        t.insert(2, now);
        assert_eq!(t.orphan_all(|_, held| *held == 2), 2);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_delivery_being_dead_lettered_is_exempt_from_its_deadline() {
        let mut clock = Clock::new();
        let mut t = table();
        let key = t.insert(1, clock.now());
        t.mark_settling(key);
        assert_eq!(t.next_deadline(), None);
        clock.advance(Duration::from_secs(61));
        let mut expired = Vec::new();
        t.expire(clock.now(), &mut expired);
        assert!(expired.is_empty());
    }

    #[test]
    fn orphans_stay_counted_past_any_deadline_until_their_outcome() {
        let mut clock = Clock::new();
        let mut t = table();
        let key = t.insert(1, clock.now());
        t.orphan_all(|_, _| true);
        clock.advance(Duration::from_secs(3600));
        let mut expired = Vec::new();
        t.expire(clock.now(), &mut expired);
        assert!(expired.is_empty());
        assert_eq!(t.len(), 1);
        assert_eq!(t.settle(key, Settlement::Acked), Settled::Orphan);
        assert!(t.is_empty());
    }

    #[test]
    fn a_requeued_delivery_still_held_keeps_its_place_until_its_outcome() {
        let now = Instant::now();
        let mut t = table();
        let key = t.insert(1, now);
        t.requeue_held(key);
        assert_eq!(popped(&mut t), vec![(1, Settlement::Requeued)]);
        assert_eq!(t.len(), 1, "its message is still with the entities");
        assert!(t.pending(key).is_none(), "it cannot be acked any more");
        assert_eq!(t.settle(key, Settlement::Acked), Settled::Orphan);
        assert!(t.is_empty());
    }

    /// One channel as the broker sees it: the tags delivered and not acked yet, with
    /// RabbitMQ's rules (a single ack of a tag that is not outstanding closes the channel).
    struct Broker {
        outstanding: std::collections::BTreeSet<u64>,
        confirmed: HashSet<u64>,
        acked: u64,
    }

    impl Broker {
        fn ack_multiple(&mut self, tag: u64) {
            assert!(
                self.outstanding.contains(&tag),
                "multiple ack of a gone tag {tag}"
            );
            let covered: Vec<u64> = self.outstanding.range(..=tag).copied().collect();
            for tag in covered {
                assert!(
                    self.confirmed.contains(&tag),
                    "tag {tag} acked before its entity confirmed"
                );
                self.outstanding.remove(&tag);
                self.acked += 1;
            }
        }

        fn ack_one(&mut self, tag: u64) {
            assert!(
                self.outstanding.remove(&tag),
                "PRECONDITION_FAILED: tag {tag} not outstanding"
            );
            assert!(
                self.confirmed.contains(&tag),
                "tag {tag} acked before its entity confirmed"
            );
            self.acked += 1;
        }
    }

    /// Random schedules: entities of random speed settle in any order; the bridge takes while
    /// fewer than `bound` are working and the broker's window has room, and acks as the driver
    /// does. Never an ack before a confirmation, never a bad single ack, never the window full
    /// of finished work, and everything acked in the end.
    #[test]
    fn random_speeds_never_ack_early_and_never_fill_the_window_with_finished_work() {
        use rand::rngs::SmallRng;
        use rand::{Rng, SeedableRng};
        for seed in 0..200_u64 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let bound = rng.random_range(1..40_usize);
            let prefetch = rng.random_range(bound..=bound * 3);
            let isolated_above = prefetch.saturating_sub(bound / 2).max(1);
            let total = 1_000_u64;
            let mut t: InFlight<u64> = InFlight::new(Duration::from_secs(60), isolated_above);
            let mut broker = Broker {
                outstanding: Default::default(),
                confirmed: HashSet::new(),
                acked: 0,
            };
            let mut keys: Vec<(DeliveryKey, u64)> = Vec::new();
            let mut next_tag = 1;
            // Each working delivery finishes in a step with its own entity's odds: some slow.
            let mut speed: std::collections::HashMap<u64, f64> = Default::default();
            let now = Instant::now();
            let mut steps = 0;
            while broker.acked < total {
                steps += 1;
                assert!(
                    steps < 200_000,
                    "seed {seed}: stalled at {} acked",
                    broker.acked
                );
                while t.working() < bound
                    && broker.outstanding.len() < prefetch
                    && next_tag <= total
                {
                    let key = t.insert(next_tag, now);
                    broker.outstanding.insert(next_tag);
                    speed.insert(next_tag, [0.9, 0.5, 0.05][rng.random_range(0..3)]);
                    keys.push((key, next_tag));
                    next_tag += 1;
                }
                assert!(t.working() <= bound);
                assert!(broker.outstanding.len() <= prefetch);
                keys.retain(|&(key, tag)| {
                    if !rng.random_bool(speed[&tag]) {
                        return true;
                    }
                    broker.confirmed.insert(tag);
                    let settlement = if rng.random_bool(0.05) {
                        Settlement::DeadLettered
                    } else {
                        Settlement::Acked
                    };
                    assert_eq!(t.settle(key, settlement), Settled::Current);
                    false
                });
                // The driver's flush: one multiple ack for the prefix, then the isolated ones.
                let mut prefix = Vec::new();
                t.pop_settled(&mut prefix);
                let last = prefix
                    .iter()
                    .rev()
                    .find(|e| !e.acked_alone && e.settlement.is_some_and(Settlement::needs_ack));
                if let Some(entry) = last {
                    broker.ack_multiple(entry.held);
                }
                t.take_isolated(|entry| broker.ack_one(entry.held));
                let waiting = broker.outstanding.len();
                assert!(
                    waiting < isolated_above || waiting == t.working(),
                    "seed {seed}: {waiting} unacked, {} working, threshold {isolated_above}",
                    t.working()
                );
            }
            assert!(t.is_empty(), "seed {seed}");
            assert!(broker.outstanding.is_empty(), "seed {seed}");
        }
    }
}
