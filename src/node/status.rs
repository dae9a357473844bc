//! What a node shows about the cluster (`GET /cluster`): members, where the singletons run,
//! what is hosted here, and, asked over the cluster, the shards of every live member.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::cluster::member::{ClusterView, Member, MemberStatus};
use crate::cluster::membership::join::JoinState;
use crate::delivery::durable::wall_clock_millis;
use crate::node::ClusterNode;
use crate::node::queries::Answer;
use crate::node::wire::NodeMsg;
use crate::sharding::driver::RegionStatus;
use crate::sharding::shard::ShardId;

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
    /// Which start of it: tells a restarted node from the run before.
    pub generation: u64,
    /// Joining, up, leaving or down.
    pub status: String,
    /// Its roles.
    pub roles: Vec<String>,
    /// Milliseconds since it started; the oldest runs the singletons.
    pub age_ms: u64,
    /// Its cluster address.
    pub address: String,
}

impl<M> ClusterNode<M>
where
    M: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// What this node knows about the cluster.
    pub fn status(&self) -> ClusterStatus {
        let view = self.membership.view().borrow().clone();
        self.status_in(&view)
    }

    /// [`Self::status`] plus the shards every live member hosts, asked over the cluster (up to
    /// `timeout` for their answers).
    pub async fn cluster_status(&self, timeout: Duration) -> ClusterStatus {
        let view = self.membership.view().borrow().clone();
        let mut status = self.status_in(&view);
        status
            .shards
            .insert(status.node.clone(), status.shards_here.clone());
        let mut questions = Vec::new();
        for member in view.members.values() {
            // An unreachable member would only make the whole answer wait for the timeout.
            let alive = matches!(member.status, MemberStatus::Up | MemberStatus::Leaving)
                && !view.unreachable.contains(&member.addr);
            if member.addr == self.me || !alive {
                continue;
            }
            let question = self.queries.open();
            let request = question.request;
            self.transport
                .send(&member.addr, NodeMsg::ShardsRequest { request });
            questions.push((member.addr.id.to_string(), question));
        }
        let deadline = Instant::now() + timeout;
        for (node, mut question) in questions {
            if let Ok(Answer::Shards(shards)) = question.answer_by(deadline).await {
                status.shards.insert(node, shards);
            }
        }
        status
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
                .singleton_placements
                .iter()
                .map(|(name, placement)| {
                    let holder = placement.host(view).map(|m| m.addr.id.to_string());
                    (name.clone(), holder)
                })
                .collect(),
            singletons_here: self.singletons.running().borrow().iter().cloned().collect(),
            shards_here: shard_numbers(&region),
            entities_here: region.entities,
            shards: BTreeMap::new(),
        }
    }
}

/// The shards a region hosts, as plain numbers.
pub(crate) fn shard_numbers(region: &RegionStatus) -> Vec<u32> {
    region.hosted.iter().map(|ShardId(s)| *s).collect()
}
