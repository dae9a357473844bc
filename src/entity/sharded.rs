//! A sharded entity's task: the entity plus its ShardingConsumerController (one
//! ConsumerController per producer). Messages arrive from the shard region as
//! [`EntityEnvelope`]s naming the node to answer; the entity processes them one at a time with
//! the runner's retries, reports a message it gave up on before confirming it, and answers
//! queries with a JSON snapshot. When the region closes its inbox (passivation, hand-off) it
//! finishes the messages its controllers hold, then returns. Before its first message it
//! recovers its stored state.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;

use crate::cluster::member::NodeAddr;
use crate::cluster::transport::Outbox;
use crate::delivery::protocol::{ProducerId, ProducerRef, SequencedMessage};
use crate::delivery::sharding::ShardingConsumerController;
use crate::delivery::sharding::driver::{EntityAnswer, ToProducer};
use crate::entity::runner::{ActiveGuard, EntityMetrics, RunnerSettings, process, recover};
use crate::entity::{Entity, EntityFactory, EntityId};
use crate::sharding::driver::{EntitySpawner, EntityTask};
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
    Arc::new(move |id, inbox| -> EntityTask {
        let entity = factory.create(&id);
        Box::pin(run(
            id,
            entity,
            inbox,
            Arc::clone(&settings),
            Arc::clone(&to_producer),
            Arc::clone(&to_asker),
            metrics.clone(),
        ))
    })
}

async fn run<E>(
    id: EntityId,
    mut entity: E,
    mut inbox: mpsc::UnboundedReceiver<Box<EntityEnvelope<E::Message>>>,
    settings: Arc<RunnerSettings>,
    to_producer: Outbox<ToProducer>,
    to_asker: Outbox<QueryReply>,
    metrics: EntityMetrics,
) -> Result<(), String>
where
    E: Entity,
    E::Message: Clone,
    E::Snapshot: Serialize,
{
    let _active = ActiveGuard::new(&metrics.active);
    // Messages wait in the inbox (and unconfirmed at their producer) while this loads.
    recover(&id, &mut entity, &settings).await;
    let mut consumer = ShardingConsumerController::new(settings.consumer.clone());
    // Where each producer's controller lives, and which incarnation of it spoke last.
    let mut producers = Producers::default();
    let mut open = true;
    loop {
        // Taken before the next delivery, so a query is answered between two messages, not
        // after everything the controllers hold.
        while open {
            match inbox.try_recv() {
                Ok(envelope) => on_envelope(
                    *envelope,
                    &id,
                    &entity,
                    &mut consumer,
                    &mut producers,
                    &to_asker,
                ),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => open = false,
            }
        }
        while let Some((to, frame)) = consumer.poll_transmit() {
            if let Some((node, _)) = producers.get(&to.id) {
                let answer = ToProducer {
                    entity: id.clone(),
                    to,
                    answer: EntityAnswer::Frame(frame),
                };
                to_producer(node, answer);
            }
        }
        if let Some(delivery) = consumer.poll_event() {
            if let Err(reason) = process(&mut entity, &delivery.message, &settings, &metrics).await
            {
                warn!(entity = %id, %reason, "giving up on a message");
                if let Some((node, to)) = producers.get(&delivery.producer_id) {
                    let answer = ToProducer {
                        entity: id.clone(),
                        to: to.clone(),
                        answer: EntityAnswer::Rejected {
                            seq_nr: delivery.seq_nr,
                            reason,
                        },
                    };
                    to_producer(node, answer);
                }
            }
            // One delivery per producer is outstanding, and this is it.
            let _ = consumer.confirm(&delivery.producer_id, Instant::now());
            continue;
        }
        if !open {
            break;
        }
        tokio::select! {
            envelope = inbox.recv() => match envelope {
                Some(envelope) => on_envelope(
                    *envelope,
                    &id,
                    &entity,
                    &mut consumer,
                    &mut producers,
                    &to_asker,
                ),
                // Asked to stop: finish what the controllers hold first.
                None => open = false,
            },
            _ = sleep_until(consumer.poll_timeout()) => consumer.handle_timeout(Instant::now()),
        }
    }
    Ok(())
}

/// Hands a message to the controllers, or answers a query with the entity's snapshot.
fn on_envelope<E>(
    envelope: EntityEnvelope<E::Message>,
    id: &EntityId,
    entity: &E,
    consumer: &mut ShardingConsumerController<E::Message>,
    producers: &mut Producers,
    to_asker: &Outbox<QueryReply>,
) where
    E: Entity,
    E::Message: Clone,
    E::Snapshot: Serialize,
{
    match envelope {
        EntityEnvelope::Sequenced { reply_to, message } => {
            producers.insert(reply_to, message.producer.clone());
            consumer.handle_message(message, Instant::now());
        }
        EntityEnvelope::Query { reply_to, request } => {
            match serde_json::to_vec(&entity.snapshot()) {
                Ok(snapshot) => {
                    tracing::debug!(entity = %id, request, "answering a query");
                    to_asker(&reply_to, QueryReply { request, snapshot });
                }
                Err(error) => {
                    warn!(entity = %id, %error, "query unanswered: snapshot does not serialize");
                }
            }
        }
    }
}

/// The producers an entity has heard from: usually one or two, so a Vec sized exactly
/// (a map keeps room for several in every idle entity).
#[derive(Default)]
struct Producers(Vec<(NodeAddr, ProducerRef)>);

impl Producers {
    fn get(&self, id: &ProducerId) -> Option<(&NodeAddr, &ProducerRef)> {
        self.0
            .iter()
            .find(|(_, producer)| producer.id == *id)
            .map(|(node, producer)| (node, producer))
    }

    fn insert(&mut self, node: NodeAddr, producer: ProducerRef) {
        match self.0.iter_mut().find(|(_, known)| known.id == producer.id) {
            Some(entry) => *entry = (node, producer),
            None => {
                self.0.reserve_exact(1);
                self.0.push((node, producer));
            }
        }
    }
}
