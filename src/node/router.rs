//! Hands every message that arrives from the cluster to the part of the node it is for.
//!
//! Backpressure policy, one rule: a message is **awaited** into its part's queue only where
//! dropping it would cost the protocol more than waiting (entity traffic, answers to this
//! node's producer); everywhere the other side asks again on its own (singleton handover,
//! the coordinator, `/cluster` questions) it is **dropped when the queue is full**, so a part
//! that is behind never holds the router up for those. Waiting on an awaited queue pushes back
//! on the senders through the links' bounded queues and TCP, which is the flow control those
//! messages need anyway.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug};

use crate::cluster::singleton::SingletonMsg;
use crate::cluster::transport::{Inbound, TransportHandle};
use crate::delivery::sharding::driver::ToProducer;
use crate::entity::EntityMessage;
use crate::node::journey;
use crate::node::queries::{Answer, Queries};
use crate::node::status::shard_numbers;
use crate::node::wire::NodeMsg;
use crate::sharding::ShardingMsg;
use crate::sharding::driver::{CoordinatorSlot, RegionHandle};
use crate::sharding::entities::EntityEnvelope;

/// Where each kind of message goes.
pub(crate) struct Router<M> {
    /// Singleton handover. Dropped when full: the oldest node asks again every retry interval
    /// and `Released` answers every ask.
    pub(crate) singletons: mpsc::Sender<Inbound<SingletonMsg>>,
    /// The coordinator, when it runs here. Dropped when full or absent: regions register and
    /// ask for shard homes again until answered.
    pub(crate) coordinator: CoordinatorSlot,
    /// The region: messages for entities and the coordinator's orders. Awaited: entity traffic
    /// dropped here would come back only as resends after a timeout, so a busy region slows
    /// its senders instead.
    pub(crate) region: RegionHandle<EntityEnvelope<M>>,
    /// Entities' answers to this node's sharding producer. Awaited: the producer's task never
    /// waits on the router, so this queue always drains, and a lost confirmation would hold a
    /// delivery until its resend.
    pub(crate) answers: mpsc::Sender<ToProducer>,
    /// Questions this node asked. Never waits: an answer is handed to its asker at once.
    pub(crate) queries: Arc<Queries>,
    /// To answer other nodes' questions. Never waits: the transport queues or drops (the
    /// asker gives up after its timeout).
    pub(crate) transport: TransportHandle<NodeMsg<M>>,
}

impl<M: EntityMessage + Clone> Router<M> {
    /// Routes until the node stops or the transport closes.
    pub(crate) async fn run(
        self,
        mut inbound: mpsc::Receiver<Inbound<NodeMsg<M>>>,
        shutdown: CancellationToken,
    ) {
        loop {
            let Inbound { from, message } = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = inbound.recv() => match next {
                    Some(inbound) => inbound,
                    None => return,
                },
            };
            match message {
                NodeMsg::Singleton(message) => {
                    if self.singletons.try_send(Inbound { from, message }).is_err() {
                        debug!("singleton manager busy: handover message dropped");
                    }
                }
                NodeMsg::Sharding(ShardingMsg::ToCoordinator(message)) => {
                    self.coordinator.deliver(from, message);
                }
                NodeMsg::Sharding(message) => {
                    let span = journey::receive_span(&message);
                    let _ = self
                        .region
                        .handle_remote(from, message)
                        .instrument(span)
                        .await;
                }
                NodeMsg::ToProducer(answer) => {
                    let _ = self.answers.send(answer).await;
                }
                NodeMsg::ShardsRequest { request } => {
                    let shards = shard_numbers(&self.region.status().borrow());
                    self.transport
                        .send(&from, NodeMsg::ShardsReply { request, shards });
                }
                NodeMsg::ShardsReply { request, shards } => {
                    self.queries.answer(request, Answer::Shards(shards));
                }
                NodeMsg::QueryReply(reply) => {
                    self.queries
                        .answer(reply.request, Answer::Snapshot(reply.snapshot));
                }
            }
        }
    }
}
