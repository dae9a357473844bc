//! Store-then-route, shared by the durable work-pulling and sharding controllers: messages
//! wait in line and are stored one at a time (in sequence order, as the queue requires), each
//! with what its controller needs once it is stored (`X`); a failed store is retried until
//! `retry_attempts`, then the controller fails.

use std::collections::VecDeque;

use crate::delivery::durable::MessageSent;
use crate::delivery::producer::{ProducerError, StoreRequest};
use crate::delivery::protocol::SeqNr;

/// Messages waiting to be stored, the head being stored.
pub(crate) struct StoreLine<M, X> {
    waiting: VecDeque<(MessageSent<M>, X)>,
    /// The attempt in progress for the head, if a store request is out.
    attempt: Option<u32>,
}

impl<M: Clone, X> StoreLine<M, X> {
    pub(crate) fn new() -> Self {
        StoreLine {
            waiting: VecDeque::new(),
            attempt: None,
        }
    }

    /// Messages waiting or being stored.
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// What waits, in order.
    pub(crate) fn extras(&self) -> impl Iterator<Item = &X> {
        self.waiting.iter().map(|(_, extra)| extra)
    }

    /// Queues `sent`; it is stored as soon as those before it are.
    pub(crate) fn push(
        &mut self,
        sent: MessageSent<M>,
        extra: X,
        requests: &mut VecDeque<StoreRequest<M>>,
    ) {
        self.waiting.push_back((sent, extra));
        self.resume(requests);
    }

    /// Asks to store the head unless a store is out already.
    pub(crate) fn resume(&mut self, requests: &mut VecDeque<StoreRequest<M>>) {
        if self.attempt.is_none() {
            self.request_head(1, requests);
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
    pub(crate) fn failed(
        &mut self,
        seq_nr: SeqNr,
        attempt: u32,
        retry_attempts: u32,
        requests: &mut VecDeque<StoreRequest<M>>,
    ) -> Result<(), ProducerError> {
        if self.attempt != Some(attempt) || !self.head_is(seq_nr) {
            return Ok(());
        }
        if attempt >= retry_attempts {
            return Err(ProducerError::StoreFailed {
                seq_nr,
                attempts: attempt,
            });
        }
        self.request_head(attempt + 1, requests);
        Ok(())
    }

    fn head_is(&self, seq_nr: SeqNr) -> bool {
        self.waiting.front().map(|(sent, _)| sent.seq_nr) == Some(seq_nr)
    }

    fn request_head(&mut self, attempt: u32, requests: &mut VecDeque<StoreRequest<M>>) {
        if let Some((sent, _)) = self.waiting.front() {
            self.attempt = Some(attempt);
            requests.push_back(StoreRequest::StoreMessageSent {
                sent: sent.clone(),
                attempt,
            });
        }
    }
}

/// Loading the state failed on `attempt`: it is asked for again, or, after `retry_attempts`,
/// the controller must fail with the error returned.
pub(crate) fn retry_load<M>(
    attempt: u32,
    retry_attempts: u32,
    requests: &mut VecDeque<StoreRequest<M>>,
) -> Result<(), ProducerError> {
    if attempt >= retry_attempts {
        return Err(ProducerError::LoadFailed { attempts: attempt });
    }
    requests.push_back(StoreRequest::LoadState {
        attempt: attempt + 1,
    });
    Ok(())
}
