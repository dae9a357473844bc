//! Runs a core's durable-queue requests against a [`DurableProducerQueue`]: each with the
//! configured timeout, retries after a short doubling pause, timestamps stamped on the way, and
//! the answers routed back to the core. Shared by the producer and work-pulling drivers.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Future;
use tokio::time::Instant;
use tracing::warn;

use crate::delivery::durable::{
    DurableProducerQueue, DurableState, MessageSent, StoreClient, StoreError, StoreRequest,
    wall_clock_millis,
};
use crate::delivery::protocol::SeqNr;
use crate::delivery::settings::{DurableQueueSettings, timer_interval};

/// What a finished durable-queue operation reports.
pub enum StoreOutcome<M> {
    /// `LoadState` on an attempt.
    Loaded(u32, Result<DurableState<M>, StoreError>),
    /// `StoreMessageSent` of a seq nr on an attempt.
    Stored(SeqNr, u32, Result<(), StoreError>),
    /// A write-behind confirmation or a cleanup.
    Other(Result<(), StoreError>),
}

/// A running durable-queue operation.
pub type StoreOp<M> = Pin<Box<dyn Future<Output = StoreOutcome<M>> + Send>>;

/// Starts `request` against `queue`.
pub fn store_op<M: Send + 'static, Q: DurableProducerQueue<M>>(
    queue: &Arc<Q>,
    request: StoreRequest<M>,
    settings: &DurableQueueSettings,
) -> StoreOp<M> {
    let queue = Arc::clone(queue);
    let timeout = settings.request_timeout;
    let timed_out = move || StoreError::Backend(format!("no answer within {timeout:?}"));
    match request {
        StoreRequest::LoadState { attempt } => Box::pin(async move {
            pause_before_retry(attempt, timeout).await;
            let loaded = tokio::time::timeout(timeout, queue.load_state()).await;
            StoreOutcome::Loaded(attempt, loaded.unwrap_or_else(|_| Err(timed_out())))
        }),
        StoreRequest::StoreMessageSent { sent, attempt } => Box::pin(async move {
            pause_before_retry(attempt, timeout).await;
            let sent = MessageSent {
                timestamp_millis: wall_clock_millis(),
                ..sent
            };
            let seq_nr = sent.seq_nr;
            let stored = tokio::time::timeout(timeout, queue.store_message_sent(sent)).await;
            StoreOutcome::Stored(seq_nr, attempt, stored.unwrap_or_else(|_| Err(timed_out())))
        }),
        StoreRequest::StoreMessageConfirmed { seq_nr, qualifier } => Box::pin(async move {
            let stored = queue
                .store_message_confirmed(seq_nr, &qualifier, wall_clock_millis())
                .await;
            StoreOutcome::Other(stored)
        }),
    }
}

/// When the next cleanup of stale confirmation qualifiers is due: every half
/// `cleanup_unused_after`, with a durable queue only.
pub struct CleanupSchedule {
    next: Option<Instant>,
    unused_after: Duration,
}

impl CleanupSchedule {
    /// The first cleanup half an interval from `now`; none without a queue.
    pub fn new(has_queue: bool, unused_after: Duration, now: Instant) -> Self {
        let unused_after = timer_interval(unused_after);
        CleanupSchedule {
            next: has_queue.then(|| now + unused_after / 2),
            unused_after,
        }
    }

    /// When to wake for it.
    pub fn next(&self) -> Option<Instant> {
        self.next
    }

    /// The cleanup to run when it is due at `now`; schedules the next one.
    pub fn due<M: Send + 'static, Q: DurableProducerQueue<M>>(
        &mut self,
        queue: Option<&Arc<Q>>,
        now: Instant,
    ) -> Option<StoreOp<M>> {
        let queue = Arc::clone(queue?);
        if self.next.is_none_or(|at| at > now) {
            return None;
        }
        self.next = Some(now + self.unused_after / 2);
        let unused_after = self.unused_after;
        Some(Box::pin(async move {
            StoreOutcome::Other(
                queue
                    .cleanup_unused(wall_clock_millis(), unused_after)
                    .await,
            )
        }))
    }
}

/// Feeds an outcome back to its core.
pub fn apply<M, C: StoreClient<M>>(core: &mut C, outcome: StoreOutcome<M>) {
    let now = Instant::now();
    match outcome {
        StoreOutcome::Loaded(_, Ok(state)) => core.handle_state_loaded(state, now),
        StoreOutcome::Loaded(attempt, Err(error)) => {
            warn!(%error, attempt, "durable queue LoadState failed");
            core.handle_load_failed(attempt);
        }
        StoreOutcome::Stored(seq_nr, _, Ok(())) => core.handle_message_stored(seq_nr, now),
        StoreOutcome::Stored(seq_nr, attempt, Err(error)) => {
            warn!(%error, %seq_nr, attempt, "durable queue StoreMessageSent failed");
            core.handle_store_failed(seq_nr, attempt);
        }
        StoreOutcome::Other(Err(error)) => warn!(%error, "durable queue write-behind failed"),
        StoreOutcome::Other(Ok(())) => {}
    }
}

/// A retry waits a little (doubling, at most the request timeout), so a store that fails fast
/// is not hammered through all its attempts at once.
async fn pause_before_retry(attempt: u32, limit: Duration) {
    if attempt > 1 {
        let pause = Duration::from_millis(10)
            .saturating_mul(1 << (attempt - 1).min(16))
            .min(limit);
        tokio::time::sleep(pause).await;
    }
}

/// The store of a controller without a durable queue: never called.
pub struct NoQueue;

impl<M: Send + 'static> DurableProducerQueue<M> for NoQueue {
    async fn load_state(&self) -> Result<DurableState<M>, StoreError> {
        Ok(DurableState::default())
    }

    async fn store_message_sent(&self, _sent: MessageSent<M>) -> Result<(), StoreError> {
        Ok(())
    }

    async fn store_message_confirmed(
        &self,
        _seq_nr: SeqNr,
        _qualifier: &str,
        _timestamp_millis: u64,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    async fn cleanup_unused(
        &self,
        _now_millis: u64,
        _unused_after: Duration,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Writes what the queue holds back before its controller stops, so a restart loads it.
pub async fn flush_at_stop<M, Q: DurableProducerQueue<M>>(queue: Option<&Q>) {
    if let Some(queue) = queue
        && let Err(error) = queue.flush().await
    {
        warn!(%error, "durable queue not flushed at stop");
    }
}
