//! Membership: who is in the cluster, kept by chitchat (scuttlebutt gossip over UDP with
//! phi-accrual failure detection), and published as a [`ClusterView`] on a watch channel
//! ([`view`] holds the rules). Gossip runs under a cluster id derived from the secret and
//! member records are signed with it (see [`crate::cluster::auth`]): chitchat keeps its wire
//! format private, so authentication lives in the records rather than in the datagrams.
//!
//! Each node announces its own status: `joining` at start, `up` once it has met an Up member
//! (after one more gossip round, so it knows who else is there) or after `join_timeout` alone
//! (it forms the cluster), `leaving` while it hands work over, `down` just before it stops. A
//! node that stops gossiping becomes `Down` once the failure detector has called it
//! unreachable for `down_after` without a break.
//!
//! Nodes started together all wait `join_timeout` before forming a cluster, which lets their
//! gossip meet first, so they agree on who is oldest. Two partitions that never met can each
//! form a cluster: the broker's single-active-consumer is the fence for that case.

pub mod view;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, spawn_chitchat};
use tokio::sync::{Mutex, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::cluster::auth::Security;
use crate::cluster::member::{ClusterView, Member, MemberStatus, NodeAddr, NodeId};
use crate::cluster::metrics::ClusterMetrics;
use view::{GossipNode, KnownMembers, own_keys, view_from_gossip};

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
    /// How long a member that was reachable must stay unreachable before it is `Down`: the
    /// failure detector alone reacts within a fraction of a second, which a busy machine's
    /// pauses would trip (Akka's downing waits for a stable unreachability the same way).
    pub down_after: Duration,
    /// How long a node with seeds waits to meet an Up member before forming a cluster.
    pub join_timeout: Duration,
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
            join_timeout: Duration::from_secs(3),
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
    chitchat: ChitchatHandle,
    view: watch::Receiver<ClusterView>,
    changes: mpsc::Sender<Change>,
    task: JoinHandle<()>,
    gossip_interval: Duration,
}

impl Membership {
    /// Starts gossiping as `me` (whose status should be `Joining`) on `gossip_addr`.
    pub async fn start(
        me: Member,
        gossip_addr: SocketAddr,
        settings: MembershipSettings,
        security: Security,
        metrics: ClusterMetrics,
    ) -> Result<Self, MembershipError> {
        let chitchat_id = ChitchatId::new(
            me.addr.id.as_str().to_owned(),
            me.addr.generation,
            gossip_addr,
        );
        let config = ChitchatConfig {
            chitchat_id,
            cluster_id: security.gossip_cluster_id(&settings.cluster_name),
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
        };
        let chitchat = spawn_chitchat(config, own_keys(&me, &security), &UdpTransport)
            .await
            .map_err(|e| MembershipError::Gossip(format!("{e:#}")))?;
        let (view_tx, view) = watch::channel(ClusterView::alone(me.clone()));
        let (changes, changes_rx) = mpsc::channel(8);
        let task = tokio::spawn(
            Tracker {
                chitchat: chitchat.chitchat(),
                me,
                settings: settings.clone(),
                security,
                known: KnownMembers::new(),
                unreachable_since: HashMap::new(),
                started: Instant::now(),
                met_up_member: false,
                view: view_tx,
                metrics,
            }
            .run(changes_rx),
        );
        Ok(Membership {
            chitchat,
            view,
            changes,
            task,
            gossip_interval: settings.gossip_interval,
        })
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
    /// detector, then stops gossiping.
    pub async fn shutdown(self) {
        self.announce(MemberStatus::Down).await;
        self.task.abort();
        if let Err(error) = self.chitchat.shutdown().await {
            warn!(error = %format!("{error:#}"), "gossip did not stop cleanly");
        }
    }

    /// Stops gossiping without a word, as a crash would (tests).
    #[cfg(any(test, feature = "testkit"))]
    pub fn crash(self) {
        self.task.abort();
        self.chitchat.abort();
    }

    async fn announce(&self, status: MemberStatus) {
        let mut view = self.view.clone();
        if self.changes.send(Change::Status(status)).await.is_err() {
            return;
        }
        let _ = view
            .wait_for(|v| v.me().is_some_and(|m| m.status == status))
            .await;
        // Peers learn it on their next exchange with us or with someone who has it.
        tokio::time::sleep(self.gossip_interval * 2).await;
    }
}

/// Reads chitchat's state every gossip interval and turns it into views; runs the join rule.
struct Tracker {
    chitchat: Arc<Mutex<chitchat::Chitchat>>,
    me: Member,
    settings: MembershipSettings,
    security: Security,
    known: KnownMembers,
    /// Runs seen reachable once, and since when they are unreachable (if they are).
    unreachable_since: HashMap<NodeAddr, Option<Instant>>,
    started: Instant,
    met_up_member: bool,
    view: watch::Sender<ClusterView>,
    metrics: ClusterMetrics,
}

impl Tracker {
    async fn run(mut self, mut changes: mpsc::Receiver<Change>) {
        let mut tick = tokio::time::interval(self.settings.gossip_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                Some(Change::Status(status)) = changes.recv() => self.set_status(status).await,
            }
            let mut nodes = self.gossip_nodes().await;
            self.apply_down_after(&mut nodes);
            let (mut view, untrusted) =
                view_from_gossip(&self.me, &nodes, &self.security, &mut self.known);
            if self.me.status == MemberStatus::Joining && self.ready_to_be_up(&view) {
                info!(node = %self.me.addr, "member is up");
                self.set_status(MemberStatus::Up).await;
                view.members
                    .insert(self.me.addr.id.clone(), self.me.clone());
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

    /// Up once an Up member was seen one round ago (so this node has had a round to learn the
    /// others), or alone after the join timeout, or at once without seeds.
    fn ready_to_be_up(&mut self, view: &ClusterView) -> bool {
        if self.settings.seeds.is_empty() {
            return true;
        }
        if self.met_up_member {
            return true;
        }
        self.met_up_member = view
            .members
            .values()
            .any(|m| m.addr != self.me.addr && m.status == MemberStatus::Up);
        self.started.elapsed() >= self.settings.join_timeout
    }

    /// A run seen reachable counts as alive until it has been unreachable for `down_after`;
    /// a run never seen reachable is down at once (it may be a stale record of a past run).
    fn apply_down_after(&mut self, nodes: &mut [GossipNode]) {
        let now = Instant::now();
        for node in nodes.iter_mut() {
            if node.alive {
                self.unreachable_since.insert(node.addr.clone(), None);
            } else if let Some(since) = self.unreachable_since.get_mut(&node.addr) {
                let since = *since.get_or_insert(now);
                node.alive = now.duration_since(since) < self.settings.down_after;
            }
        }
        let present: std::collections::HashSet<&NodeAddr> = nodes.iter().map(|n| &n.addr).collect();
        self.unreachable_since
            .retain(|addr, _| present.contains(addr));
    }

    async fn set_status(&mut self, status: MemberStatus) {
        self.me.status = status;
        let mut chitchat = self.chitchat.lock().await;
        let state = chitchat.self_node_state();
        // The status and its new signature go out together.
        for (key, value) in own_keys(&self.me, &self.security) {
            state.set(key, value);
        }
    }

    async fn gossip_nodes(&self) -> Vec<GossipNode> {
        let chitchat = self.chitchat.lock().await;
        let live: std::collections::HashSet<&ChitchatId> = chitchat.live_nodes().collect();
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
