//! A cluster node, composed: membership (gossip), the transport (authenticated links), the
//! singleton manager (running the shard coordinator on the oldest shard host), the shard
//! region with this node's entities, and a ShardingProducerController through which this node
//! sends to entities wherever they live. Every part gets the same [`NodeContext`]; the
//! router hands every message that arrives to the part it is for.
//!
//! [`ClusterNode::leave`] is the graceful way out: announce Leaving, let the coordinator move
//! this node's shards and the singleton move to the next oldest node, then stop.

mod journey;
mod queries;
mod router;
pub mod settings;
mod status;
mod wire;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::Security;
use crate::cluster::context::NodeContext;
use crate::cluster::lease::Lease;
use crate::cluster::member::{ClusterView, Member, MemberStatus, NodeAddr, NodeId};
use crate::cluster::membership::downing::DownReason;
use crate::cluster::membership::join::JoinState;
use crate::cluster::membership::{Membership, MembershipError};
use crate::cluster::singleton::driver::{
    self as singletons, SingletonHandle, SingletonSettings, SingletonSpec,
};
use crate::cluster::singleton::{Placement, SingletonMsg};
use crate::cluster::transport::{self, Inbound, LinkTls, TransportHandle};
use crate::config::ConfigError;
use crate::delivery::durable::wall_clock_millis;
use crate::delivery::protocol::{ProducerId, SequencedMessage};
use crate::delivery::settings::DeliverySettings;
use crate::delivery::sharding::driver::{
    AskError, AskOutcome, ShardingProducerHandle, ToEntities, spawn_sharding_producer,
};
use crate::delivery::sharding::{ShardingProducerController, ShardingProducerError};
use crate::entity::runner::RunnerSettings;
use crate::entity::{Entity, EntityFactory, EntityMessage};
use crate::ids::EntityId;
use crate::metrics::Metrics;
use crate::sharding::driver::{
    CoordinatorSlot, RegionHandle, RegionStatus, coordinator_singleton, spawn_region,
};
use crate::sharding::entities::{EntityEnvelope, sharded_entities};
use crate::sharding::messages::ShardingMsg;

use queries::{Answer, Queries, Unanswered};
use router::Router;

pub use queries::QueryError;
pub use settings::{ClusterSettings, SHARD_HOST_ROLE};
pub use status::{ClusterStatus, MemberStatusReport};
pub use wire::NodeMsg;

/// The singleton name of the shard coordinator.
pub const COORDINATOR: &str = "shard-coordinator";

/// Entities' answers waiting for this node's sharding producer.
const ANSWERS_QUEUE: usize = 1024;
/// Handover messages waiting for the singleton manager (dropped beyond: they are asked again).
const SINGLETON_QUEUE: usize = 256;
/// How long an entity query waits before asking again: a query may be lost while a shard moves.
const QUERY_RETRY: Duration = Duration::from_secs(1);

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A setting is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The cluster port cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Gossip did not start.
    #[error(transparent)]
    Membership(#[from] MembershipError),
    /// The sharding producer controller cannot be built with these settings.
    #[error(transparent)]
    Producer(#[from] ShardingProducerError),
}

/// What a graceful leave achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaveReport {
    /// Shards hosted here when the leave began.
    pub shards: usize,
    /// Every shard and singleton moved before the node stopped (false: `leave_timeout`).
    pub handed_over: bool,
    /// From the start of the leave until the hand-over ended.
    pub took: Duration,
}

/// A running cluster node for entities made by one factory. Shared freely (`Arc`): leaving
/// and stopping take `&self`.
pub struct ClusterNode<M> {
    me: NodeAddr,
    membership: Membership,
    transport: TransportHandle<NodeMsg<M>>,
    region: RegionHandle<EntityEnvelope<M>>,
    producer: ShardingProducerHandle<M>,
    singletons: SingletonHandle,
    queries: Arc<Queries>,
    leave_timeout: Duration,
    /// Every singleton's name and placement, to tell where each runs.
    singleton_placements: Vec<(String, Placement)>,
    downing: &'static str,
    shutdown: CancellationToken,
}

impl<M> ClusterNode<M>
where
    M: EntityMessage + Clone + Serialize + DeserializeOwned,
{
    /// Starts a node hosting entities made by `factory` (when it has the shard-host role).
    pub async fn start<F>(
        settings: &ClusterSettings,
        delivery: &DeliverySettings,
        runner: RunnerSettings,
        factory: Arc<F>,
        metrics: &Metrics,
    ) -> Result<Self, NodeError>
    where
        F: EntityFactory,
        F::Entity: Entity<Message = M>,
        <F::Entity as Entity>::Snapshot: Serialize,
    {
        Self::start_with_singletons(settings, delivery, runner, factory, metrics, |_| Vec::new())
            .await
    }

    /// Like [`Self::start`], and runs the singletons `singletons` returns besides the shard
    /// coordinator; it gets this node's sending side, since a singleton that produces to
    /// entities (the AMQP bridge) sends through the node it runs on.
    pub async fn start_with_singletons<F>(
        settings: &ClusterSettings,
        delivery: &DeliverySettings,
        runner: RunnerSettings,
        factory: Arc<F>,
        metrics: &Metrics,
        singletons: impl FnOnce(ShardingProducerHandle<M>) -> Vec<SingletonSpec>,
    ) -> Result<Self, NodeError>
    where
        F: EntityFactory,
        F::Entity: Entity<Message = M>,
        <F::Entity as Entity>::Snapshot: Serialize,
    {
        // Everything that can refuse the settings comes before anything starts.
        settings.validate("cluster")?;
        delivery.validate("delivery")?;
        let security = settings.security()?;
        let tls = settings.link_tls()?;
        let lease = settings.downing.lease(&settings.cluster_name)?;
        let core = sharding_producer(settings, delivery)?;
        let (listener, membership, node, listen) =
            join(settings, &security, tls.clone(), lease, metrics).await?;
        let (transport, inbound) = transport::start::<NodeMsg<M>>(
            &node,
            security,
            tls,
            listener,
            settings.transport.clone(),
        );

        let region = spawn_region(
            &node,
            SHARD_HOST_ROLE,
            settings.region.clone(),
            transport.outbox(journey::send_sharding::<M>),
            sharded_entities(
                factory,
                Arc::new(runner),
                transport.outbox(NodeMsg::ToProducer),
                transport.outbox(NodeMsg::QueryReply),
                metrics.entities.clone(),
            ),
        );
        let (answers_tx, answers_rx) = mpsc::channel(ANSWERS_QUEUE);
        let producer = spawn_sharding_producer(
            core,
            delivery.sharding.producer_controller.buffer_size,
            ThroughRegion {
                region: region.clone(),
                reply_to: node.me.clone(),
            },
            answers_rx,
            metrics.cluster.delivery_resends.clone(),
            node.part_shutdown(),
        );

        let coordinator = CoordinatorSlot::default();
        let mut specs = vec![coordinator_singleton(
            COORDINATOR,
            SHARD_HOST_ROLE,
            settings.coordinator.clone(),
            node.view.clone(),
            transport.outbox(|m| NodeMsg::Sharding(ShardingMsg::FromCoordinator(m))),
            coordinator.clone(),
        )];
        specs.extend(singletons(producer.clone()));
        let (singletons, singleton_tx, singleton_placements) =
            spawn_singletons(&node, specs, &transport);

        spawn_watchers(&node, &membership, &region, &producer, settings.down_after);
        let queries = Arc::new(Queries::default());
        let router = Router {
            singletons: singleton_tx,
            coordinator,
            region: region.clone(),
            answers: answers_tx,
            queries: Arc::clone(&queries),
            transport: transport.clone(),
        };
        tokio::spawn(router.run(inbound, node.part_shutdown()));
        info!(node = %node.me, %listen, "cluster node started");
        Ok(ClusterNode {
            me: node.me,
            membership,
            transport,
            region,
            producer,
            singletons,
            queries,
            leave_timeout: settings.leave_timeout,
            singleton_placements,
            downing: settings.downing.settings().strategy.name(),
            shutdown: node.shutdown,
        })
    }

    /// This node's address.
    pub fn me(&self) -> &NodeAddr {
        &self.me
    }

    /// The membership view, updated as it changes.
    pub fn view(&self) -> watch::Receiver<ClusterView> {
        self.membership.view()
    }

    /// Where this node's join stands; [`JoinState::GaveUp`] means it never will join and
    /// should stop (see [`crate::cluster::membership::join`]).
    pub fn join_state(&self) -> watch::Receiver<JoinState> {
        self.membership.join_state()
    }

    /// Resolves to true when this node gives up joining (`cluster.give_up_joining_after`): it
    /// will never be a member and should stop; to false if membership stopped first.
    pub fn until_gave_up_joining(&self) -> impl Future<Output = bool> + Send + 'static {
        let mut join = self.membership.join_state();
        async move {
            join.wait_for(|state| matches!(state, JoinState::GaveUp(_)))
                .await
                .is_ok()
        }
    }

    /// Resolves when this node downs itself (it lost a partition, or the cluster declared it
    /// down), with why; `None` if membership stopped first. By then its region, entities and
    /// singletons are stopping without handing anything over; the process should exit (a new
    /// run may join again).
    pub fn until_downed(&self) -> impl Future<Output = Option<DownReason>> + Send + 'static {
        let mut downed = self.membership.downed_self();
        async move {
            let reason = downed.wait_for(Option::is_some).await.ok()?;
            reason.clone()
        }
    }

    /// The region's status, updated as it changes.
    pub fn region_status(&self) -> watch::Receiver<RegionStatus> {
        self.region.status()
    }

    /// Singletons running here, updated as they start and stop.
    pub fn singletons_here(&self) -> watch::Receiver<BTreeSet<String>> {
        self.singletons.running()
    }

    /// Sends `message` to `entity` through reliable delivery and waits for its confirmation.
    pub async fn ask(&self, entity: EntityId, message: M) -> Result<AskOutcome, AskError> {
        self.producer.ask(entity, message).await
    }

    /// The sending side, for tasks that outlive a borrow of the node.
    pub fn producer(&self) -> ShardingProducerHandle<M> {
        self.producer.clone()
    }

    /// Asks `entity` (starting it where its shard lives) for its snapshot. Asked again every
    /// second, since a query may be lost while a shard moves.
    pub async fn query(
        &self,
        entity: EntityId,
        timeout: Duration,
    ) -> Result<serde_json::Value, QueryError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut question = self.queries.open();
            let envelope = EntityEnvelope::Query {
                reply_to: self.me.clone(),
                request: question.request,
            };
            if self.region.deliver(entity.clone(), envelope).await.is_err() {
                return Err(QueryError::Stopped);
            }
            let attempt_until = (Instant::now() + QUERY_RETRY).min(deadline);
            match question.answer_by(attempt_until).await {
                Ok(Answer::Snapshot(snapshot)) => {
                    return serde_json::from_slice(&snapshot)
                        .map_err(|e| QueryError::Unreadable(entity, e.to_string()));
                }
                Ok(Answer::Shards(_)) | Err(Unanswered::Closed) => {
                    return Err(QueryError::Stopped);
                }
                Err(Unanswered::TimedOut) if Instant::now() >= deadline => {
                    return Err(QueryError::Timeout(entity, timeout));
                }
                Err(Unanswered::TimedOut) => debug!(%entity, "query unanswered; asking again"),
            }
        }
    }

    /// Leaves gracefully: announces Leaving, waits (up to `leave_timeout`) until this node's
    /// shards and singletons have moved, then stops everything. Says what it handed over.
    pub async fn leave(&self) -> LeaveReport {
        info!(node = %self.me, "leaving the cluster");
        let started = Instant::now();
        let shards = self.region.status().borrow().hosted.len();
        self.membership.leave().await;
        let handed_over = self.handed_over_by(started + self.leave_timeout).await;
        let report = LeaveReport {
            shards,
            handed_over,
            took: started.elapsed(),
        };
        self.stop().await;
        info!(shards, handed_over, took = ?report.took, "left the cluster");
        report
    }

    /// Waits until this node's shards and singletons have moved elsewhere, or `deadline`.
    async fn handed_over_by(&self, deadline: Instant) -> bool {
        let mut region = self.region.status();
        let mut running = self.singletons.running();
        let mut view = self.membership.view();
        loop {
            // With no other shard host the shards have nowhere to go: they stop with the node
            // (their entities keep what they stored), once the singletons have wound down.
            let nowhere_to_go = !view.borrow_and_update().members.values().any(|m| {
                m.addr != self.me && m.status == MemberStatus::Up && m.has_role(SHARD_HOST_ROLE)
            });
            let moved = (nowhere_to_go || region.borrow_and_update().hosted.is_empty())
                && running.borrow_and_update().is_empty();
            if moved {
                return true;
            }
            tokio::select! {
                changed = region.changed() => if changed.is_err() {
                    warn!("the region stopped during the leave");
                    return false;
                },
                changed = running.changed() => if changed.is_err() {
                    warn!("the singleton manager stopped during the leave");
                    return false;
                },
                changed = view.changed() => if changed.is_err() {
                    warn!("membership stopped during the leave");
                    return false;
                },
                _ = tokio::time::sleep_until(deadline) => {
                    warn!("leave timed out with shards or singletons still here");
                    return false;
                }
            }
        }
    }

    /// Stops at once, without handing anything over (the others see this node go down).
    pub async fn stop(&self) {
        self.shutdown.cancel();
        self.singletons.stopped().await;
        self.membership.shutdown().await;
    }
}

/// Binds the cluster port and starts gossiping as a joining member; the context every other
/// part of the node runs in.
async fn join(
    settings: &ClusterSettings,
    security: &Security,
    tls: Option<Arc<LinkTls>>,
    lease: Option<Arc<dyn Lease>>,
    metrics: &Metrics,
) -> Result<(TcpListener, Membership, NodeContext, SocketAddr), NodeError> {
    let (listener, me) = bind_cluster_port(settings).await?;
    let listen = me.rpc_addr;
    let membership = Membership::start(
        me.clone(),
        listen,
        settings.membership(),
        security.clone(),
        tls,
        lease,
        metrics.cluster.clone(),
    )
    .await?;
    let node = NodeContext {
        me: me.addr,
        view: membership.view(),
        metrics: metrics.cluster.clone(),
        shutdown: CancellationToken::new(),
    };
    Ok((listener, membership, node, listen))
}

/// This node's sending side: a ShardingProducerController named after the node. Its demand
/// reports are off, since the bridge paces by what is buffered.
fn sharding_producer<M: Clone + 'static>(
    settings: &ClusterSettings,
    delivery: &DeliverySettings,
) -> Result<ShardingProducerController<M, oneshot::Sender<AskOutcome>>, NodeError> {
    let core = ShardingProducerController::new(
        ProducerId::new(settings.node_id.as_str()),
        delivery.producer_controller.clone(),
        delivery.sharding.producer_controller.clone(),
        rand::random(),
    )?;
    Ok(core.without_demand_reports())
}

/// Starts the singleton manager with `specs`; returns it, the queue of its messages from
/// other nodes, and every singleton's name and placement.
fn spawn_singletons<M: Send + 'static>(
    node: &NodeContext,
    specs: Vec<SingletonSpec>,
    transport: &TransportHandle<NodeMsg<M>>,
) -> (
    SingletonHandle,
    mpsc::Sender<Inbound<SingletonMsg>>,
    Vec<(String, Placement)>,
) {
    let placements = specs
        .iter()
        .map(|spec| (spec.name.clone(), spec.placement.clone()))
        .collect();
    let (inbox_tx, inbox) = mpsc::channel(SINGLETON_QUEUE);
    let handle = singletons::spawn(
        node,
        specs,
        transport.outbox(NodeMsg::Singleton),
        inbox,
        SingletonSettings::default(),
    );
    (handle, inbox_tx, placements)
}

/// Starts what watches membership on the node's behalf: stopping everything when the node
/// downs itself, and waking silent entities when another member goes down.
fn spawn_watchers<M: Send + 'static>(
    node: &NodeContext,
    membership: &Membership,
    region: &RegionHandle<EntityEnvelope<M>>,
    producer: &ShardingProducerHandle<M>,
    down_after: Duration,
) {
    tokio::spawn(stop_when_downed(
        membership.downed_self(),
        region.clone(),
        node.shutdown.clone(),
    ));
    tokio::spawn(wake_on_down(
        node.view.clone(),
        producer.clone(),
        down_after,
        node.part_shutdown(),
    ));
}

/// The sharding producer's way to entities on a node: through the region, which finds where
/// each one lives; answers come back to this node.
struct ThroughRegion<M> {
    region: RegionHandle<EntityEnvelope<M>>,
    reply_to: NodeAddr,
}

impl<M: Send + 'static> ToEntities<M> for ThroughRegion<M> {
    async fn deliver(&self, entity: EntityId, message: SequencedMessage<M>) {
        let envelope = EntityEnvelope::Sequenced {
            reply_to: self.reply_to.clone(),
            message,
        };
        // A stopped region means a stopping node; the producer stops with it.
        let _ = self.region.deliver(entity, envelope).await;
    }
}

/// Binds the cluster port and describes this run of the node as a joining member. Port 0 (a
/// node nobody joins) picks one free for both TCP and UDP, since gossip shares the number.
async fn bind_cluster_port(settings: &ClusterSettings) -> Result<(TcpListener, Member), NodeError> {
    let listen = settings.listen;
    let refused = |source| NodeError::Listen {
        addr: listen,
        source,
    };
    let listener = if listen.port() != 0 {
        TcpListener::bind(listen).await.map_err(refused)?
    } else {
        bind_shared_free_port(listen).await?
    };
    let started_at_ms = wall_clock_millis();
    let me = Member {
        addr: NodeAddr {
            id: NodeId::new(settings.node_id.as_str()),
            generation: started_at_ms,
        },
        rpc_addr: listener.local_addr().map_err(refused)?,
        roles: settings.roles.iter().cloned().collect(),
        status: MemberStatus::Joining,
        started_at_ms,
    };
    Ok((listener, me))
}

/// A TCP listener on a port that is free for UDP too.
async fn bind_shared_free_port(listen: std::net::SocketAddr) -> Result<TcpListener, NodeError> {
    let refused = |source| NodeError::Listen {
        addr: listen,
        source,
    };
    for _ in 0..100 {
        let listener = TcpListener::bind(listen).await.map_err(refused)?;
        let picked = listener.local_addr().map_err(refused)?;
        if std::net::UdpSocket::bind(picked).is_ok() {
            return Ok(listener);
        }
    }
    Err(refused(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no port free for both TCP and UDP",
    )))
}

/// Stops the node's parts the moment it downs itself: its entities are dropped where they
/// stand (they must not run on while the surviving side starts them anew, which it does a
/// margin later), and everything else stops. A singleton finishing its work (the bridge
/// draining) cannot reach the entities any more; the process should exit.
async fn stop_when_downed<P: Send + 'static>(
    mut downed: watch::Receiver<Option<DownReason>>,
    region: RegionHandle<P>,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        result = downed.wait_for(Option::is_some) => if result.is_ok() {
            region.abort();
            shutdown.cancel();
        },
    }
}

/// Wakes entities silent for `silent_for` whenever a member goes down: those that lived on
/// it have lost what they held, and would otherwise wait for the idle resend (10 s).
async fn wake_on_down<M: Send + 'static>(
    mut view: watch::Receiver<ClusterView>,
    producer: ShardingProducerHandle<M>,
    silent_for: Duration,
    shutdown: CancellationToken,
) {
    let mut down = BTreeSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
        }
        let now_down: BTreeSet<NodeAddr> = view
            .borrow_and_update()
            .members
            .values()
            .filter(|m| m.status == MemberStatus::Down)
            .map(|m| m.addr.clone())
            .collect();
        if now_down.difference(&down).next().is_some() {
            debug!("a member went down: waking silent entities");
            producer.wake_idle(silent_for);
        }
        down = now_down;
    }
}
