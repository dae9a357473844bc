//! Membership: who is in the cluster, kept by chitchat (scuttlebutt gossip over UDP with
//! phi-accrual failure detection), and published as a [`ClusterView`] on a watch channel
//! ([`view`] holds the rules). Gossip runs under a cluster id derived from the secret and
//! member records are signed with it (see [`crate::cluster::auth`]): chitchat keeps its wire
//! format private, so authentication lives in the records rather than in the datagrams.
//!
//! Each node announces its own status: `joining` at start, `up` once the seed-join rule
//! ([`join`]) says so, `leaving` while it hands work over, `down` just before it stops. A node
//! that stops gossiping becomes `Down` once the failure detector has called it unreachable for
//! `down_after` without a break.
//!
//! The join rule is Akka's: only a node without seeds, or the node listed first in its own
//! seeds (of a name for several nodes, the lowest address: [`seeds`]), may form a cluster (the latter after `join_timeout` without meeting an Up member);
//! every other node keeps joining, probing its seeds with backoff to say why it cannot, and
//! gives up after `give_up_after`. Nodes started together all wait for the first seed, so they
//! agree on who is oldest. A node cut off from its seeds never forms a second cluster.

pub mod downing;
pub mod join;
pub mod seeds;
pub mod view;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, spawn_chitchat};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::cluster::auth::Security;
use crate::cluster::lease::Lease;
use crate::cluster::member::{ClusterView, Member, MemberStatus, NodeAddr, NodeId};
use crate::cluster::metrics::ClusterMetrics;
use crate::cluster::transport::tls::LinkTls;
use downing::{DownReason, DowningSettings, LeaseRequest, Resolver, Strategy};
use join::{JoinDecision, JoinRule, JoinState, SeedRole};
use seeds::{Prober, SeedEvent};
use view::{GossipNode, GossipRead, KnownMembers, own_keys, view_from_gossip};

/// How membership gossips and decides.
#[derive(Clone, Debug)]
pub struct MembershipSettings {
    /// Nodes of different clusters ignore each other.
    pub cluster_name: String,
    /// Gossip addresses to join through (`host:port`); empty forms a new cluster at once.
    pub seeds: Vec<String>,
    /// Time between gossip rounds; heartbeats travel with them.
    pub gossip_interval: Duration,
    /// Phi above which the failure detector considers a silent node unreachable.
    pub phi_threshold: f64,
    /// How long a member that was reachable must stay silent before it counts as unreachable:
    /// the failure detector alone reacts within a fraction of a second, which a busy machine's
    /// pauses would trip. The downing strategy then decides whether it is `Down`.
    pub down_after: Duration,
    /// Which side of a partition survives, and when it decides.
    pub downing: DowningSettings,
    /// How long the first seed waits to meet an Up member before forming a cluster.
    pub join_timeout: Duration,
    /// Addresses the first seed entry must resolve to before the lowest of them may form the
    /// cluster (a DNS name for all nodes: how many must be found first).
    pub required_seed_addresses: usize,
    /// How long any other node keeps joining before it gives up; `None` waits forever.
    pub give_up_after: Option<Duration>,
    /// How long a down node's state is kept before it is forgotten.
    pub dead_node_grace_period: Duration,
}

impl Default for MembershipSettings {
    fn default() -> Self {
        MembershipSettings {
            cluster_name: "warren".to_owned(),
            seeds: Vec::new(),
            gossip_interval: Duration::from_millis(200),
            phi_threshold: 8.0,
            down_after: Duration::from_millis(1500),
            downing: DowningSettings::default(),
            join_timeout: Duration::from_secs(3),
            required_seed_addresses: 1,
            give_up_after: Some(Duration::from_secs(300)),
            dead_node_grace_period: Duration::from_secs(3600),
        }
    }
}

/// Why membership could not start.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// Chitchat did not start (usually: the gossip address cannot be bound).
    #[error("gossip did not start: {0}")]
    Gossip(String),
}

enum Change {
    Status(MemberStatus),
}

/// A running membership: read [`Self::view`]; [`Self::leave`] then [`Self::shutdown`] to go.
pub struct Membership {
    /// Taken out by the first [`Self::shutdown`], which may be called through a shared node;
    /// held for the whole shutdown, so a second caller returns only once it is done.
    chitchat: tokio::sync::Mutex<Option<ChitchatHandle>>,
    view: watch::Receiver<ClusterView>,
    join: watch::Receiver<JoinState>,
    downed_self: watch::Receiver<Option<DownReason>>,
    changes: mpsc::Sender<Change>,
    task: JoinHandle<()>,
    gossip_interval: Duration,
}

impl Membership {
    /// Starts gossiping as `me` (whose status should be `Joining`) on `gossip_addr`; `lease`
    /// is what the `lease-majority` downing strategy asks for.
    pub async fn start(
        me: Member,
        gossip_addr: SocketAddr,
        settings: MembershipSettings,
        security: Security,
        tls: Option<Arc<LinkTls>>,
        lease: Option<Arc<dyn Lease>>,
        metrics: ClusterMetrics,
    ) -> Result<Self, MembershipError> {
        let config = gossip_config(&me, gossip_addr, &settings, &security, tls.as_deref());
        let resolved = seeds::resolve(&settings.seeds).await;
        let seeds = seeds::assess(&resolved, gossip_addr, settings.required_seed_addresses);
        let chitchat = spawn_chitchat(
            config,
            own_keys(&me, &BTreeSet::new(), &security),
            &UdpTransport,
        )
        .await
        .map_err(|e| MembershipError::Gossip(format!("{e:#}")))?;
        let rule = JoinRule::new(
            seeds.role,
            settings.join_timeout,
            settings.give_up_after,
            Instant::now(),
        );
        info!(role = ?rule.role(), seeds = ?settings.seeds, "joining");
        let strategy = settings.downing.strategy;
        if strategy == Strategy::Off {
            warn!(
                "cluster.downing.strategy = \"off\": both sides of a network partition will run \
                 the same entities, and a healed node keeps its stale copies; use it only where \
                 something else guarantees one owner"
            );
        }
        let (view_tx, view) = watch::channel(ClusterView::alone(me.clone()));
        let (join_tx, join) = watch::channel(rule.state());
        let (downed_self_tx, downed_self) = watch::channel(None);
        let (changes, changes_rx) = mpsc::channel(8);
        // Bounded: the prober waits for room.
        let (probes_tx, probes_rx) = mpsc::channel(8);
        if rule.role() != SeedRole::Alone {
            let prober = Prober {
                seeds: settings.seeds.clone(),
                me_at: gossip_addr,
                me: me.addr.clone(),
                required: settings.required_seed_addresses,
                security: security.clone(),
                tls,
            };
            tokio::spawn(prober.run(join.clone(), probes_tx));
        }
        let task = tokio::spawn(
            Tracker {
                chitchat: chitchat.chitchat(),
                me,
                settings: settings.clone(),
                security,
                known: KnownMembers::new(),
                unreachable_since: HashMap::new(),
                resolver: Resolver::new(settings.downing, Instant::now()),
                lease,
                published_downed: BTreeSet::new(),
                rule,
                reported: None,
                view: view_tx,
                join: join_tx,
                downed_self: downed_self_tx,
                metrics,
            }
            .run(changes_rx, probes_rx),
        );
        Ok(Membership {
            chitchat: tokio::sync::Mutex::new(Some(chitchat)),
            view,
            join,
            downed_self,
            changes,
            task,
            gossip_interval: settings.gossip_interval,
        })
    }

    /// Where this node's join stands: joining (and why it has not joined), joined, or given up
    /// (then the node should stop: it will never become a member).
    pub fn join_state(&self) -> watch::Receiver<JoinState> {
        self.join.clone()
    }

    /// Why this node downed itself, once it has (it lost a partition, or the cluster declared
    /// it down): it must stop everything it runs at once, without handing anything over, and
    /// never come back as this run.
    pub fn downed_self(&self) -> watch::Receiver<Option<DownReason>> {
        self.downed_self.clone()
    }

    /// The current view, updated after every gossip round that changed it.
    pub fn view(&self) -> watch::Receiver<ClusterView> {
        self.view.clone()
    }

    /// Announces that this node is leaving: it stays a member (others still reach it) while
    /// it hands its work over, but stops counting as Up. Returns once the announcement has
    /// had two gossip rounds to spread.
    pub async fn leave(&self) {
        self.announce(MemberStatus::Leaving).await;
    }

    /// Announces `down` so peers drop this node at once instead of waiting for the failure
    /// detector, then stops gossiping. Later calls do nothing.
    pub async fn shutdown(&self) {
        let mut slot = self.chitchat.lock().await;
        let Some(chitchat) = slot.take() else {
            return;
        };
        self.announce(MemberStatus::Down).await;
        self.task.abort();
        if let Err(error) = chitchat.shutdown().await {
            warn!(error = %format!("{error:#}"), "gossip did not stop cleanly");
        }
    }

    /// Stops gossiping without a word, as a crash would (tests).
    #[cfg(any(test, feature = "testkit"))]
    pub fn crash(self) {
        self.task.abort();
        if let Some(chitchat) = self.chitchat.into_inner() {
            chitchat.abort();
        }
    }

    async fn announce(&self, status: MemberStatus) {
        let mut view = self.view.clone();
        if self.changes.send(Change::Status(status)).await.is_err() {
            return;
        }
        // A node that downed itself meanwhile stays down: that ends the wait too.
        let announced = view.wait_for(|v| {
            v.me()
                .is_some_and(|m| m.status == status || m.status == MemberStatus::Down)
        });
        let _ = tokio::time::timeout(self.gossip_interval * 10, announced).await;
        // Peers learn it on their next exchange with us or with someone who has it.
        tokio::time::sleep(self.gossip_interval * 2).await;
    }
}

/// Chitchat's settings for this node. The cluster id carries the secret's fingerprint and, with
/// TLS, the cluster CA's: nodes of another secret or CA never mix their gossip with ours.
fn gossip_config(
    me: &Member,
    gossip_addr: SocketAddr,
    settings: &MembershipSettings,
    security: &Security,
    tls: Option<&LinkTls>,
) -> ChitchatConfig {
    let chitchat_id = ChitchatId::new(
        me.addr.id.as_str().to_owned(),
        me.addr.generation,
        gossip_addr,
    );
    ChitchatConfig {
        chitchat_id,
        cluster_id: match tls {
            Some(tls) => format!(
                "{}-ca-{}",
                security.gossip_cluster_id(&settings.cluster_name),
                tls.ca_fingerprint()
            ),
            None => security.gossip_cluster_id(&settings.cluster_name),
        },
        gossip_interval: settings.gossip_interval,
        listen_addr: gossip_addr,
        seed_nodes: settings.seeds.clone(),
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: settings.phi_threshold,
            sampling_window_size: 1000,
            max_interval: settings.gossip_interval * 10,
            initial_interval: settings.gossip_interval,
            dead_node_grace_period: settings.dead_node_grace_period,
        },
        marked_for_deletion_grace_period: settings.dead_node_grace_period,
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V0,
    }
}

/// How long a lease, once taken, keeps the other side from taking it.
const LEASE_TTL: Duration = Duration::from_secs(30);
/// Pause between two questions to a lease store that did not answer.
const LEASE_PAUSE: Duration = Duration::from_millis(200);

/// How often a node that still cannot join says so again.
const JOIN_REMINDER: Duration = Duration::from_secs(30);

/// Reads chitchat's state every gossip interval and turns it into views; runs the join rule.
struct Tracker {
    chitchat: Arc<Mutex<chitchat::Chitchat>>,
    me: Member,
    settings: MembershipSettings,
    security: Security,
    known: KnownMembers,
    /// Runs seen reachable once, and since when they are unreachable (if they are).
    unreachable_since: HashMap<NodeAddr, Option<Instant>>,
    resolver: Resolver,
    lease: Option<Arc<dyn Lease>>,
    /// The runs this node last announced as down (its own decisions), in its gossip keys.
    published_downed: BTreeSet<NodeAddr>,
    rule: JoinRule,
    /// The join state last logged, and when.
    reported: Option<(JoinState, Instant)>,
    view: watch::Sender<ClusterView>,
    join: watch::Sender<JoinState>,
    downed_self: watch::Sender<Option<DownReason>>,
    metrics: ClusterMetrics,
}

impl Tracker {
    async fn run(
        mut self,
        mut changes: mpsc::Receiver<Change>,
        mut probes: mpsc::Receiver<SeedEvent>,
    ) {
        let mut tick = tokio::time::interval(self.settings.gossip_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(Change::Status(status)) = changes.recv() => {
                    // A downed node stays down, whatever it is told next.
                    if self.resolver.downed_self().is_none() || status == MemberStatus::Down {
                        self.set_status(status).await;
                    }
                }
                Some(event) = probes.recv() => {
                    match event {
                        SeedEvent::Probed(seed, outcome) => self.rule.handle_probe(&seed, outcome),
                        SeedEvent::Resolved(role, seeds) => {
                            if role != self.rule.role() {
                                info!(?role, "the seeds resolve anew");
                            }
                            self.rule.handle_seeds(role, &seeds, Instant::now());
                        }
                    }
                    continue;
                }
            }
            let mut nodes = self.gossip_nodes().await;
            let unreachable = self.apply_down_after(&mut nodes);
            let GossipRead {
                mut view,
                untrusted,
                downed_by_others,
            } = view_from_gossip(&self.me, &nodes, &self.security, &mut self.known);
            self.apply_downing(&mut view, unreachable, &downed_by_others, &nodes)
                .await;
            if self.me.status == MemberStatus::Joining {
                match self.decide_join(&view) {
                    JoinDecision::BecomeUp => {
                        info!(node = %self.me.addr, "member is up");
                        self.set_status(MemberStatus::Up).await;
                        view.members
                            .insert(self.me.addr.id.clone(), self.me.clone());
                    }
                    JoinDecision::GiveUp | JoinDecision::Wait => {}
                }
                self.publish_join_state();
            }
            self.metrics.observe_view(&view);
            self.metrics.gossip_untrusted.set(untrusted as i64);
            self.view.send_if_modified(|current| {
                let changed = *current != view;
                if changed {
                    *current = view;
                }
                changed
            });
        }
    }

    /// Hands the join rule what this view shows of the other nodes.
    fn decide_join(&mut self, view: &ClusterView) -> JoinDecision {
        let others: Vec<&Member> = view
            .members
            .values()
            .filter(|m| m.addr != self.me.addr && m.status != MemberStatus::Down)
            .collect();
        let others_up = others.iter().any(|m| m.status == MemberStatus::Up);
        let names: Vec<String> = others.iter().map(|m| m.addr.id.to_string()).collect();
        self.rule.handle_view(Instant::now(), others_up, &names)
    }

    /// Publishes the join state, and logs why this node has not joined: when that changes once
    /// the join timeout has passed (before it, waiting is normal), and again every
    /// [`JOIN_REMINDER`].
    fn publish_join_state(&mut self) {
        let state = self.rule.state();
        self.join.send_if_modified(|current| {
            let changed = *current != state;
            if changed {
                *current = state.clone();
            }
            changed
        });
        let now = Instant::now();
        let waited = self.rule.waited(now);
        let due = match &self.reported {
            Some((last, at)) => *last != state || now.duration_since(*at) >= JOIN_REMINDER,
            // Waiting for the first seed's join timeout is normal: say nothing before twice it.
            None => {
                matches!(state, JoinState::GaveUp(_)) || waited >= self.settings.join_timeout * 2
            }
        };
        if !due {
            return;
        }
        match &state {
            JoinState::Joining(blocker) => warn!(
                ?waited,
                give_up_after = ?self.settings.give_up_after,
                "cannot join the cluster yet: {blocker}"
            ),
            JoinState::GaveUp(blocker) => error!(
                ?waited,
                "giving up joining the cluster (cluster.give_up_joining_after): {blocker}"
            ),
            JoinState::Joined => info!(?waited, "joined the cluster"),
        }
        self.reported = Some((state, now));
    }

    /// Reachability, debounced: a run seen reachable counts as reachable until it has been
    /// silent for `down_after`, then as unreachable (returned; the downing strategy decides
    /// whether it is down, and until then it keeps the status it announced). A run never seen
    /// reachable is down at once (it may be a stale record of a past run). Without a strategy
    /// an unreachable run is down.
    fn apply_down_after(&mut self, nodes: &mut [GossipNode]) -> BTreeSet<NodeAddr> {
        let now = Instant::now();
        let resolve = self.resolver.strategy() != Strategy::Off;
        let mut unreachable = BTreeSet::new();
        for node in nodes.iter_mut() {
            if node.alive {
                self.unreachable_since.insert(node.addr.clone(), None);
            } else if let Some(since) = self.unreachable_since.get_mut(&node.addr) {
                let since = *since.get_or_insert(now);
                let silent_long = now.duration_since(since) >= self.settings.down_after;
                if silent_long {
                    unreachable.insert(node.addr.clone());
                }
                node.alive = !silent_long || resolve;
            }
        }
        let present: HashSet<&NodeAddr> = nodes.iter().map(|n| &n.addr).collect();
        self.unreachable_since
            .retain(|addr, _| present.contains(addr));
        unreachable
    }

    /// Runs the downing strategy on `view`: marks the runs this node or any other member
    /// declared down as `Down`, downs this node when it must, and announces its own decisions.
    async fn apply_downing(
        &mut self,
        view: &mut ClusterView,
        unreachable: BTreeSet<NodeAddr>,
        by_others: &BTreeSet<NodeAddr>,
        nodes: &[GossipNode],
    ) {
        if by_others.contains(&self.me.addr) {
            self.resolver.handle_downed_by_others();
        }
        let downed: BTreeSet<&NodeAddr> = self.resolver.downed().iter().chain(by_others).collect();
        for member in view.members.values_mut() {
            if member.addr != self.me.addr && downed.contains(&member.addr) {
                member.status = MemberStatus::Down;
            }
        }
        view.unreachable = view
            .members
            .values()
            .filter(|m| m.status != MemberStatus::Down && unreachable.contains(&m.addr))
            .map(|m| m.addr.clone())
            .collect();
        let was_down = self.resolver.downed_self().is_some();
        let members: Vec<&Member> = view.members.values().collect();
        self.resolver
            .handle_view(Instant::now(), &self.me.addr, &members, &view.unreachable);
        if let Some(request) = self.resolver.lease_request(Instant::now()).cloned() {
            let answer = self.ask_lease(&request).await;
            self.resolver.handle_lease(Instant::now(), answer);
        }
        let present: HashSet<&NodeAddr> = nodes.iter().map(|n| &n.addr).collect();
        self.resolver.retain(|addr| present.contains(addr));
        if let Some(reason) = self.resolver.downed_self().cloned()
            && !was_down
        {
            error!(
                node = %self.me.addr,
                strategy = self.resolver.strategy().name(),
                unreachable = ?view.unreachable,
                "downing this node: {reason}"
            );
            self.downed_self.send_replace(Some(reason));
            self.set_status(MemberStatus::Down).await;
            if let Some(me) = view.members.get_mut(&self.me.addr.id) {
                me.status = MemberStatus::Down;
            }
        } else if *self.resolver.downed() != self.published_downed {
            // The status is unchanged; the keys carry the new list.
            self.set_status(self.me.status).await;
        }
    }

    /// Asks for the lease as `request.holder`: `Ok` if this side has it. Asked again while a
    /// store does not answer, for two thirds of the removal margin at most: a side that cannot
    /// tell by then goes, before the other side (which got it) takes over. The lease is not
    /// released: it expires after [`LEASE_TTL`], so a side that decides late (its tracker or
    /// its view held it back) cannot get it while the winners still count on it.
    async fn ask_lease(&self, request: &LeaseRequest) -> Result<(), String> {
        let Some(lease) = &self.lease else {
            return Err("no lease is configured".to_owned());
        };
        let budget = (self.settings.downing.down_removal_margin * 2 / 3).max(LEASE_PAUSE);
        let ask = async {
            loop {
                match lease.acquire(&request.holder, LEASE_TTL).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => return Err("another side holds it".to_owned()),
                    Err(error) => {
                        warn!(%error, "cannot ask for the lease; asking again");
                        tokio::time::sleep(LEASE_PAUSE).await;
                    }
                }
            }
        };
        let answer = tokio::time::timeout(budget, ask)
            .await
            .unwrap_or_else(|_| Err(format!("the lease store did not answer within {budget:?}")));
        if answer.is_ok() {
            info!(holder = %request.holder, "this side of the partition got the lease");
        }
        answer
    }

    /// Publishes this node's status, and the runs it declared down, under a new signature.
    async fn set_status(&mut self, status: MemberStatus) {
        self.me.status = status;
        self.published_downed = self.resolver.downed().clone();
        let mut chitchat = self.chitchat.lock().await;
        let state = chitchat.self_node_state();
        // The status and its new signature go out together.
        for (key, value) in own_keys(&self.me, &self.published_downed, &self.security) {
            state.set(key, value);
        }
    }

    async fn gossip_nodes(&self) -> Vec<GossipNode> {
        let chitchat = self.chitchat.lock().await;
        let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
        chitchat
            .node_states()
            .iter()
            .map(|(id, state)| GossipNode {
                addr: NodeAddr {
                    id: NodeId::new(id.node_id.clone()),
                    generation: id.generation_id,
                },
                alive: live.contains(id),
                keys: state
                    .key_values()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
