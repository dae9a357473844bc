//! A cluster node, composed: membership (gossip), the transport (authenticated links), the
//! singleton manager (running the shard coordinator on the oldest shard host), the shard
//! region with this node's entities, a ShardingProducerController through which this node
//! sends to entities wherever they live, and its part of the cluster-wide worker registry. A router task hands every message that arrives
//! to the part it is for.
//!
//! [`ClusterNode::leave`] is the graceful way out: announce Leaving, let the coordinator move
//! this node's shards and the singleton move to the next oldest node, then stop.

pub mod settings;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::cluster::member::{ClusterView, Member, MemberStatus, NodeAddr, NodeId};
use crate::cluster::membership::downing::DownReason;
use crate::cluster::membership::join::JoinState;
use crate::cluster::membership::{Membership, MembershipError};
use crate::cluster::singleton::SingletonMsg;
use crate::cluster::singleton::driver::{
    self as singletons, SingletonHandle, SingletonSettings, SingletonSpec,
};
use crate::cluster::transport::{self, Inbound, TransportHandle};
use crate::cluster::workers::{ClusterWorkers, WorkMsg};
use crate::config::ConfigError;
use crate::delivery::durable::wall_clock_millis;
use crate::delivery::protocol::ProducerId;
use crate::delivery::settings::DeliverySettings;
use crate::delivery::sharding::driver::{
    AskError, AskOutcome, EntitySender, ShardingProducerHandle, ToProducer, spawn_sharding_producer,
};
use crate::delivery::sharding::{ShardingProducerController, ShardingProducerError};
use crate::entity::runner::RunnerSettings;
use crate::entity::sharded::{EntityEnvelope, QueryReply, sharded_entities};
use crate::entity::{Entity, EntityFactory, EntityId};
use crate::metrics::Metrics;
use crate::sharding::driver::{
    CoordinatorSlot, RegionHandle, RegionStatus, coordinator_singleton, spawn_region,
};
use crate::sharding::messages::ShardingMsg;
use crate::sharding::shard::ShardId;

pub use settings::{BRIDGE_ROLE, ClusterSettings, SHARD_HOST_ROLE};

/// The singleton name of the shard coordinator.
pub const COORDINATOR: &str = "shard-coordinator";

/// Everything nodes send each other, for entities receiving `M`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NodeMsg<M> {
    /// Singleton handover.
    Singleton(SingletonMsg),
    /// Shard coordination and entity messages.
    Sharding(ShardingMsg<EntityEnvelope<M>>),
    /// An entity's answer to a producer's controller.
    ToProducer(ToProducer),
    /// An entity's answer to a query.
    QueryReply(QueryReply),
    /// Work pulling across the cluster.
    Work(WorkMsg<M>),
    /// "Which shards do you host?", answered with a [`QueryReply`] holding a [`HostedShards`].
    ShardsRequest {
        /// The asker's key for the answer.
        request: u64,
    },
}

/// What a node hosts, as it answers [`NodeMsg::ShardsRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostedShards {
    /// Shards hosted there.
    pub shards: Vec<u32>,
}

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

/// Why a query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No answer in time (the entity's node may be down, or its shard moving).
    #[error("no answer from entity {0} within {1:?}")]
    Timeout(EntityId, Duration),
    /// The node is stopping.
    #[error("the node is stopping")]
    Stopped,
    /// The answer is not JSON.
    #[error("entity {0} answered with an unreadable snapshot: {1}")]
    Unreadable(EntityId, String),
}

/// What a node shows about the cluster (`GET /cluster`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node.
    pub node: String,
    /// Every member in this node's view, oldest first.
    pub members: Vec<MemberStatusReport>,
    /// Where the shard coordinator runs, as this node sees it.
    pub coordinator: Option<String>,
    /// Every singleton and the node that should run it (the oldest Up member with its role).
    pub singletons: BTreeMap<String, Option<String>>,
    /// Singletons running on this node.
    pub singletons_here: Vec<String>,
    /// Shards hosted on this node.
    pub shards_here: Vec<u32>,
    /// Entities running on this node.
    pub entities_here: usize,
    /// Shards per live node, as each answered (one that did not answer in time is missing);
    /// filled by [`ClusterNode::cluster_status`] only.
    #[serde(default)]
    pub shards: BTreeMap<String, Vec<u32>>,
    /// Whether this node has joined the cluster (`joined`, `joining`, `gave-up`).
    #[serde(default)]
    pub join: String,
    /// Why it has not joined, while it has not.
    #[serde(default)]
    pub join_blocker: Option<String>,
    /// The downing strategy: which side of a partition survives.
    #[serde(default)]
    pub downing: String,
    /// Members this node cannot reach and the strategy has not declared down yet.
    #[serde(default)]
    pub unreachable: Vec<String>,
    /// Why this node downed itself, once it has (it stops everything it ran).
    #[serde(default)]
    pub downed_self: Option<String>,
}

/// One member, for [`ClusterStatus`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberStatusReport {
    /// Its name.
    pub node: String,
    /// Which start of it.
    pub generation: u64,
    /// Joining, up, leaving or down.
    pub status: String,
    /// Its roles.
    pub roles: Vec<String>,
    /// Milliseconds since it started.
    pub age_ms: u64,
    /// Its cluster address.
    pub address: String,
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

type PendingQueries = Arc<Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>;

/// A running cluster node for entities made by one factory.
pub struct ClusterNode<M> {
    me: NodeAddr,
    membership: Membership,
    transport: TransportHandle<NodeMsg<M>>,
    region: RegionHandle<EntityEnvelope<M>>,
    producer: ShardingProducerHandle<M>,
    singletons: SingletonHandle,
    workers: ClusterWorkers<M>,
    queries: PendingQueries,
    next_query: AtomicU64,
    leave_timeout: Duration,
    /// Every singleton's name and role, to tell where each runs.
    singleton_roles: Vec<(String, String)>,
    downing: &'static str,
    shutdown: CancellationToken,
}

impl<M> ClusterNode<M>
where
    M: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
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
        settings.validate("cluster")?;
        delivery.validate("delivery")?;
        let security = settings.security()?;
        // Everything that can refuse the settings comes before anything starts.
        let sharding = &delivery.sharding.producer_controller;
        let core = ShardingProducerController::new(
            ProducerId::new(settings.node_id.as_str()),
            delivery.producer_controller.clone(),
            sharding.clone(),
            rand::random(),
        )?
        .without_demand_reports();
        let started_at_ms = wall_clock_millis();
        let me = Member {
            addr: NodeAddr {
                id: NodeId::new(settings.node_id.as_str()),
                generation: started_at_ms,
            },
            rpc_addr: settings.listen,
            roles: settings.roles.iter().cloned().collect(),
            status: MemberStatus::Joining,
            started_at_ms,
        };
        let listener = bind_cluster_port(settings.listen).await?;
        let listen = listener.local_addr().map_err(|source| NodeError::Listen {
            addr: settings.listen,
            source,
        })?;
        let me = Member {
            rpc_addr: listen,
            ..me
        };
        let addr = me.addr.clone();
        let cluster_metrics = metrics.cluster.clone();
        let membership = Membership::start(
            me,
            listen,
            settings.membership(),
            security.clone(),
            settings.downing.lease(&settings.cluster_name)?,
            cluster_metrics.clone(),
        )
        .await?;
        let view = membership.view();
        let shutdown = CancellationToken::new();
        let (transport, inbound) = transport::start::<NodeMsg<M>>(
            addr.clone(),
            security,
            listener,
            view.clone(),
            settings.transport.clone(),
            cluster_metrics.clone(),
            shutdown.child_token(),
        );

        let slot = CoordinatorSlot::default();
        let coordinator = coordinator_singleton(
            COORDINATOR,
            SHARD_HOST_ROLE,
            settings.coordinator.clone(),
            view.clone(),
            transport.outbox(|m| NodeMsg::Sharding(ShardingMsg::FromCoordinator(m))),
            slot.clone(),
        );
        let spawner = sharded_entities(
            factory,
            Arc::new(runner),
            transport.outbox(NodeMsg::ToProducer),
            transport.outbox(NodeMsg::QueryReply),
            metrics.entities.clone(),
        );
        let region = spawn_region(
            addr.clone(),
            SHARD_HOST_ROLE,
            settings.region.clone(),
            view.clone(),
            transport.outbox(NodeMsg::Sharding),
            spawner,
            cluster_metrics.clone(),
            shutdown.child_token(),
        );

        let to_entity: EntitySender<M> = {
            let region = region.clone();
            let reply_to = addr.clone();
            Arc::new(move |entity, message| {
                let region = region.clone();
                let envelope = EntityEnvelope::Sequenced {
                    reply_to: reply_to.clone(),
                    message,
                };
                Box::pin(async move {
                    let _ = region.deliver(entity, envelope).await;
                })
            })
        };
        let (answers_tx, answers_rx) = mpsc::channel(1024);
        let producer = spawn_sharding_producer(
            core,
            sharding.buffer_size,
            to_entity,
            answers_rx,
            metrics.cluster.delivery_resends.clone(),
            shutdown.child_token(),
        );

        let mut specs = vec![coordinator];
        specs.extend(singletons(producer.clone()));
        let singleton_roles = specs
            .iter()
            .map(|spec| (spec.name.clone(), spec.role.clone()))
            .collect();
        let (singleton_tx, singleton_rx) = mpsc::channel(256);
        let singletons = singletons::spawn(
            addr.clone(),
            specs,
            view.clone(),
            transport.outbox(NodeMsg::Singleton),
            singleton_rx,
            SingletonSettings::default(),
            cluster_metrics.clone(),
            shutdown.child_token(),
        );

        tokio::spawn(stop_when_downed(
            membership.downed_self(),
            region.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(wake_on_down(
            view.clone(),
            producer.clone(),
            settings.down_after,
            shutdown.child_token(),
        ));

        let workers = ClusterWorkers::start(
            addr.clone(),
            transport.outbox(NodeMsg::Work),
            view.clone(),
            Duration::from_secs(1),
            shutdown.child_token(),
        );

        let queries = PendingQueries::default();
        tokio::spawn(
            Router {
                singletons: singleton_tx,
                coordinator: slot,
                region: region.clone(),
                answers: answers_tx,
                queries: Arc::clone(&queries),
                workers: workers.clone(),
                to_asker: transport.outbox(NodeMsg::QueryReply),
            }
            .run(inbound, shutdown.child_token()),
        );
        info!(node = %addr, %listen, "cluster node started");
        Ok(ClusterNode {
            me: addr,
            membership,
            transport,
            region,
            producer,
            singletons,
            workers,
            queries,
            next_query: AtomicU64::new(1),
            leave_timeout: settings.leave_timeout,
            singleton_roles,
            downing: settings.downing.settings().strategy.name(),
            shutdown,
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

    /// The cluster-wide worker registry, for work pulling between nodes.
    pub fn workers(&self) -> ClusterWorkers<M> {
        self.workers.clone()
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
            let request = self.next_query.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            lock(&self.queries).insert(request, tx);
            // Forgotten however this attempt ends, the caller giving up included.
            let _pending = PendingQuery {
                queries: &self.queries,
                request,
            };
            let envelope = EntityEnvelope::Query {
                reply_to: self.me.clone(),
                request,
            };
            if self.region.deliver(entity.clone(), envelope).await.is_err() {
                return Err(QueryError::Stopped);
            }
            let attempt_until = (Instant::now() + Duration::from_secs(1)).min(deadline);
            let answer = tokio::time::timeout_at(attempt_until, rx).await;
            match answer {
                Ok(Ok(snapshot)) => {
                    return serde_json::from_slice(&snapshot)
                        .map_err(|e| QueryError::Unreadable(entity, e.to_string()));
                }
                Ok(Err(_)) => return Err(QueryError::Stopped),
                Err(_) if Instant::now() >= deadline => {
                    return Err(QueryError::Timeout(entity, timeout));
                }
                Err(_) => debug!(%entity, "query unanswered; asking again"),
            }
        }
    }

    /// What this node knows about the cluster.
    pub fn status(&self) -> ClusterStatus {
        let view = self.membership.view().borrow().clone();
        self.status_in(&view)
    }

    fn status_in(&self, view: &ClusterView) -> ClusterStatus {
        let region = self.region.status();
        let region = region.borrow();
        let now = wall_clock_millis();
        let mut members: Vec<&Member> = view.members.values().collect();
        members.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        let (join, join_blocker) = match &*self.membership.join_state().borrow() {
            JoinState::Joined => ("joined", None),
            JoinState::Joining(blocker) => ("joining", Some(blocker.to_string())),
            JoinState::GaveUp(blocker) => ("gave-up", Some(blocker.to_string())),
        };
        ClusterStatus {
            node: self.me.id.to_string(),
            join: join.to_owned(),
            join_blocker,
            downing: self.downing.to_owned(),
            unreachable: view.unreachable.iter().map(|a| a.id.to_string()).collect(),
            downed_self: self
                .membership
                .downed_self()
                .borrow()
                .as_ref()
                .map(ToString::to_string),
            members: members
                .into_iter()
                .map(|m| MemberStatusReport {
                    node: m.addr.id.to_string(),
                    generation: m.addr.generation,
                    status: m.status.as_str().to_owned(),
                    roles: m.roles.iter().cloned().collect(),
                    age_ms: now.saturating_sub(m.started_at_ms),
                    address: m.rpc_addr.to_string(),
                })
                .collect(),
            coordinator: region.coordinator.as_ref().map(|c| c.id.to_string()),
            singletons: self
                .singleton_roles
                .iter()
                .map(|(name, role)| {
                    let holder = view.oldest_up(role).map(|m| m.addr.id.to_string());
                    (name.clone(), holder)
                })
                .collect(),
            singletons_here: self.singletons.running().borrow().iter().cloned().collect(),
            shards_here: shard_numbers(&region),
            entities_here: region.entities,
            shards: BTreeMap::new(),
        }
    }

    /// [`Self::status`] plus the shards every live member hosts, asked over the cluster (up to
    /// `timeout` for their answers).
    pub async fn cluster_status(&self, timeout: Duration) -> ClusterStatus {
        let view = self.membership.view().borrow().clone();
        let mut status = self.status_in(&view);
        status
            .shards
            .insert(status.node.clone(), status.shards_here.clone());
        let (mut answers, mut pending) = (Vec::new(), Vec::new());
        for member in view.members.values() {
            // An unreachable member would only make the whole answer wait for the timeout.
            let alive = matches!(member.status, MemberStatus::Up | MemberStatus::Leaving)
                && !view.unreachable.contains(&member.addr);
            if member.addr == self.me || !alive {
                continue;
            }
            let request = self.next_query.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            lock(&self.queries).insert(request, tx);
            // Forgotten however this ends, the caller giving up included.
            pending.push(PendingQuery {
                queries: &self.queries,
                request,
            });
            self.transport
                .send(&member.addr, NodeMsg::ShardsRequest { request });
            answers.push((member.addr.id.to_string(), rx));
        }
        let deadline = Instant::now() + timeout;
        for (node, rx) in answers {
            if let Ok(Ok(answer)) = tokio::time::timeout_at(deadline, rx).await
                && let Ok(hosted) = serde_json::from_slice::<HostedShards>(&answer)
            {
                status.shards.insert(node, hosted.shards);
            }
        }
        drop(pending);
        status
    }

    /// Leaves gracefully: announces Leaving, waits (up to `leave_timeout`) until this node's
    /// shards and singletons have moved, then stops everything. Says what it handed over.
    pub async fn leave(self) -> LeaveReport {
        info!(node = %self.me, "leaving the cluster");
        let started = Instant::now();
        let shards = self.region.status().borrow().hosted.len();
        self.membership.leave().await;
        let deadline = started + self.leave_timeout;
        let mut region = self.region.status();
        let mut running = self.singletons.running();
        let mut view = self.membership.view();
        let handed_over = loop {
            // With no other shard host the shards have nowhere to go: they stop with the node
            // (their entities keep what they stored), once the singletons have wound down.
            let nowhere_to_go = !view.borrow_and_update().members.values().any(|m| {
                m.addr != self.me && m.status == MemberStatus::Up && m.has_role(SHARD_HOST_ROLE)
            });
            let moved = (nowhere_to_go || region.borrow_and_update().hosted.is_empty())
                && running.borrow_and_update().is_empty();
            if moved {
                break true;
            }
            tokio::select! {
                changed = region.changed() => if changed.is_err() {
                    warn!("the region stopped during the leave");
                    break false;
                },
                changed = running.changed() => if changed.is_err() {
                    warn!("the singleton manager stopped during the leave");
                    break false;
                },
                changed = view.changed() => if changed.is_err() {
                    warn!("membership stopped during the leave");
                    break false;
                },
                _ = tokio::time::sleep_until(deadline) => {
                    warn!("leave timed out with shards or singletons still here");
                    break false;
                }
            }
        };
        let report = LeaveReport {
            shards,
            handed_over,
            took: started.elapsed(),
        };
        self.shutdown.cancel();
        self.singletons.stopped().await;
        self.membership.shutdown().await;
        drop(self.transport);
        info!(shards, handed_over, took = ?report.took, "left the cluster");
        report
    }

    /// Stops at once, without handing anything over (the others see this node go down).
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.singletons.stopped().await;
        self.membership.shutdown().await;
    }
}

fn shard_numbers(region: &RegionStatus) -> Vec<u32> {
    region.hosted.iter().map(|ShardId(s)| *s).collect()
}

/// Binds the cluster port. Port 0 (a node nobody joins) picks one free for both TCP and UDP,
/// since gossip shares the number.
async fn bind_cluster_port(listen: std::net::SocketAddr) -> Result<TcpListener, NodeError> {
    let refused = |source| NodeError::Listen {
        addr: listen,
        source,
    };
    if listen.port() != 0 {
        return TcpListener::bind(listen).await.map_err(refused);
    }
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

/// Removes a query's entry when its attempt ends.
struct PendingQuery<'a> {
    queries: &'a PendingQueries,
    request: u64,
}

impl Drop for PendingQuery<'_> {
    fn drop(&mut self) {
        lock(self.queries).remove(&self.request);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Hands every arriving message to the part of the node it is for.
struct Router<M> {
    singletons: mpsc::Sender<Inbound<SingletonMsg>>,
    coordinator: CoordinatorSlot,
    region: RegionHandle<EntityEnvelope<M>>,
    answers: mpsc::Sender<ToProducer>,
    queries: PendingQueries,
    workers: ClusterWorkers<M>,
    to_asker: crate::cluster::transport::Outbox<QueryReply>,
}

impl<M: Clone + Send + Sync + 'static> Router<M> {
    async fn run(
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
                    let _ = self.singletons.send(Inbound { from, message }).await;
                }
                NodeMsg::Sharding(ShardingMsg::ToCoordinator(message)) => {
                    // Dropped when the coordinator does not run here: the region asks again.
                    self.coordinator.deliver(from, message);
                }
                NodeMsg::Sharding(message) => {
                    let _ = self.region.handle_remote(from, message).await;
                }
                NodeMsg::ToProducer(answer) => {
                    let _ = self.answers.send(answer).await;
                }
                NodeMsg::Work(message) => self.workers.handle(from, message),
                NodeMsg::ShardsRequest { request } => {
                    let hosted = HostedShards {
                        shards: shard_numbers(&self.region.status().borrow()),
                    };
                    if let Ok(snapshot) = serde_json::to_vec(&hosted) {
                        (self.to_asker)(&from, QueryReply { request, snapshot });
                    }
                }
                NodeMsg::QueryReply(reply) => {
                    if let Some(asker) = lock(&self.queries).remove(&reply.request) {
                        let _ = asker.send(reply.snapshot);
                    }
                }
            }
        }
    }
}
