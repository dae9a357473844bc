//! Tokio driver of the ShardingProducerController: one task owns the core; the producer asks
//! through a [`ShardingProducerHandle`], messages go to entities through a function the node
//! provides (its shard region), and the entities' answers come back on a channel.
//!
//! Pacing: the task takes the next message from its handles only once the controller is
//! active (a durable one has loaded its state) and while the messages waiting for entities
//! without demand (or for storage) stay below `buffer_size`, so a producer that asks faster than
//! entities confirm waits in `ask` instead of growing memory or failing the controller.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::delivery::driver::store::{self, CleanupSchedule, NoQueue, StoreOp};
use crate::delivery::durable::{DurableProducerQueue, StoreClient};
use crate::delivery::protocol::{ConsumerFrame, ProducerRef, SeqNr, SequencedMessage};
use crate::delivery::sharding::producer::{ShardingProducerController, ShardingProducerEvent};
use crate::ids::EntityId;
use crate::timer::sleep_until;

/// A message an entity gave up on, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The message.
    pub seq_nr: SeqNr,
    /// Why.
    pub reason: String,
}

/// An entity's reliable-delivery frame on its way to the controller `to`, with the
/// rejections of messages it may confirm: they travel in one message, so a confirmation never
/// arrives without the verdict on what it confirms (a lost frame loses both, and the resent
/// confirmation carries the rejections again).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToProducer {
    /// The entity answering.
    pub entity: EntityId,
    /// The controller (child of a ShardingProducerController) it answers.
    pub to: ProducerRef,
    /// The frame.
    pub frame: ConsumerFrame,
    /// Messages of `to` the entity gave up on and may have confirmed.
    pub rejected: Vec<Rejection>,
}

/// How a message sent with [`ShardingProducerHandle::ask`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AskOutcome {
    /// The entity processed and confirmed it.
    Confirmed,
    /// The entity gave up on it, for this reason.
    Rejected(String),
}

/// Why an ask has no outcome.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The controller stopped (shutdown, or it failed; see the log).
    #[error("the sharding producer controller has stopped")]
    Stopped,
}

/// The way from the sharding producer to its entities (on a node: the shard region, which
/// finds where each entity lives).
pub trait ToEntities<M>: Send + Sync + 'static {
    /// Sends `message` towards `entity`; waits while the way is busy, which holds the producer
    /// back instead of queueing without bound.
    fn deliver(
        &self,
        entity: EntityId,
        message: SequencedMessage<M>,
    ) -> impl Future<Output = ()> + Send;
}

struct Ask<M> {
    entity: EntityId,
    message: M,
    reply: Option<oneshot::Sender<AskOutcome>>,
}

/// Sends through one ShardingProducerController; cheap to clone. When every clone is gone, the
/// controller finishes what it took (until confirmed) and then stops.
pub struct ShardingProducerHandle<M> {
    asks: mpsc::Sender<Ask<M>>,
    wake: mpsc::Sender<Duration>,
}

impl<M> Clone for ShardingProducerHandle<M> {
    fn clone(&self) -> Self {
        ShardingProducerHandle {
            asks: self.asks.clone(),
            wake: self.wake.clone(),
        }
    }
}

impl<M: Send + 'static> ShardingProducerHandle<M> {
    /// Sends `message` to `entity` and waits until the entity confirmed or rejected it (with a
    /// durable queue: until the message is stored; a rejection is then not reported).
    pub async fn ask(&self, entity: EntityId, message: M) -> Result<AskOutcome, AskError> {
        self.submit(entity, message).await?.await
    }

    /// Queues `message` for `entity` (in order with earlier calls) and returns a future of
    /// its outcome, so a producer can keep many messages in flight while order holds.
    pub async fn submit(&self, entity: EntityId, message: M) -> Result<Outcome, AskError> {
        Ok(self.reserve().await?.submit(entity, message))
    }

    /// Waits until the controller takes one more message; the permit then submits it at once.
    pub async fn reserve(&self) -> Result<SubmitPermit<'_, M>, AskError> {
        let permit = self.asks.reserve().await.map_err(|_| AskError::Stopped)?;
        Ok(SubmitPermit { permit })
    }

    /// A permit if the controller takes one more message now, `None` if it is busy.
    pub fn try_reserve(&self) -> Result<Option<SubmitPermit<'_, M>>, AskError> {
        match self.asks.try_reserve() {
            Ok(permit) => Ok(Some(SubmitPermit { permit })),
            Err(mpsc::error::TrySendError::Full(())) => Ok(None),
            Err(mpsc::error::TrySendError::Closed(())) => Err(AskError::Stopped),
        }
    }

    /// Resends the first unconfirmed message of every entity silent for `idle_for` now (see
    /// [`ShardingProducerController::wake_idle`]).
    pub fn wake_idle(&self, idle_for: Duration) {
        let _ = self.wake.try_send(idle_for);
    }

    /// Sends `message` to `entity` without waiting for its confirmation.
    pub async fn send(&self, entity: EntityId, message: M) -> Result<(), AskError> {
        let ask = Ask {
            entity,
            message,
            reply: None,
        };
        self.asks.send(ask).await.map_err(|_| AskError::Stopped)
    }
}

/// Room for one message at the controller, from [`ShardingProducerHandle::reserve`].
pub struct SubmitPermit<'a, M> {
    permit: mpsc::Permit<'a, Ask<M>>,
}

impl<M> SubmitPermit<'_, M> {
    /// Queues `message` for `entity` and returns its [`Outcome`].
    pub fn submit(self, entity: EntityId, message: M) -> Outcome {
        let (reply, outcome) = oneshot::channel();
        self.permit.send(Ask {
            entity,
            message,
            reply: Some(reply),
        });
        Outcome(outcome)
    }
}

/// How a submitted message ends, once its entity confirmed or rejected it. A named future
/// (not a boxed one), so a caller keeping many in flight allocates nothing more per message.
pub struct Outcome(oneshot::Receiver<AskOutcome>);

impl Future for Outcome {
    type Output = Result<AskOutcome, AskError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|outcome| outcome.map_err(|_| AskError::Stopped))
    }
}

type Core<M> = ShardingProducerController<M, oneshot::Sender<AskOutcome>>;

/// Starts the task of `core`, a controller without a durable queue. It runs until
/// `shutdown` or until the core fails.
pub fn spawn_sharding_producer<M>(
    core: Core<M>,
    buffer_size: usize,
    to_entity: impl ToEntities<M>,
    answers: mpsc::Receiver<ToProducer>,
    resends: IntCounter,
    shutdown: CancellationToken,
) -> ShardingProducerHandle<M>
where
    M: Clone + Send + 'static,
{
    spawn_durable_sharding_producer(
        core,
        None::<NoQueue>,
        buffer_size,
        to_entity,
        answers,
        resends,
        shutdown,
    )
}

/// Starts the task of `core` (built `with_durable_queue` when `queue` is given): every message
/// is stored before it is routed, and a restarted controller resends what was stored and not
/// confirmed. On `shutdown` the queue is flushed.
pub fn spawn_durable_sharding_producer<M, Q>(
    core: Core<M>,
    queue: Option<Q>,
    buffer_size: usize,
    to_entity: impl ToEntities<M>,
    answers: mpsc::Receiver<ToProducer>,
    resends: IntCounter,
    shutdown: CancellationToken,
) -> ShardingProducerHandle<M>
where
    M: Clone + Send + 'static,
    Q: DurableProducerQueue<M>,
{
    let (asks, asks_rx) = mpsc::channel(64);
    let (wake, wake_rx) = mpsc::channel(4);
    let inputs = Inputs {
        asks: asks_rx,
        wake: wake_rx,
        answers,
        resends,
    };
    let durable = Durable {
        cleanup: CleanupSchedule::new(
            queue.is_some(),
            settings_cleanup_after(&core),
            Instant::now(),
        ),
        queue: queue.map(Arc::new),
        ops: FuturesUnordered::new(),
    };
    tokio::spawn(run(core, durable, buffer_size, to_entity, inputs, shutdown));
    ShardingProducerHandle { asks, wake }
}

struct Inputs<M> {
    asks: mpsc::Receiver<Ask<M>>,
    wake: mpsc::Receiver<Duration>,
    answers: mpsc::Receiver<ToProducer>,
    /// `warren_delivery_resends_total`.
    resends: IntCounter,
}

/// The durable queue and its operations in flight.
struct Durable<M, Q> {
    queue: Option<Arc<Q>>,
    ops: FuturesUnordered<StoreOp<M>>,
    cleanup: CleanupSchedule,
}

fn settings_cleanup_after<M: Clone + 'static>(core: &Core<M>) -> Duration {
    core.settings().durable_queue.cleanup_unused_after
}

async fn run<M: Clone + Send + 'static, Q: DurableProducerQueue<M>>(
    mut core: Core<M>,
    mut durable: Durable<M, Q>,
    buffer_size: usize,
    to_entity: impl ToEntities<M>,
    mut inputs: Inputs<M>,
    shutdown: CancellationToken,
) {
    core.start(Instant::now());
    let mut resent = 0;
    let mut asks_open = true;
    loop {
        inputs.resends.inc_by(core.resent() - resent);
        resent = core.resent();
        while let Some((entity, message)) = core.poll_transmit() {
            to_entity.deliver(entity, message).await;
        }
        while let Some(event) = core.poll_event() {
            match event {
                ShardingProducerEvent::RequestNext { .. } => {}
                ShardingProducerEvent::Confirmed { token } => {
                    let _ = token.send(AskOutcome::Confirmed);
                }
                ShardingProducerEvent::Rejected { token, reason } => {
                    let _ = token.send(AskOutcome::Rejected(reason));
                }
            }
        }
        while let Some(request) = core.poll_store() {
            if let Some(queue) = &durable.queue {
                let settings = &core.settings().durable_queue;
                durable.ops.push(store::store_op(queue, request, settings));
            }
        }
        if let Some(error) = core.failure() {
            warn!(%error, "sharding producer controller failed");
            break;
        }
        if !asks_open && core.waiting() == 0 && core.unconfirmed() == 0 {
            break;
        }
        let room = asks_open && core.is_active() && core.waiting() < buffer_size;
        let wake_at = [core.poll_timeout(), durable.cleanup.next()]
            .into_iter()
            .flatten()
            .min();
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ask = inputs.asks.recv(), if room => {
                // Every handle is gone: finish what was taken, then stop.
                let Some(ask) = ask else {
                    asks_open = false;
                    continue;
                };
                let now = Instant::now();
                let sent = match ask.reply {
                    Some(reply) => core.send_with_confirmation(ask.entity, ask.message, reply, now),
                    None => core.send(ask.entity, ask.message, now),
                };
                if let Err(error) = sent {
                    warn!(%error, "sharding producer controller failed");
                    break;
                }
            }
            Some(idle_for) = inputs.wake.recv() => core.wake_idle(idle_for, Instant::now()),
            Some(answer) = inputs.answers.recv() => {
                // Verdicts first: the frame may confirm the messages they are about.
                for Rejection { seq_nr, reason } in answer.rejected {
                    core.reject(&answer.entity, &answer.to, seq_nr, reason);
                }
                core.handle_frame(&answer.entity, &answer.to, answer.frame, Instant::now());
            }
            Some(outcome) = durable.ops.next(), if !durable.ops.is_empty() => {
                store::apply(&mut core, outcome);
            }
            _ = sleep_until(wake_at) => {
                let now = Instant::now();
                core.handle_timeout(now);
                if let Some(cleanup) = durable.cleanup.due(durable.queue.as_ref(), now) {
                    durable.ops.push(cleanup);
                }
            }
        }
    }
    store::flush_at_stop(durable.queue.as_deref()).await;
}

#[cfg(test)]
mod tests;
