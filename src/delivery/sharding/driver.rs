//! Tokio driver of the ShardingProducerController: one task owns the core; the producer asks
//! through a [`ShardingProducerHandle`], messages go to entities through a function the node
//! provides (its shard region), and the entities' answers come back on a channel.
//!
//! Pacing: the task takes the next message from its handles only while the messages waiting
//! for entities without demand stay below `buffer_size`, so a producer that asks faster than
//! entities confirm waits in `ask` instead of growing memory or failing the controller.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::delivery::protocol::{ConsumerFrame, ProducerRef, SeqNr, SequencedMessage};
use crate::delivery::sharding::producer::{
    ShardingProducerController, ShardingProducerError, ShardingProducerEvent,
};
use crate::entity::EntityId;
use crate::timer::sleep_until;

/// What an entity's consumer side says to a producer's controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntityAnswer {
    /// A reliable-delivery frame.
    Frame(ConsumerFrame),
    /// The entity gave up on message `seq_nr`; its confirmation follows.
    Rejected {
        /// The message.
        seq_nr: SeqNr,
        /// Why.
        reason: String,
    },
}

/// An entity's answer on its way to the controller `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToProducer {
    /// The entity answering.
    pub entity: EntityId,
    /// The controller (child of a ShardingProducerController) it answers.
    pub to: ProducerRef,
    /// The answer.
    pub answer: EntityAnswer,
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

/// Sends a message towards an entity (through the shard region); waits while the way is busy.
pub type EntitySender<M> = Arc<
    dyn Fn(EntityId, SequencedMessage<M>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync,
>;

struct Ask<M> {
    entity: EntityId,
    message: M,
    reply: Option<oneshot::Sender<AskOutcome>>,
}

/// Sends through one ShardingProducerController; cheap to clone.
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
    /// Sends `message` to `entity` and waits until the entity confirmed or rejected it.
    pub async fn ask(&self, entity: EntityId, message: M) -> Result<AskOutcome, AskError> {
        self.submit(entity, message).await?.await
    }

    /// Queues `message` for `entity` (in order with earlier calls) and returns a future of
    /// its outcome, so a producer can keep many messages in flight while order holds.
    pub async fn submit(
        &self,
        entity: EntityId,
        message: M,
    ) -> Result<impl Future<Output = Result<AskOutcome, AskError>> + use<M>, AskError> {
        let (reply, outcome) = oneshot::channel();
        let ask = Ask {
            entity,
            message,
            reply: Some(reply),
        };
        self.asks.send(ask).await.map_err(|_| AskError::Stopped)?;
        Ok(async move { outcome.await.map_err(|_| AskError::Stopped) })
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

type Core<M> = ShardingProducerController<M, oneshot::Sender<AskOutcome>>;

/// Starts the task of `core` (a controller without a durable queue). It runs until
/// `shutdown` or until the core fails.
pub fn spawn_sharding_producer<M>(
    core: Core<M>,
    buffer_size: usize,
    to_entity: EntitySender<M>,
    answers: mpsc::Receiver<ToProducer>,
    resends: IntCounter,
    shutdown: CancellationToken,
) -> ShardingProducerHandle<M>
where
    M: Clone + Send + 'static,
{
    let (asks, asks_rx) = mpsc::channel(64);
    let (wake, wake_rx) = mpsc::channel(4);
    let inputs = Inputs {
        asks: asks_rx,
        wake: wake_rx,
        answers,
        resends,
    };
    tokio::spawn(run(core, buffer_size, to_entity, inputs, shutdown));
    ShardingProducerHandle { asks, wake }
}

struct Inputs<M> {
    asks: mpsc::Receiver<Ask<M>>,
    wake: mpsc::Receiver<Duration>,
    answers: mpsc::Receiver<ToProducer>,
    /// `warren_delivery_resends_total`.
    resends: IntCounter,
}

async fn run<M: Clone + Send + 'static>(
    mut core: Core<M>,
    buffer_size: usize,
    to_entity: EntitySender<M>,
    mut inputs: Inputs<M>,
    shutdown: CancellationToken,
) {
    core.start(Instant::now());
    let mut resent = 0;
    loop {
        inputs.resends.inc_by(core.resent() - resent);
        resent = core.resent();
        while let Some((entity, message)) = core.poll_transmit() {
            to_entity(entity, message).await;
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
        if let Some(error) = core.failure() {
            warn!(%error, "sharding producer controller failed");
            return;
        }
        let room = core.buffered() < buffer_size;
        let wake_at = core.poll_timeout();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ask = inputs.asks.recv(), if room => {
                let Some(ask) = ask else { return };
                let now = Instant::now();
                let sent = match ask.reply {
                    Some(reply) => core.send_with_confirmation(ask.entity, ask.message, reply, now),
                    None => core.send(ask.entity, ask.message, now),
                };
                if let Err(error) = sent {
                    report(&error);
                    return;
                }
            }
            Some(idle_for) = inputs.wake.recv() => core.wake_idle(idle_for, Instant::now()),
            Some(answer) = inputs.answers.recv() => {
                let now = Instant::now();
                match answer.answer {
                    EntityAnswer::Frame(frame) => core.handle_frame(&answer.entity, &answer.to, frame, now),
                    EntityAnswer::Rejected { seq_nr, reason } => core.reject(&answer.entity, &answer.to, seq_nr, reason),
                }
            }
            _ = sleep_until(wake_at), if wake_at.is_some() => core.handle_timeout(Instant::now()),
        }
    }
}

fn report(error: &ShardingProducerError) {
    warn!(%error, "sharding producer controller failed");
}
