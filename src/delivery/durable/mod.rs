//! The durable producer queue (Akka's `DurableProducerQueue`, docs/protocol.md,
//! "Durable producer queue"): where a producer keeps the messages it sent until their confirmations
//! are stored, so that a restarted producer resends them. [`DurableState`] holds the pure state
//! transitions; [`DurableProducerQueue`] is the storage interface, with an in-memory store
//! ([`memory`]) and the embedded default on disk ([`redb_store`]). Controllers take any store
//! through the trait.
//!
//! Guarantee: at-least-once. Confirmations are stored write-behind, so a crash can lose the
//! last ones and their messages are delivered again.

#[cfg(any(test, feature = "testkit"))]
pub mod conformance;
pub mod front;
pub mod memory;
pub mod redb_store;

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::time::Duration;

pub use front::{DurableError, StoreClient, StoreRequest};

use crate::delivery::protocol::{Payload, SeqNr};

/// What a confirmation is for: the point-to-point producer uses [`NO_QUALIFIER`], work pulling
/// the worker's controller, sharding the entity id.
pub type Qualifier = String;

/// The qualifier of a point-to-point producer.
pub const NO_QUALIFIER: &str = "";

/// A message as stored: sent, and not yet known to be confirmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageSent<M> {
    /// Its sequence number in the producer's total order.
    pub seq_nr: SeqNr,
    /// The message, or one chunk of it.
    pub payload: Payload<M>,
    /// The producer asked for a confirmation reply.
    pub ack: bool,
    /// Whose confirmation removes it.
    pub qualifier: Qualifier,
    /// Wall-clock milliseconds when it was stored (set by the driver that stores it).
    pub timestamp_millis: u64,
}

/// Everything a producer needs to resume: Akka's `DurableProducerQueue.State`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurableState<M> {
    /// The sequence number the next message gets.
    pub current_seq_nr: SeqNr,
    /// Highest sequence number confirmed, over all qualifiers.
    pub highest_confirmed_seq_nr: SeqNr,
    /// Latest confirmation per qualifier: sequence number and timestamp.
    pub confirmed: BTreeMap<Qualifier, (SeqNr, u64)>,
    /// Sent and unconfirmed, in sequence order.
    pub unconfirmed: VecDeque<MessageSent<M>>,
}

impl<M> Default for DurableState<M> {
    fn default() -> Self {
        DurableState {
            current_seq_nr: SeqNr(1),
            highest_confirmed_seq_nr: SeqNr::ZERO,
            confirmed: BTreeMap::new(),
            unconfirmed: VecDeque::new(),
        }
    }
}

impl<M> DurableState<M> {
    /// Records a stored message: the next one gets the following sequence number.
    pub fn add_message_sent(&mut self, sent: MessageSent<M>) {
        self.current_seq_nr = sent.seq_nr.next();
        self.unconfirmed.push_back(sent);
    }

    /// Records a confirmation: `qualifier`'s messages up to `seq_nr` are done.
    pub fn confirmed(&mut self, seq_nr: SeqNr, qualifier: &str, timestamp_millis: u64) {
        self.unconfirmed
            .retain(|m| !(m.qualifier == qualifier && m.seq_nr <= seq_nr));
        self.highest_confirmed_seq_nr = self.highest_confirmed_seq_nr.max(seq_nr);
        self.confirmed
            .insert(qualifier.to_owned(), (seq_nr, timestamp_millis));
    }

    /// Forgets the confirmation records of these qualifiers.
    pub fn cleanup(&mut self, qualifiers: &[Qualifier]) {
        for qualifier in qualifiers {
            self.confirmed.remove(qualifier);
        }
    }

    /// Qualifiers whose last confirmation is older than `unused_after` and that have nothing
    /// unconfirmed (Akka.NET's reading of the cleanup rule; docs/protocol.md,
    /// "Stale confirmation qualifiers").
    pub fn stale_qualifiers(&self, now_millis: u64, unused_after: Duration) -> Vec<Qualifier> {
        let limit =
            now_millis.saturating_sub(u64::try_from(unused_after.as_millis()).unwrap_or(u64::MAX));
        self.confirmed
            .iter()
            .filter(|(qualifier, (_, timestamp))| {
                *timestamp < limit && !self.unconfirmed.iter().any(|m| &m.qualifier == *qualifier)
            })
            .map(|(qualifier, _)| qualifier.clone())
            .collect()
    }

    /// Drops chunk runs that were only partly stored (a crash between chunks), and rewinds
    /// `current_seq_nr` to just after the last complete message.
    pub fn cleanup_partial_chunked_messages(&mut self) {
        let whole = |m: &MessageSent<M>| m.payload.is_first_chunk() && m.payload.is_last_chunk();
        if self.unconfirmed.iter().all(whole) {
            return;
        }
        let mut kept = VecDeque::with_capacity(self.unconfirmed.len());
        let mut run: Vec<MessageSent<M>> = Vec::new();
        let mut current = self.highest_confirmed_seq_nr.next();
        for sent in self.unconfirmed.drain(..) {
            let (first, last) = (sent.payload.is_first_chunk(), sent.payload.is_last_chunk());
            if first {
                run.clear();
            }
            if last {
                current = sent.seq_nr.next();
                kept.extend(run.drain(..));
                kept.push_back(sent);
            } else {
                run.push(sent);
            }
        }
        self.unconfirmed = kept;
        self.current_seq_nr = current;
    }
}

/// Why a store operation failed. The caller retries (up to `retry_attempts`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// A `MessageSent` that is neither the next one nor a retry of the last one; nothing was
    /// stored (Akka answers nothing and the caller's timeout fires).
    #[error("message sent out of order: expected seq nr {expected}, got {got}")]
    OutOfOrder {
        /// The sequence number the store expects next.
        expected: SeqNr,
        /// The one it got.
        got: SeqNr,
    },
    /// The storage failed; the state is as before the call.
    #[error("durable queue storage failed: {0}")]
    Backend(String),
}

/// Storage for a producer's unconfirmed messages. Implementations must make
/// [`Self::store_message_sent`] idempotent for a retry of the last message, and may store
/// confirmations write-behind.
pub trait DurableProducerQueue<M>: Send + Sync + 'static {
    /// The stored state, after dropping partly stored chunked messages.
    fn load_state(&self) -> impl Future<Output = Result<DurableState<M>, StoreError>> + Send;

    /// Stores a sent message durably before returning. The sequence number must be the
    /// state's `current_seq_nr`; the one before it is acknowledged without storing again.
    fn store_message_sent(
        &self,
        sent: MessageSent<M>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records a confirmation (write-behind). One not newer than the qualifier's stored one is
    /// ignored.
    fn store_message_confirmed(
        &self,
        seq_nr: SeqNr,
        qualifier: &str,
        timestamp_millis: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Forgets qualifiers unused for `unused_after` with nothing unconfirmed.
    fn cleanup_unused(
        &self,
        now_millis: u64,
        unused_after: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Makes write-behind confirmations durable (before a planned stop).
    fn flush(&self) -> impl Future<Output = Result<(), StoreError>> + Send {
        async { Ok(()) }
    }
}

/// The rule every store applies to a `MessageSent` numbered `seq_nr` when the next expected
/// is `current`: `Ok(true)` store it, `Ok(false)` it is a retry of the last one (acknowledge,
/// store nothing), `Err` anything else.
pub fn check_message_sent(current: SeqNr, seq_nr: SeqNr) -> Result<bool, StoreError> {
    if seq_nr == current {
        Ok(true)
    } else if seq_nr.next() == current {
        Ok(false)
    } else {
        Err(StoreError::OutOfOrder {
            expected: current,
            got: seq_nr,
        })
    }
}

/// Applies a `MessageSent` to a state by [`check_message_sent`]; returns whether it was added.
pub fn accept_message_sent<M>(
    state: &mut DurableState<M>,
    sent: MessageSent<M>,
) -> Result<bool, StoreError> {
    let store = check_message_sent(state.current_seq_nr, sent.seq_nr)?;
    if store {
        state.add_message_sent(sent);
    }
    Ok(store)
}

/// Applies a confirmation the way every store must: only one newer than the qualifier's
/// stored confirmation counts. Returns whether it changed the state.
pub fn accept_confirmed<M>(
    state: &mut DurableState<M>,
    seq_nr: SeqNr,
    qualifier: &str,
    timestamp_millis: u64,
) -> bool {
    let newer = state
        .confirmed
        .get(qualifier)
        .is_none_or(|(stored, _)| seq_nr > *stored);
    if newer {
        state.confirmed(seq_nr, qualifier, timestamp_millis);
    }
    newer
}

/// Milliseconds since the Unix epoch, for timestamps in stored records.
pub fn wall_clock_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::delivery::protocol::Chunk;

    fn sent(seq_nr: u64, qualifier: &str) -> MessageSent<u64> {
        MessageSent {
            seq_nr: SeqNr(seq_nr),
            payload: Payload::Message(seq_nr),
            ack: false,
            qualifier: qualifier.into(),
            timestamp_millis: 0,
        }
    }

    fn chunk(seq_nr: u64, first_chunk: bool, last_chunk: bool) -> MessageSent<u64> {
        MessageSent {
            payload: Payload::Chunk(Chunk {
                bytes: Bytes::from_static(b"x"),
                first_chunk,
                last_chunk,
            }),
            ..sent(seq_nr, NO_QUALIFIER)
        }
    }

    fn seqs(state: &DurableState<u64>) -> Vec<u64> {
        state.unconfirmed.iter().map(|m| m.seq_nr.0).collect()
    }

    // DPQ-01
    #[test]
    fn adding_a_message_advances_current_and_keeps_order() {
        let mut state = DurableState::default();
        state.add_message_sent(sent(1, ""));
        state.add_message_sent(sent(2, ""));
        assert_eq!(state.current_seq_nr, SeqNr(3));
        assert_eq!(seqs(&state), vec![1, 2]);
    }

    // DPQ-02
    #[test]
    fn a_confirmation_removes_up_to_it_and_leaves_current_alone() {
        let mut state = DurableState::default();
        state.add_message_sent(sent(1, ""));
        state.add_message_sent(sent(2, ""));
        state.confirmed(SeqNr(1), "", 7);
        assert_eq!(seqs(&state), vec![2]);
        assert_eq!(state.current_seq_nr, SeqNr(3));
        assert_eq!(state.highest_confirmed_seq_nr, SeqNr(1));
        assert_eq!(state.confirmed.get(""), Some(&(SeqNr(1), 7)));
    }

    // DPQ-03
    #[test]
    fn partly_stored_chunk_runs_are_dropped_and_current_rewound() {
        let mut state = DurableState::default();
        state.add_message_sent(chunk(1, true, false));
        state.cleanup_partial_chunked_messages();
        assert!(state.unconfirmed.is_empty());
        assert_eq!(state.current_seq_nr, SeqNr(1));

        let mut state = DurableState::default();
        for m in [
            chunk(1, true, false),
            chunk(2, false, false),
            chunk(3, false, true),
        ] {
            state.add_message_sent(m);
        }
        state.cleanup_partial_chunked_messages();
        assert_eq!(seqs(&state), vec![1, 2, 3]);
        assert_eq!(state.current_seq_nr, SeqNr(4));

        state.add_message_sent(chunk(4, true, false));
        state.add_message_sent(chunk(5, false, false));
        state.cleanup_partial_chunked_messages();
        assert_eq!(seqs(&state), vec![1, 2, 3]);
        assert_eq!(state.current_seq_nr, SeqNr(4));
    }

    // DPC-05, the state side: a whole message, then a partial run.
    #[test]
    fn a_partial_run_after_a_whole_message_keeps_the_whole_one() {
        let mut state = DurableState {
            highest_confirmed_seq_nr: SeqNr(2),
            current_seq_nr: SeqNr(3),
            ..DurableState::default()
        };
        for m in [
            chunk(3, true, true),
            chunk(4, true, false),
            chunk(5, false, false),
        ] {
            state.add_message_sent(m);
        }
        state.cleanup_partial_chunked_messages();
        assert_eq!(seqs(&state), vec![3]);
        assert_eq!(state.current_seq_nr, SeqNr(4));
    }

    // ESQ-06 / docs/protocol.md, "Stale confirmation qualifiers": a qualifier with nothing
    // unconfirmed and an old confirmation is stale.
    #[test]
    fn only_old_fully_confirmed_qualifiers_are_stale() {
        let mut state = DurableState::default();
        state.add_message_sent(sent(1, "q1"));
        state.add_message_sent(sent(2, "q1"));
        state.confirmed(SeqNr(1), "q1", 100);
        state.add_message_sent(sent(3, "q2"));
        state.confirmed(SeqNr(3), "q2", 100);
        let unused = Duration::from_millis(50);
        assert_eq!(state.stale_qualifiers(1_000, unused), vec!["q2".to_owned()]);
        state.confirmed(SeqNr(2), "q1", 100);
        assert_eq!(
            state.stale_qualifiers(1_000, unused),
            vec!["q1".to_owned(), "q2".to_owned()]
        );
        assert!(
            state.stale_qualifiers(120, unused).is_empty(),
            "recent enough"
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Send { qualifier: u8, offset: i8 },
        Confirm { qualifier: u8, back: u8 },
        Cleanup,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..3, -2i8..2).prop_map(|(qualifier, offset)| Op::Send { qualifier, offset }),
            3 => (0u8..3, 0u8..5).prop_map(|(qualifier, back)| Op::Confirm { qualifier, back }),
            1 => Just(Op::Cleanup),
        ]
    }

    proptest! {
        /// Under any sequence of stores (in order, retried, or out of order), confirmations and
        /// cleanups, the state keeps its invariants.
        #[test]
        fn durable_state_invariants_hold(ops in proptest::collection::vec(op(), 0..80)) {
            let mut state: DurableState<u64> = DurableState::default();
            let mut clock = 0;
            for op in ops {
                clock += 10;
                match op {
                    Op::Send { qualifier, offset } => {
                        let seq = (state.current_seq_nr.0 as i64 + i64::from(offset)).max(1) as u64;
                        let before = state.current_seq_nr;
                        let result = accept_message_sent(&mut state, sent(seq, &qualifier.to_string()));
                        match result {
                            Ok(true) => prop_assert_eq!(state.current_seq_nr, before.next()),
                            Ok(false) => prop_assert_eq!(SeqNr(seq).next(), before),
                            Err(_) => prop_assert_eq!(state.current_seq_nr, before),
                        }
                    }
                    Op::Confirm { qualifier, back } => {
                        let seq = state.current_seq_nr.0.saturating_sub(u64::from(back) + 1);
                        accept_confirmed(&mut state, SeqNr(seq), &qualifier.to_string(), clock);
                    }
                    Op::Cleanup => {
                        let stale = state.stale_qualifiers(clock, Duration::from_millis(30));
                        state.cleanup(&stale);
                    }
                }
                // Unconfirmed is strictly increasing and below current.
                let seqs: Vec<u64> = state.unconfirmed.iter().map(|m| m.seq_nr.0).collect();
                prop_assert!(seqs.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(seqs.iter().all(|s| *s < state.current_seq_nr.0));
                // Nothing unconfirmed is covered by its qualifier's confirmation.
                for m in &state.unconfirmed {
                    if let Some((confirmed, _)) = state.confirmed.get(&m.qualifier) {
                        prop_assert!(m.seq_nr > *confirmed);
                    }
                }
                // The highest confirmation bounds every recorded one.
                prop_assert!(state.confirmed.values().all(|(s, _)| *s <= state.highest_confirmed_seq_nr));
            }
        }
    }
}
