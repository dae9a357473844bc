//! The durable-queue front that every producer-side controller (point-to-point, work pulling,
//! sharding) puts before its routing: load the stored state before taking messages, store each
//! message (in sequence order, one at a time, as the queue requires) before it goes out, retry
//! a failed load or store up to `retry_attempts`, and record confirmations write-behind.
//!
//! A controller without a queue uses the same front, which then starts loaded (with empty
//! state) and never asks for anything. The controller talks to the queue only through the
//! [`StoreRequest`]s it emits and the answers of [`StoreClient`].

use std::collections::VecDeque;

use tokio::time::Instant;

use crate::delivery::durable::{DurableState, MessageSent, Qualifier};
use crate::delivery::protocol::SeqNr;

/// A request for the durable queue; the controller's owner runs it and answers through
/// [`StoreClient`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreRequest<M> {
    /// Load the stored state; answer with [`StoreClient::handle_state_loaded`] or
    /// [`StoreClient::handle_load_failed`] (also on timeout).
    LoadState {
        /// 1 for the first try.
        attempt: u32,
    },
    /// Store this message durably; answer with [`StoreClient::handle_message_stored`] or
    /// [`StoreClient::handle_store_failed`] (also on timeout). The owner sets its timestamp.
    StoreMessageSent {
        /// The message.
        sent: MessageSent<M>,
        /// 1 for the first try.
        attempt: u32,
    },
    /// Record a confirmation, write-behind; no answer is expected.
    StoreMessageConfirmed {
        /// Everything of `qualifier` up to here is confirmed.
        seq_nr: SeqNr,
        /// Whose confirmation.
        qualifier: Qualifier,
    },
}

/// The durable queue failed beyond its retry attempts; the controller stops.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurableError {
    /// The state did not load within the attempts allowed.
    #[error("durable queue LoadState failed after {attempts} attempts")]
    LoadFailed {
        /// Attempts made.
        attempts: u32,
    },
    /// A message was not stored within the attempts allowed.
    #[error("durable queue StoreMessageSent of seq nr {seq_nr} failed after {attempts} attempts")]
    StoreFailed {
        /// The message that could not be stored.
        seq_nr: SeqNr,
        /// Attempts made.
        attempts: u32,
    },
}

/// A controller that talks to a durable queue: it emits [`StoreRequest`]s and takes the
/// queue's answers. One trait for the three controllers, so one driver runs any of them.
pub trait StoreClient<M> {
    /// The stored state arrived.
    fn handle_state_loaded(&mut self, state: DurableState<M>, now: Instant);
    /// Loading the state failed or timed out on `attempt`.
    fn handle_load_failed(&mut self, attempt: u32);
    /// The message `seq_nr` is stored.
    fn handle_message_stored(&mut self, seq_nr: SeqNr, now: Instant);
    /// Storing the message `seq_nr` failed or timed out on `attempt`.
    fn handle_store_failed(&mut self, seq_nr: SeqNr, attempt: u32);
    /// The next request for the durable queue.
    fn poll_store(&mut self) -> Option<StoreRequest<M>>;
}

/// Where the stored state stands.
enum Loading<M> {
    /// Asked for, not arrived.
    Waiting,
    /// Arrived, not yet taken by the controller.
    Loaded(DurableState<M>),
    /// Taken: the controller runs on it.
    Taken,
}

/// The front: the state being loaded, messages waiting to be stored (each with what its
/// controller needs once it is stored, `X`), and the requests for the queue.
pub(crate) struct DurableFront<M, X> {
    durable: bool,
    retry_attempts: u32,
    loading: Loading<M>,
    waiting: VecDeque<(MessageSent<M>, X)>,
    /// The attempt in progress for the head, if a store request is out.
    attempt: Option<u32>,
    requests: VecDeque<StoreRequest<M>>,
}

impl<M: Clone, X> DurableFront<M, X> {
    /// The front of a controller without a queue: loaded with empty state, never asking.
    pub(crate) fn volatile() -> Self {
        Self::with(false, 0, Loading::Loaded(DurableState::default()))
    }

    /// The front of a controller with a queue: it asks for the stored state first.
    pub(crate) fn durable(retry_attempts: u32) -> Self {
        let mut front = Self::with(true, retry_attempts, Loading::Waiting);
        front
            .requests
            .push_back(StoreRequest::LoadState { attempt: 1 });
        front
    }

    fn with(durable: bool, retry_attempts: u32, loading: Loading<M>) -> Self {
        DurableFront {
            durable,
            retry_attempts,
            loading,
            waiting: VecDeque::new(),
            attempt: None,
            requests: VecDeque::new(),
        }
    }

    /// Whether messages are stored before they go out.
    pub(crate) fn is_durable(&self) -> bool {
        self.durable
    }

    /// Takes the loaded state; false if none was asked for (a duplicate or late answer).
    pub(crate) fn state_loaded(&mut self, state: DurableState<M>) -> bool {
        if !matches!(self.loading, Loading::Waiting) {
            return false;
        }
        self.loading = Loading::Loaded(state);
        true
    }

    /// The loaded state, once; the controller runs on it from then on.
    pub(crate) fn take_state(&mut self) -> Option<DurableState<M>> {
        match std::mem::replace(&mut self.loading, Loading::Taken) {
            Loading::Loaded(state) => Some(state),
            other => {
                self.loading = other;
                None
            }
        }
    }

    /// Loading failed on `attempt`: it is asked for again, or, after `retry_attempts`, the
    /// controller must fail with the error returned.
    pub(crate) fn load_failed(&mut self, attempt: u32) -> Result<(), DurableError> {
        if !matches!(self.loading, Loading::Waiting) {
            return Ok(());
        }
        if attempt >= self.retry_attempts {
            return Err(DurableError::LoadFailed { attempts: attempt });
        }
        self.requests.push_back(StoreRequest::LoadState {
            attempt: attempt + 1,
        });
        Ok(())
    }

    /// Messages waiting or being stored.
    pub(crate) fn storing(&self) -> usize {
        self.waiting.len()
    }

    /// Nothing waits to be stored.
    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.is_empty()
    }

    /// What waits, in order.
    pub(crate) fn extras(&self) -> impl Iterator<Item = &X> {
        self.waiting.iter().map(|(_, extra)| extra)
    }

    /// Queues `sent`; it is stored as soon as those before it are.
    pub(crate) fn store(&mut self, sent: MessageSent<M>, extra: X) {
        self.waiting.push_back((sent, extra));
        self.resume();
    }

    /// Asks to store the head unless a store is out already.
    pub(crate) fn resume(&mut self) {
        if self.attempt.is_none() {
            self.request_head(1);
        }
    }

    /// The queue stored `seq_nr`: the message, if it is the head being stored (anything else
    /// is a stale answer). The next store goes out on [`Self::resume`], once the controller
    /// has dealt with this one.
    pub(crate) fn stored(&mut self, seq_nr: SeqNr) -> Option<(MessageSent<M>, X)> {
        if self.attempt.is_none() || !self.head_is(seq_nr) {
            return None;
        }
        self.attempt = None;
        self.waiting.pop_front()
    }

    /// Storing `seq_nr` failed on `attempt`: it is tried again, or, after `retry_attempts`,
    /// the controller must fail with the error returned.
    pub(crate) fn store_failed(&mut self, seq_nr: SeqNr, attempt: u32) -> Result<(), DurableError> {
        if self.attempt != Some(attempt) || !self.head_is(seq_nr) {
            return Ok(());
        }
        if attempt >= self.retry_attempts {
            return Err(DurableError::StoreFailed {
                seq_nr,
                attempts: attempt,
            });
        }
        self.request_head(attempt + 1);
        Ok(())
    }

    /// Records, write-behind, that `qualifier` confirmed everything up to `seq_nr` (with a
    /// queue; nothing without, not even the qualifier's string: this runs for every
    /// confirmation). A lost record only means redelivery after a restart.
    pub(crate) fn confirmed(&mut self, seq_nr: SeqNr, qualifier: impl Into<Qualifier>) {
        if self.durable {
            self.requests
                .push_back(StoreRequest::StoreMessageConfirmed {
                    seq_nr,
                    qualifier: qualifier.into(),
                });
        }
    }

    /// The next request for the queue.
    pub(crate) fn poll_request(&mut self) -> Option<StoreRequest<M>> {
        self.requests.pop_front()
    }

    /// Gives back memory after a burst.
    pub(crate) fn shrink_to_fit(&mut self) {
        self.waiting.shrink_to_fit();
        self.requests.shrink_to_fit();
    }

    fn head_is(&self, seq_nr: SeqNr) -> bool {
        self.waiting.front().map(|(sent, _)| sent.seq_nr) == Some(seq_nr)
    }

    fn request_head(&mut self, attempt: u32) {
        if let Some((sent, _)) = self.waiting.front() {
            self.attempt = Some(attempt);
            self.requests.push_back(StoreRequest::StoreMessageSent {
                sent: sent.clone(),
                attempt,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::durable::NO_QUALIFIER;
    use crate::delivery::protocol::Payload;

    fn sent(seq_nr: u64) -> MessageSent<u32> {
        MessageSent {
            seq_nr: SeqNr(seq_nr),
            payload: Payload::Message(seq_nr as u32),
            ack: false,
            qualifier: NO_QUALIFIER.to_owned(),
            timestamp_millis: 0,
        }
    }

    fn requests(front: &mut DurableFront<u32, ()>) -> Vec<StoreRequest<u32>> {
        std::iter::from_fn(|| front.poll_request()).collect()
    }

    fn store_attempt(seq_nr: u64, attempt: u32) -> StoreRequest<u32> {
        StoreRequest::StoreMessageSent {
            sent: sent(seq_nr),
            attempt,
        }
    }

    #[test]
    fn loading_is_retried_up_to_the_limit_and_a_late_failure_is_ignored() {
        let mut front = DurableFront::<u32, ()>::durable(2);
        assert_eq!(
            requests(&mut front),
            [StoreRequest::LoadState { attempt: 1 }]
        );
        assert_eq!(front.load_failed(1), Ok(()));
        assert_eq!(
            requests(&mut front),
            [StoreRequest::LoadState { attempt: 2 }]
        );
        assert_eq!(
            front.load_failed(2),
            Err(DurableError::LoadFailed { attempts: 2 })
        );

        let mut front = DurableFront::<u32, ()>::durable(2);
        let _ = requests(&mut front);
        assert!(front.state_loaded(DurableState::default()));
        assert!(!front.state_loaded(DurableState::default()), "loaded once");
        assert_eq!(
            front.load_failed(2),
            Ok(()),
            "a late failure changes nothing"
        );
        assert!(requests(&mut front).is_empty());
        assert!(front.take_state().is_some());
        assert!(front.take_state().is_none());
    }

    #[test]
    fn messages_are_stored_one_at_a_time_in_order_and_stale_answers_are_ignored() {
        let mut front = DurableFront::<u32, ()>::durable(3);
        let _ = requests(&mut front);
        front.store(sent(1), ());
        front.store(sent(2), ());
        assert_eq!(requests(&mut front), [store_attempt(1, 1)]);
        assert_eq!(front.store_failed(SeqNr(1), 1), Ok(()));
        assert_eq!(requests(&mut front), [store_attempt(1, 2)]);
        assert_eq!(front.store_failed(SeqNr(1), 1), Ok(()), "a stale attempt");
        assert!(front.stored(SeqNr(2)).is_none(), "not the head");
        assert!(requests(&mut front).is_empty());
        assert_eq!(
            front.stored(SeqNr(1)).map(|(m, _)| m.seq_nr),
            Some(SeqNr(1))
        );
        assert!(requests(&mut front).is_empty(), "the next waits for resume");
        front.resume();
        assert_eq!(requests(&mut front), [store_attempt(2, 1)]);
        assert_eq!(front.store_failed(SeqNr(2), 1), Ok(()));
        assert_eq!(front.store_failed(SeqNr(2), 2), Ok(()));
        assert_eq!(
            front.store_failed(SeqNr(2), 3),
            Err(DurableError::StoreFailed {
                seq_nr: SeqNr(2),
                attempts: 3
            })
        );
    }

    #[test]
    fn confirmations_are_recorded_only_with_a_queue() {
        let mut volatile = DurableFront::<u32, ()>::volatile();
        volatile.confirmed(SeqNr(4), "w");
        assert!(requests(&mut volatile).is_empty());
        let mut durable = DurableFront::<u32, ()>::durable(1);
        let _ = requests(&mut durable);
        durable.confirmed(SeqNr(4), "w");
        assert_eq!(
            requests(&mut durable),
            [StoreRequest::StoreMessageConfirmed {
                seq_nr: SeqNr(4),
                qualifier: "w".to_owned()
            }]
        );
    }
}
