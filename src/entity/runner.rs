//! One entity's task: it owns the entity and its ConsumerController, delivers messages to the
//! entity one at a time, retries a failing message in place with backoff (so later messages of
//! the same entity wait behind it and order holds), and confirms only after the entity
//! succeeded or the retries ran out. A message that ran out of retries is reported as rejected
//! *before* it is confirmed, on the same channel as the protocol frames, so the bridge knows to
//! dead-letter it when the confirmation arrives.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use prometheus::{IntCounter, IntGauge};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::delivery::{
    ConsumerController, ConsumerEvent, ConsumerFrame, ConsumerSettings, ProducerRef,
    SequencedMessage,
};
use crate::entity::{Entity, EntityId};
use crate::timer::sleep_until;

/// What the bridge sends an entity: the message plus the key under which the bridge tracks it.
#[derive(Debug)]
pub struct Envelope<M> {
    /// The bridge's key for the delivery, echoed back in a rejection.
    pub correlation: u64,
    /// The message itself.
    pub message: M,
}

/// What entities send back to the bridge, in order per entity.
#[derive(Debug)]
pub enum EntityReply {
    /// A reliable-delivery frame for the entity's producer.
    Frame {
        /// The entity that sent it.
        entity: EntityId,
        /// The producer it is for.
        to: ProducerRef,
        /// The frame.
        frame: ConsumerFrame,
    },
    /// The entity gave up on a message; its confirmation follows.
    Rejected {
        /// The entity that gave up.
        entity: EntityId,
        /// The envelope's correlation key.
        correlation: u64,
        /// Why, for the `x-warren-error` header.
        reason: String,
    },
}

/// How entities run.
#[derive(Clone, Debug)]
pub struct RunnerSettings {
    /// The consumer side of reliable delivery.
    pub consumer: ConsumerSettings,
    /// Attempts per message, the first included, before it is rejected.
    pub max_attempts: u32,
    /// First pause between attempts.
    pub retry_backoff_min: Duration,
    /// Longest pause between attempts.
    pub retry_backoff_max: Duration,
}

/// Entity-side counters.
#[derive(Clone, Debug)]
pub struct EntityMetrics {
    /// Attempts beyond the first.
    pub retries: IntCounter,
    /// Entity tasks running.
    pub active: IntGauge,
    /// Frames dropped because an entity's inbox was full (the protocol resends them).
    pub inbox_drops: IntCounter,
}

/// Input to an entity task.
pub(crate) enum Input<E: Entity> {
    Message(SequencedMessage<Arc<Envelope<E::Message>>>),
    Query(oneshot::Sender<E::Snapshot>),
}

/// Runs one entity until shutdown, until its inbox closes, or until the bridge is gone.
pub(crate) async fn run<E: Entity>(
    id: EntityId,
    mut entity: E,
    mut inbox: mpsc::Receiver<Input<E>>,
    replies: mpsc::Sender<EntityReply>,
    settings: Arc<RunnerSettings>,
    metrics: EntityMetrics,
    shutdown: CancellationToken,
) {
    let _active = ActiveGuard::new(&metrics.active);
    let mut consumer: ConsumerController<Arc<Envelope<E::Message>>> =
        ConsumerController::new(settings.consumer.clone(), Instant::now());
    consumer.start(Instant::now());
    loop {
        if !send_frames(&id, &mut consumer, &replies).await {
            break;
        }
        match consumer.poll_event() {
            Some(ConsumerEvent::Deliver(delivery)) => {
                let envelope = delivery.message;
                let outcome = tokio::select! {
                    // Abandoned unconfirmed: the bridge never acks it, so the broker gets it
                    // back when the channel closes.
                    _ = shutdown.cancelled() => break,
                    outcome = process(&mut entity, &envelope.message, &settings, &metrics) => outcome,
                };
                if let Err(reason) = outcome {
                    warn!(entity = %id, %reason, "giving up on a message; it will be dead-lettered");
                    let rejected = EntityReply::Rejected {
                        entity: id.clone(),
                        correlation: envelope.correlation,
                        reason,
                    };
                    if replies.send(rejected).await.is_err() {
                        break;
                    }
                }
                // Only one delivery is ever outstanding, so this cannot fail.
                let _ = consumer.confirm(Instant::now());
                continue;
            }
            Some(ConsumerEvent::Stopped) => break,
            None => {}
        }
        let timeout = consumer.poll_timeout();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                consumer.stop();
                send_frames(&id, &mut consumer, &replies).await;
                break;
            }
            input = inbox.recv() => match input {
                Some(Input::Message(message)) => consumer.handle_message(message, Instant::now()),
                Some(Input::Query(reply)) => {
                    let _ = reply.send(entity.snapshot());
                }
                None => {
                    consumer.stop();
                    send_frames(&id, &mut consumer, &replies).await;
                    break;
                }
            },
            _ = sleep_until(timeout) => consumer.handle_timeout(Instant::now()),
        }
    }
    debug!(entity = %id, "entity stopped");
}

/// Sends the controller's frames to the bridge; false when the bridge is gone.
async fn send_frames<M: Clone + 'static>(
    id: &EntityId,
    consumer: &mut ConsumerController<M>,
    replies: &mpsc::Sender<EntityReply>,
) -> bool {
    while let Some((to, frame)) = consumer.poll_transmit() {
        let reply = EntityReply::Frame {
            entity: id.clone(),
            to,
            frame,
        };
        if replies.send(reply).await.is_err() {
            return false;
        }
    }
    true
}

pub(crate) async fn process<E: Entity>(
    entity: &mut E,
    message: &E::Message,
    settings: &RunnerSettings,
    metrics: &EntityMetrics,
) -> Result<(), String> {
    let mut pauses = ExponentialBuilder::default()
        .with_min_delay(settings.retry_backoff_min)
        .with_max_delay(settings.retry_backoff_max)
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempt = 1;
    loop {
        match entity.handle(message).await {
            Ok(()) => return Ok(()),
            Err(error) if attempt < settings.max_attempts => {
                metrics.retries.inc();
                let pause = pauses.next().unwrap_or(settings.retry_backoff_max);
                tokio::time::sleep(pause).await;
                attempt += 1;
                debug!(attempt, %error, "retrying");
            }
            Err(error) => {
                return Err(format!(
                    "processing failed after {attempt} attempts: {error}"
                ));
            }
        }
    }
}

/// Counts a running entity in `warren_entities_active`, however its task ends (a panic too).
pub(crate) struct ActiveGuard(prometheus::IntGauge);

impl ActiveGuard {
    pub(crate) fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        ActiveGuard(gauge.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
