//! Questions a node asks and waits for an answer to: an entity's snapshot (wherever the entity
//! lives) and the shards another node hosts. Each question gets a key; the router hands the
//! answer carrying that key to the one waiting for it, and a question whose asker gave up is
//! forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::ids::EntityId;

/// An answer to a question.
#[derive(Debug)]
pub(crate) enum Answer {
    /// An entity's snapshot, as JSON.
    Snapshot(Vec<u8>),
    /// The shards a node hosts.
    Shards(Vec<u32>),
}

/// Why a query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No answer in time (the entity's node may be down, or its shard moving).
    #[error("no answer from entity {0} within {1:?}")]
    Timeout(EntityId, Duration),
    /// The node is stopping.
    #[error("the node is stopping")]
    Stopped,
    /// The answer is not JSON.
    #[error("entity {0} answered with an unreadable snapshot: {1}")]
    Unreadable(EntityId, String),
}

/// Questions out, by key.
#[derive(Default)]
pub(crate) struct Queries {
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    next: AtomicU64,
}

impl Queries {
    /// Opens a question; its key goes with the request, its answer comes to the result.
    pub(crate) fn open(&self) -> Pending<'_> {
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.lock().insert(request, tx);
        Pending {
            queries: self,
            request,
            answer: rx,
        }
    }

    /// Hands `answer` to whoever asked question `request`; a late answer is dropped.
    pub(crate) fn answer(&self, request: u64, answer: Answer) {
        if let Some(asker) = self.lock().remove(&request) {
            let _ = asker.send(answer);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<Answer>>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How waiting for an answer ended without one.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unanswered {
    /// The deadline passed.
    TimedOut,
    /// The node stopped.
    Closed,
}

/// One open question; forgotten when dropped, however the wait ended (the asker giving up
/// included).
pub(crate) struct Pending<'a> {
    queries: &'a Queries,
    /// The question's key.
    pub(crate) request: u64,
    answer: oneshot::Receiver<Answer>,
}

impl Pending<'_> {
    /// Waits for the answer until `deadline`.
    pub(crate) async fn answer_by(&mut self, deadline: Instant) -> Result<Answer, Unanswered> {
        match tokio::time::timeout_at(deadline, &mut self.answer).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(Unanswered::Closed),
            Err(_) => Err(Unanswered::TimedOut),
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.queries.lock().remove(&self.request);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_reaches_its_asker_and_a_dropped_question_is_forgotten() {
        let queries = Queries::default();
        let mut first = queries.open();
        let second = queries.open();
        assert_ne!(first.request, second.request);
        queries.answer(first.request, Answer::Shards(vec![3]));
        let answer = first.answer_by(Instant::now()).await;
        assert!(matches!(answer, Ok(Answer::Shards(shards)) if shards == [3]));
        let forgotten = second.request;
        drop(second);
        assert!(queries.lock().get(&forgotten).is_none());
        drop(first);
        assert!(queries.lock().is_empty());
    }
}
