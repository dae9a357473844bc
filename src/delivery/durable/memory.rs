//! A durable producer queue that lives in memory: for tests, and for producers that only need
//! to survive a restart of their controller, not of the process.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::delivery::durable::{
    DurableProducerQueue, DurableState, MessageSent, StoreError, accept_confirmed,
    accept_message_sent,
};
use crate::delivery::protocol::SeqNr;

/// In-memory store; clones share the same state (a "restart" keeps it).
#[derive(Debug)]
pub struct InMemoryQueue<M> {
    state: Arc<Mutex<DurableState<M>>>,
}

impl<M> Clone for InMemoryQueue<M> {
    fn clone(&self) -> Self {
        InMemoryQueue {
            state: Arc::clone(&self.state),
        }
    }
}

impl<M> Default for InMemoryQueue<M> {
    fn default() -> Self {
        InMemoryQueue {
            state: Arc::new(Mutex::new(DurableState::default())),
        }
    }
}

impl<M: Clone> InMemoryQueue<M> {
    /// A store that starts from `state` (to test restarts from a given point).
    pub fn with_state(state: DurableState<M>) -> Self {
        InMemoryQueue {
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// The stored state as it is now.
    pub fn snapshot(&self) -> DurableState<M> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DurableState<M>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<M: Clone + Send + Sync + 'static> DurableProducerQueue<M> for InMemoryQueue<M> {
    async fn load_state(&self) -> Result<DurableState<M>, StoreError> {
        let mut state = self.lock();
        state.cleanup_partial_chunked_messages();
        Ok(state.clone())
    }

    async fn store_message_sent(&self, sent: MessageSent<M>) -> Result<(), StoreError> {
        accept_message_sent(&mut self.lock(), sent).map(|_| ())
    }

    async fn store_message_confirmed(
        &self,
        seq_nr: SeqNr,
        qualifier: &str,
        timestamp_millis: u64,
    ) -> Result<(), StoreError> {
        accept_confirmed(&mut self.lock(), seq_nr, qualifier, timestamp_millis);
        Ok(())
    }

    async fn cleanup_unused(
        &self,
        now_millis: u64,
        unused_after: Duration,
    ) -> Result<(), StoreError> {
        let mut state = self.lock();
        let stale = state.stale_qualifiers(now_millis, unused_after);
        state.cleanup(&stale);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::durable::conformance::{StoreLocation, run_all};

    struct Shared(InMemoryQueue<String>);

    impl StoreLocation for Shared {
        type Store = InMemoryQueue<String>;
        fn open(&self) -> InMemoryQueue<String> {
            self.0.clone()
        }
    }

    #[tokio::test]
    async fn passes_the_durable_queue_conformance_suite() {
        run_all(|| Shared(InMemoryQueue::default())).await;
    }
}
