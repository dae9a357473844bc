//! A sharded entity's task: the entity plus its ShardingConsumerController (one
//! ConsumerController per producer). Messages arrive from the shard region as
//! [`EntityEnvelope`]s naming the node to answer; the entity processes them one at a time with
//! the runner's retries, reports a message it gave up on before confirming it, and answers
//! queries with a JSON snapshot. When the region closes its inbox (passivation, hand-off) it
//! finishes the messages its controllers hold, then returns. Before its first message it
//! recovers its stored state. Quiet for `hibernate_after`, holding and owing nothing, it goes
//! dormant: it returns the entity alone, and its next message starts it from there.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, warn};

use crate::cluster::member::NodeAddr;
use crate::cluster::transport::Outbox;
use crate::delivery::protocol::SeqNr;
use crate::delivery::protocol::{ProducerId, ProducerRef, SequencedMessage};
use crate::delivery::sharding::ShardingConsumerController;
use crate::delivery::sharding::driver::{Rejection, ToProducer};
use crate::entity::runner::{
    ActiveGuard, EntityMetrics, GaugeFlag, NotProcessed, RunnerSettings, process, recover,
};
use crate::entity::{Entity, EntityFactory, EntityMessage};
use crate::ids::EntityId;
use crate::sharding::driver::{Ended, EntityFailure, EntityRun, EntitySpawner, EntityStart, Inbox};
use crate::telemetry::{JOURNEY, continue_trace};
use crate::timer::sleep_until;

/// What travels to a sharded entity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntityEnvelope<M> {
    /// A reliable-delivery message; answers go to `reply_to`.
    Sequenced {
        /// The node of the producer's controller.
        reply_to: NodeAddr,
        /// The message.
        message: SequencedMessage<M>,
    },
    /// "Send me your state."
    Query {
        /// The asking node.
        reply_to: NodeAddr,
        /// The asker's key for the answer.
        request: u64,
    },
}

/// An entity's answer to a query.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryReply {
    /// The asker's key.
    pub request: u64,
    /// The entity's snapshot as JSON text.
    #[serde(with = "serde_bytes")]
    pub snapshot: Vec<u8>,
}

/// Starts tasks for entities made by `factory`; they answer producers through `to_producer`
/// and queries through `to_asker`.
pub fn sharded_entities<F>(
    factory: Arc<F>,
    settings: Arc<RunnerSettings>,
    to_producer: Outbox<ToProducer>,
    to_asker: Outbox<QueryReply>,
    metrics: EntityMetrics,
) -> EntitySpawner<EntityEnvelope<<F::Entity as Entity>::Message>>
where
    F: EntityFactory,
    <F::Entity as Entity>::Message: Clone,
    <F::Entity as Entity>::Snapshot: Serialize,
{
    let links = Links {
        to_producer,
        to_asker,
    };
    Arc::new(move |start: EntityStart<_>| -> EntityRun<_> {
        // A dormant entity's state is its own type: nothing else reaches this spawner.
        let dormant = start
            .dormant
            .and_then(|state| state.downcast::<F::Entity>().ok());
        let (entity, recovered) = match dormant {
            Some(entity) => (*entity, true),
            None => (factory.create(&start.id), false),
        };
        let task = EntityTask {
            consumer: ShardingConsumerController::new(settings.consumer.clone()),
            producers: Producers::new(settings.consumer.flow_control_window),
            id: start.id,
            entity,
            settings: Arc::clone(&settings),
            links: links.clone(),
            metrics: metrics.clone(),
        };
        Box::pin(run(task, recovered, start.inbox, start.hibernate_after))
    })
}

async fn run<E>(
    mut task: EntityTask<E>,
    recovered: bool,
    mut inbox: Inbox<EntityEnvelope<E::Message>>,
    hibernate_after: Duration,
) -> Result<Ended<EntityEnvelope<E::Message>>, EntityFailure>
where
    E: Entity,
    E::Message: Clone,
    E::Snapshot: Serialize,
{
    let _active = ActiveGuard::new(&task.metrics.active);
    if !recovered {
        // Messages wait in the inbox (and unconfirmed at their producer) while this loads.
        // A trace of its own (no message started it): claiming and loading show up under it.
        let id = task.id.as_str();
        let recovering = tracing::info_span!(target: JOURNEY, "warren.entity.recover", entity = id);
        // Boxed: the future a store call builds is large, and lives only while loading.
        Box::pin(recover(&task.id, &mut task.entity, &task.settings))
            .instrument(recovering)
            .await;
    }
    let mut open = true;
    let mut last_active = Instant::now();
    loop {
        // Taken before the next delivery, so a query is answered between two messages, not
        // after everything the controllers hold.
        while open {
            match inbox.try_recv() {
                Ok(envelope) => task.on_envelope(*envelope),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        task.answer_producers();
        if task.process_next().await? {
            last_active = Instant::now();
            continue;
        }
        if !open {
            break;
        }
        let hibernate_at =
            (!hibernate_after.is_zero() && task.is_quiet()).then(|| last_active + hibernate_after);
        tokio::select! {
            // A message that is there, or the inbox closing, before going dormant.
            biased;
            envelope = inbox.recv() => match envelope {
                Some(envelope) => {
                    last_active = Instant::now();
                    task.on_envelope(*envelope);
                }
                // Asked to stop: finish what the controllers hold first.
                None => open = false,
            },
            _ = sleep_until(task.consumer.poll_timeout()) => {
                task.consumer.handle_timeout(Instant::now());
            }
            _ = sleep_until(hibernate_at) => {
                let state = Box::new(task.entity);
                return Ok(Ended::Dormant { inbox, state });
            }
        }
    }
    Ok(Ended::Stopped)
}

/// Where an entity's answers go: its producers' nodes, and whoever asked for its snapshot.
#[derive(Clone)]
struct Links {
    to_producer: Outbox<ToProducer>,
    to_asker: Outbox<QueryReply>,
}

/// One running entity: the entity, its ShardingConsumerController and the producers it
/// answers.
struct EntityTask<E: Entity> {
    id: EntityId,
    entity: E,
    consumer: ShardingConsumerController<E::Message>,
    /// Where each producer's controller lives, and which incarnation of it spoke last.
    producers: Producers,
    settings: Arc<RunnerSettings>,
    links: Links,
    metrics: EntityMetrics,
}

impl<E> EntityTask<E>
where
    E: Entity,
    E::Message: Clone,
    E::Snapshot: Serialize,
{
    /// Hands a message to the controllers, or answers a query with the entity's snapshot.
    fn on_envelope(&mut self, envelope: EntityEnvelope<E::Message>) {
        match envelope {
            EntityEnvelope::Sequenced { reply_to, message } => {
                self.producers
                    .heard_from(reply_to, &message.producer, message.seq_nr);
                self.consumer.handle_message(message, Instant::now());
            }
            EntityEnvelope::Query { reply_to, request } => {
                match serde_json::to_vec(&self.entity.snapshot()) {
                    Ok(snapshot) => {
                        (self.links.to_asker)(&reply_to, QueryReply { request, snapshot });
                    }
                    Err(error) => {
                        warn!(entity = %self.id, %error, "query unanswered: snapshot does not serialize");
                    }
                }
            }
        }
    }

    /// Holds and owes nothing, so it may go dormant: its controllers are quiet and every
    /// rejection has reached its producer.
    fn is_quiet(&self) -> bool {
        self.consumer.is_quiet() && self.producers.owe_nothing()
    }

    /// Sends what the controllers have for their producers (demand, confirmations), with
    /// every rejection a producer has not acknowledged yet.
    fn answer_producers(&mut self) {
        while let Some((to, frame)) = self.consumer.poll_transmit() {
            if let Some(producer) = self.producers.get(&to.id) {
                let answer = ToProducer {
                    entity: self.id.clone(),
                    to,
                    frame,
                    rejected: producer.rejected.clone(),
                };
                (self.links.to_producer)(&producer.node, answer);
            }
        }
    }

    /// Processes the next delivery, if one is ready, and confirms it; false when none was.
    async fn process_next(&mut self) -> Result<bool, EntityFailure> {
        let Some(delivery) = self.consumer.poll_event() else {
            return Ok(false);
        };
        let (settings, metrics) = (&self.settings, &self.metrics);
        let mut processing = GaugeFlag::new(&metrics.processing);
        processing.set(true);
        let started = Instant::now();
        let span = handle_span(&self.id, delivery.message.trace_context());
        let processed = process(&mut self.entity, &delivery.message, settings, metrics)
            .instrument(span.clone())
            .await;
        metrics
            .handle_seconds
            .observe(started.elapsed().as_secs_f64());
        drop(processing);
        span.record(
            "outcome",
            match &processed {
                Ok(()) => "confirmed",
                Err(NotProcessed::Fenced(_)) => "fenced",
                Err(NotProcessed::GaveUp(_)) => "gave_up",
                Err(NotProcessed::Rejected(_)) => "rejected",
            },
        );
        let rejected = match processed {
            Ok(()) => None,
            // Its state may be stale; the message goes to the incarnation that fenced it.
            Err(NotProcessed::Fenced(reason)) => return Err(EntityFailure::Fenced(reason)),
            Err(NotProcessed::GaveUp(reason)) => {
                warn!(entity = %self.id, %reason, "giving up on a message");
                Some(reason)
            }
            // The entity's own verdict, not a fault: dead-lettered without a warning.
            Err(NotProcessed::Rejected(reason)) => {
                debug!(entity = %self.id, %reason, "the entity refused a message");
                Some(reason)
            }
        };
        if let Some(reason) = rejected {
            // Sent with every frame to its producer from the confirmation on, until the
            // producer has shown it got one.
            let rejection = Rejection {
                seq_nr: delivery.seq_nr,
                reason,
            };
            self.producers.reject(&delivery.producer_id, rejection);
        }
        // One delivery per producer is outstanding, and this is it.
        let _ = self.consumer.confirm(&delivery.producer_id, Instant::now());
        Ok(true)
    }
}

/// The `warren.entity.handle` span of one message (retries and storing included), in the trace
/// the message carries (see [`crate::telemetry::traces`]); disabled unless traces are exported.
fn handle_span(entity: &EntityId, trace_context: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        target: JOURNEY,
        "warren.entity.handle",
        entity = entity.as_str(),
        outcome = tracing::field::Empty,
    );
    continue_trace(&span, trace_context);
    span
}

/// The producers an entity has heard from: usually one or two, so a Vec sized exactly
/// (a map keeps room for several in every idle entity).
struct Producers {
    known: Vec<Producer>,
    /// The consumer side's flow-control window, which bounds how long a rejection rides along.
    window: u64,
}

struct Producer {
    /// Where its controller lives.
    node: NodeAddr,
    /// Which incarnation of it spoke last.
    producer: ProducerRef,
    /// Messages of it this entity gave up on, resent with every frame until it has shown it
    /// has them.
    rejected: Vec<Rejection>,
}

impl Producers {
    fn new(window: u32) -> Self {
        Producers {
            known: Vec::new(),
            window: u64::from(window),
        }
    }

    fn get(&self, id: &ProducerId) -> Option<&Producer> {
        self.known.iter().find(|p| p.producer.id == *id)
    }

    /// A message `seq_nr` came from `producer` on `node`. A producer sends past
    /// `confirmed + window` only after it got a frame confirming that much, and every frame
    /// sent after a rejection carries it: a rejection `window` or more behind `seq_nr` has
    /// arrived. (Twice the window, to stay clear of the edge.)
    fn heard_from(&mut self, node: NodeAddr, producer: &ProducerRef, seq_nr: SeqNr) {
        let window = self.window;
        match self.known.iter_mut().find(|p| p.producer.id == producer.id) {
            Some(known) => {
                if known.producer != *producer {
                    // A new incarnation knows nothing of the old one's messages.
                    known.rejected = Vec::new();
                    known.producer = producer.clone();
                }
                known.node = node;
                known
                    .rejected
                    .retain(|r| r.seq_nr.0.saturating_add(2 * window) > seq_nr.0);
            }
            None => {
                self.known.reserve_exact(1);
                self.known.push(Producer {
                    node,
                    producer: producer.clone(),
                    rejected: Vec::new(),
                });
            }
        }
    }

    /// No rejection still rides along to a producer.
    fn owe_nothing(&self) -> bool {
        self.known.iter().all(|p| p.rejected.is_empty())
    }

    fn reject(&mut self, id: &ProducerId, rejection: Rejection) {
        if let Some(producer) = self.known.iter_mut().find(|p| p.producer.id == *id) {
            producer.rejected.push(rejection);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::member::NodeId;

    fn node() -> NodeAddr {
        NodeAddr {
            id: NodeId::new("n1"),
            generation: 1,
        }
    }

    fn producer(incarnation: u64) -> ProducerRef {
        ProducerRef {
            id: ProducerId::new("p"),
            incarnation,
        }
    }

    fn rejected(producers: &Producers) -> Vec<u64> {
        let producer = producers.get(&ProducerId::new("p")).unwrap();
        producer.rejected.iter().map(|r| r.seq_nr.0).collect()
    }

    /// Window 10; incarnation 1 of producer "p" sent `seq_nr` and the entity gave up on it.
    fn with_rejection(seq_nr: u64) -> Producers {
        let mut producers = Producers::new(10);
        producers.heard_from(node(), &producer(1), SeqNr(seq_nr));
        let rejection = Rejection {
            seq_nr: SeqNr(seq_nr),
            reason: "no".into(),
        };
        producers.reject(&ProducerId::new("p"), rejection);
        producers
    }

    #[test]
    fn a_rejection_rides_along_until_the_producer_is_two_windows_past_it() {
        let mut producers = with_rejection(3);
        producers.heard_from(node(), &producer(1), SeqNr(22));
        assert_eq!(rejected(&producers), vec![3]);
        producers.heard_from(node(), &producer(1), SeqNr(23));
        assert!(rejected(&producers).is_empty());
    }

    #[test]
    fn a_new_incarnation_of_the_producer_forgets_the_old_ones_rejections() {
        let mut producers = with_rejection(1);
        producers.heard_from(node(), &producer(2), SeqNr(1));
        assert!(rejected(&producers).is_empty());
    }
}
