//! Who is in the cluster: node identities, members with their status, roles and age, and the
//! [`ClusterView`] every other layer reads. Pure data; membership computes views, it does not
//! live here.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use crate::ids::{NodeAddr, NodeId};

/// A member's place in its life cycle (Akka's member status, without the leader's moves:
/// every node announces its own status, and a failure detector decides `Down`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberStatus {
    /// Seen, but not yet serving: it is still learning who else is there.
    Joining,
    /// Serving: may host shards and singletons.
    Up,
    /// Leaving gracefully: handing its work over before it stops.
    Leaving,
    /// Gone: stopped, crashed, or unreachable beyond the failure detector's threshold.
    Down,
}

impl MemberStatus {
    /// Every status, for metrics.
    pub const ALL: [MemberStatus; 4] = [
        MemberStatus::Joining,
        MemberStatus::Up,
        MemberStatus::Leaving,
        MemberStatus::Down,
    ];

    /// The status as a short label.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberStatus::Joining => "joining",
            MemberStatus::Up => "up",
            MemberStatus::Leaving => "leaving",
            MemberStatus::Down => "down",
        }
    }

    /// Parses [`Self::as_str`]'s labels.
    pub fn parse(label: &str) -> Option<Self> {
        MemberStatus::ALL.into_iter().find(|s| s.as_str() == label)
    }
}

/// One node as the cluster sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Which node, which run.
    pub addr: NodeAddr,
    /// Where its cluster transport listens.
    pub rpc_addr: SocketAddr,
    /// What it may run (a singleton or shards need a role).
    pub roles: BTreeSet<String>,
    /// Where it is in its life cycle.
    pub status: MemberStatus,
    /// When this run started, in milliseconds since the epoch: the older member wins a
    /// singleton.
    pub started_at_ms: u64,
}

impl Member {
    /// Akka's age order: earlier start first, the address breaking ties, so every node that
    /// sees the same members agrees on who is oldest.
    pub fn age_key(&self) -> (u64, &NodeAddr) {
        (self.started_at_ms, &self.addr)
    }

    /// Has `role`; an empty role asks for any member.
    pub fn has_role(&self, role: &str) -> bool {
        role.is_empty() || self.roles.contains(role)
    }
}

/// The members one node knows about, as of one moment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The node holding this view.
    pub self_addr: NodeAddr,
    /// Members by name; only the newest run of each name is kept.
    pub members: BTreeMap<NodeId, Member>,
    /// Members this node cannot reach and the downing strategy has not (yet) declared down:
    /// they keep their status (and their shards and singletons) until it does.
    #[serde(default)]
    pub unreachable: BTreeSet<NodeAddr>,
}

impl ClusterView {
    /// A view holding only `me`.
    pub fn alone(me: Member) -> Self {
        ClusterView {
            self_addr: me.addr.clone(),
            members: BTreeMap::from([(me.addr.id.clone(), me)]),
            unreachable: BTreeSet::new(),
        }
    }

    /// This node's own entry.
    pub fn me(&self) -> Option<&Member> {
        self.members.get(&self.self_addr.id)
    }

    /// The member running as `addr` (that name and that run).
    pub fn member(&self, addr: &NodeAddr) -> Option<&Member> {
        self.members.get(&addr.id).filter(|m| &m.addr == addr)
    }

    /// `addr` is a member and Up.
    pub fn is_up(&self, addr: &NodeAddr) -> bool {
        self.member(addr)
            .is_some_and(|m| m.status == MemberStatus::Up)
    }

    /// `addr` is a member and not Down: it may still hold work (Joining, Up or Leaving).
    pub fn is_alive(&self, addr: &NodeAddr) -> bool {
        self.member(addr)
            .is_some_and(|m| m.status != MemberStatus::Down)
    }

    /// The oldest Up member with `role`: where a singleton for that role runs.
    pub fn oldest_up(&self, role: &str) -> Option<&Member> {
        self.members
            .values()
            .filter(|m| m.status == MemberStatus::Up && m.has_role(role))
            .min_by(|a, b| a.age_key().cmp(&b.age_key()))
    }

    /// The Up member with `role` at `rank`, oldest first, counting round when `rank` is
    /// larger than their number: rank 0 is [`Self::oldest_up`], and ranks 0 … k−1 name k
    /// different members while there are at least k, which spreads singletons over them.
    pub fn nth_oldest_up(&self, role: &str, rank: usize) -> Option<&Member> {
        let mut up: Vec<&Member> = self
            .members
            .values()
            .filter(|m| m.status == MemberStatus::Up && m.has_role(role))
            .collect();
        if up.is_empty() {
            return None;
        }
        up.sort_by(|a, b| a.age_key().cmp(&b.age_key()));
        Some(up[rank % up.len()])
    }

    /// How many members have each status.
    pub fn count_by_status(&self) -> BTreeMap<MemberStatus, usize> {
        let mut counts: BTreeMap<MemberStatus, usize> =
            MemberStatus::ALL.into_iter().map(|s| (s, 0)).collect();
        for member in self.members.values() {
            *counts.entry(member.status).or_default() += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn member(id: &str, started_at_ms: u64, status: MemberStatus) -> Member {
        Member {
            addr: NodeAddr {
                id: NodeId::new(id),
                generation: started_at_ms,
            },
            rpc_addr: "127.0.0.1:1".parse().unwrap(),
            roles: BTreeSet::from(["shard-host".to_owned()]),
            status,
            started_at_ms,
        }
    }

    fn view(members: Vec<Member>) -> ClusterView {
        let mut view = ClusterView::alone(members[0].clone());
        for m in members {
            view.members.insert(m.addr.id.clone(), m);
        }
        view
    }

    #[test]
    fn the_oldest_up_member_with_the_role_is_the_same_wherever_it_is_computed() {
        let a = member("a", 30, MemberStatus::Up);
        let b = member("b", 10, MemberStatus::Leaving);
        let c = member("c", 20, MemberStatus::Up);
        let mut d = member("d", 5, MemberStatus::Up);
        d.roles.clear();
        let v = view(vec![a, b, c, d]);
        assert_eq!(
            v.oldest_up("shard-host").map(|m| m.addr.id.as_str()),
            Some("c")
        );
        assert_eq!(v.oldest_up("").map(|m| m.addr.id.as_str()), Some("d"));
        let ties = view(vec![
            member("y", 7, MemberStatus::Up),
            member("x", 7, MemberStatus::Up),
        ]);
        assert_eq!(ties.oldest_up("").map(|m| m.addr.id.as_str()), Some("x"));
    }

    #[test]
    fn ranks_name_distinct_up_members_oldest_first_and_count_round() {
        let mut d = member("d", 5, MemberStatus::Up);
        d.roles.clear();
        let v = view(vec![
            member("a", 30, MemberStatus::Up),
            member("b", 10, MemberStatus::Leaving),
            member("c", 20, MemberStatus::Up),
            d,
            member("e", 40, MemberStatus::Up),
        ]);
        let at = |rank| {
            v.nth_oldest_up("shard-host", rank)
                .map(|m| m.addr.id.as_str())
        };
        assert_eq!([at(0), at(1), at(2)], [Some("c"), Some("a"), Some("e")]);
        assert_eq!([at(3), at(4)], [Some("c"), Some("a")], "counting round");
        assert_eq!(at(0), v.oldest_up("shard-host").map(|m| m.addr.id.as_str()));
        assert!(v.nth_oldest_up("bridge", 0).is_none());
    }

    #[test]
    fn a_member_is_known_by_its_run_not_only_its_name() {
        let v = view(vec![member("a", 30, MemberStatus::Up)]);
        let old_run = NodeAddr {
            id: NodeId::new("a"),
            generation: 29,
        };
        assert!(!v.is_up(&old_run));
        assert!(v.is_up(&member("a", 30, MemberStatus::Up).addr));
    }

    #[test]
    fn statuses_round_trip_through_their_labels() {
        for status in MemberStatus::ALL {
            assert_eq!(MemberStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(MemberStatus::parse("weird"), None);
    }
}
