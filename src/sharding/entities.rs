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
use tracing::{error, warn};

use crate::cluster::member::NodeAddr;
use crate::cluster::transport::Outbox;
use crate::delivery::protocol::SeqNr;
use crate::delivery::protocol::{ProducerId, ProducerRef, SequencedMessage};
use crate::delivery::sharding::ShardingConsumerController;
use crate::delivery::sharding::driver::{Rejection, ToProducer};
use crate::entity::runner::{
    ActiveGuard, EntityMetrics, GaugeFlag, NotProcessed, RunnerSettings, process, recover,
};
use crate::entity::{Entity, EntityFactory};
use crate::ids::EntityId;
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
    let mut producers = Producers::new(settings.consumer.flow_control_window);
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
            if let Some(producer) = producers.get(&to.id) {
                let answer = ToProducer {
                    entity: id.clone(),
                    to,
                    frame,
                    rejected: producer.rejected.clone(),
                };
                to_producer(&producer.node, answer);
            }
        }
        if let Some(delivery) = consumer.poll_event() {
            let mut processing = GaugeFlag::new(&metrics.processing);
            processing.set(true);
            let started = Instant::now();
            let processed = process(&mut entity, &delivery.message, &settings, &metrics).await;
            metrics
                .handle_seconds
                .observe(started.elapsed().as_secs_f64());
            drop(processing);
            match processed {
                Ok(()) => {}
                Err(NotProcessed::Fenced(reason)) => {
                    // Its state may be stale; the message goes to the incarnation that fenced
                    // it.
                    error!(entity = %id, %reason, "a newer incarnation owns this entity; stopping");
                    return Err(reason);
                }
                Err(NotProcessed::GaveUp(reason)) => {
                    warn!(entity = %id, %reason, "giving up on a message");
                    // Sent with every frame to its producer from the confirmation on, until the
                    // producer has shown it got one.
                    producers.reject(
                        &delivery.producer_id,
                        Rejection {
                            seq_nr: delivery.seq_nr,
                            reason,
                        },
                    );
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
            producers.heard_from(reply_to, &message.producer, message.seq_nr);
            consumer.handle_message(message, Instant::now());
        }
        EntityEnvelope::Query { reply_to, request } => {
            match serde_json::to_vec(&entity.snapshot()) {
                Ok(snapshot) => {
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
