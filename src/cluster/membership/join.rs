//! The seed-join rule, as a pure decision over explicit time (Akka's seed-node process). A node
//! without seeds forms a cluster at once: a deliberate cluster of one. The node listed first
//! in its own seed list (of a first seed that names several addresses, the lowest: see
//! [`super::seeds`]) may form a cluster too, but only once `join_timeout` has passed without
//! meeting an Up member. Every other node keeps joining until it meets one, and gives up after
//! `give_up_after`. So a node that cannot reach its seeds (a blip at start, a typo, a firewall,
//! a wrong secret) never starts a second cluster of its own, with its own singletons.
//!
//! Why a joining node waits is worked out here too ([`JoinBlocker`]), from what gossip shows and
//! from what the driver's handshake probes of the seeds said; the probes themselves live in
//! [`crate::cluster::transport::probe`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::transport::probe::ProbeOutcome;

/// What this node may do about forming a cluster, from its seed list (and, for a seed given by
/// a DNS name, from what the name resolves to: it may change while the node joins).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedRole {
    /// No seeds: the node is a cluster of one from the start.
    Alone,
    /// This node is the first of its seeds: it forms the cluster when nobody else has.
    FirstSeed,
    /// Any other node: it only ever joins.
    Joiner,
}

/// Where the join stands; published by membership and shown by `/cluster` and `/health`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinState {
    /// Still looking for a cluster, and why none was joined yet.
    Joining(JoinBlocker),
    /// This node is a member (it joined one, or formed one).
    Joined,
    /// It stopped trying after `give_up_after`; the node should stop.
    GaveUp(JoinBlocker),
}

/// Why a joining node has not joined yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinBlocker {
    /// Too early to say: no probe has answered and gossip met nobody.
    Starting,
    /// No seed could be reached at all (connection refused, timed out, no route).
    Unreachable {
        /// Each seed and what its last probe said.
        seeds: BTreeMap<String, String>,
    },
    /// A seed was reached but refused the handshake: a wrong secret, or a certificate of
    /// another CA.
    Refused {
        /// The seed that refused.
        seed: String,
        /// Its reason, or ours.
        reason: String,
    },
    /// A seed accepts our secret, but its gossip shows us no member: another `cluster_name`?
    NoGossip {
        /// The seed that answered the handshake.
        seed: String,
    },
    /// Other nodes are there, none of them Up: the first seed has not formed the cluster.
    NoUpMember {
        /// The nodes met, none Up.
        met: Vec<String>,
    },
}

impl fmt::Display for JoinBlocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JoinBlocker::Starting => write!(f, "no seed has answered yet"),
            JoinBlocker::Unreachable { seeds } => {
                write!(f, "no seed is reachable (")?;
                for (i, (seed, why)) in seeds.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "; " };
                    write!(f, "{sep}{seed}: {why}")?;
                }
                write!(f, ")")
            }
            JoinBlocker::Refused { seed, reason } => write!(
                f,
                "seed {seed} refused the handshake ({reason}): is cluster.secret the same on every node, and with cluster.tls, is every node's certificate signed by the same cluster CA?"
            ),
            JoinBlocker::NoGossip { seed } => write!(
                f,
                "seed {seed} accepts this node's secret but its gossip does not answer: is cluster.cluster_name the same on every node?"
            ),
            JoinBlocker::NoUpMember { met } => write!(
                f,
                "no member is Up yet (met {}): the first node of cluster.seeds forms the cluster",
                met.join(", ")
            ),
        }
    }
}

/// What the rule says after an observation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinDecision {
    /// Announce Up now.
    BecomeUp,
    /// Keep joining.
    Wait,
    /// Stop trying: `give_up_after` has passed.
    GiveUp,
}

/// The rule for one node's join. Feed it what gossip shows with [`Self::handle_view`] and what
/// probes said with [`Self::handle_probe`]; it answers with a [`JoinDecision`] and keeps the
/// current [`JoinBlocker`] for the logs and the status page.
#[derive(Debug)]
pub struct JoinRule {
    role: SeedRole,
    join_timeout: Duration,
    give_up_after: Option<Duration>,
    started: Instant,
    /// Since when the role has been what it is: the first seed's `join_timeout` counts from
    /// here, so a node that only now resolves as the first seed waits its full timeout.
    role_since: Instant,
    /// Whether an Up member was seen: Up follows one observation later, so this node has
    /// had a gossip round to learn who else is there (and agrees with them on who is oldest).
    met_up_member: bool,
    probes: BTreeMap<String, ProbeOutcome>,
    met: Vec<String>,
    decided: Option<JoinDecision>,
}

impl JoinRule {
    /// A rule for a node with `role`, starting at `now`.
    pub fn new(
        role: SeedRole,
        join_timeout: Duration,
        give_up_after: Option<Duration>,
        now: Instant,
    ) -> Self {
        JoinRule {
            role,
            join_timeout,
            give_up_after,
            started: now,
            role_since: now,
            met_up_member: false,
            probes: BTreeMap::new(),
            met: Vec::new(),
            decided: None,
        }
    }

    /// The node's seed role.
    pub fn role(&self) -> SeedRole {
        self.role
    }

    /// How long this node has been joining at `now`.
    pub fn waited(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    /// The seed list resolved anew at `now`: this node's role, and the seeds there are to probe
    /// (what earlier probes said of any other is forgotten).
    pub fn handle_seeds(&mut self, role: SeedRole, seeds: &[String], now: Instant) {
        if role != self.role {
            self.role = role;
            self.role_since = now;
        }
        self.probes.retain(|seed, _| seeds.contains(seed));
    }

    /// Records what the latest handshake probe of `seed` said.
    pub fn handle_probe(&mut self, seed: &str, outcome: ProbeOutcome) {
        self.probes.insert(seed.to_owned(), outcome);
    }

    /// Decides from one gossip observation at `now`: `others_up` says whether any other node is
    /// Up, `others` names the other nodes gossip showed (any status). Once it has said
    /// [`JoinDecision::BecomeUp`] or [`JoinDecision::GiveUp`] it keeps saying so.
    pub fn handle_view(
        &mut self,
        now: Instant,
        others_up: bool,
        others: &[String],
    ) -> JoinDecision {
        if let Some(decided) = self.decided {
            return decided;
        }
        self.met = others.to_vec();
        let waited = self.waited(now);
        let decision = match self.role {
            SeedRole::Alone => JoinDecision::BecomeUp,
            _ if self.met_up_member => JoinDecision::BecomeUp,
            SeedRole::FirstSeed
                if now.saturating_duration_since(self.role_since) >= self.join_timeout
                    && !others_up =>
            {
                JoinDecision::BecomeUp
            }
            _ if self.give_up_after.is_some_and(|limit| waited >= limit) => JoinDecision::GiveUp,
            _ => JoinDecision::Wait,
        };
        self.met_up_member |= others_up;
        if decision != JoinDecision::Wait {
            self.decided = Some(decision);
        }
        decision
    }

    /// Where the join stands now.
    pub fn state(&self) -> JoinState {
        match self.decided {
            Some(JoinDecision::BecomeUp) => JoinState::Joined,
            Some(JoinDecision::GiveUp) => JoinState::GaveUp(self.blocker()),
            _ => JoinState::Joining(self.blocker()),
        }
    }

    /// Why this node has not joined: what gossip shows comes first (it is the stronger
    /// evidence), then what the probes of the seeds said.
    pub fn blocker(&self) -> JoinBlocker {
        if !self.met.is_empty() {
            return JoinBlocker::NoUpMember {
                met: self.met.clone(),
            };
        }
        if let Some((seed, reason)) = self
            .probes
            .iter()
            .find_map(|(seed, outcome)| match outcome {
                ProbeOutcome::Refused(reason) => Some((seed, reason)),
                _ => None,
            })
        {
            return JoinBlocker::Refused {
                seed: seed.clone(),
                reason: reason.clone(),
            };
        }
        if let Some(seed) = self
            .probes
            .iter()
            .find_map(|(seed, outcome)| (*outcome == ProbeOutcome::Accepted).then_some(seed))
        {
            return JoinBlocker::NoGossip { seed: seed.clone() };
        }
        if self.probes.is_empty() {
            return JoinBlocker::Starting;
        }
        JoinBlocker::Unreachable {
            seeds: self
                .probes
                .iter()
                .filter_map(|(seed, outcome)| match outcome {
                    ProbeOutcome::Unreachable(why) => Some((seed.clone(), why.clone())),
                    _ => None,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOIN: Duration = Duration::from_secs(3);
    const GIVE_UP: Duration = Duration::from_secs(60);

    fn rule(role: SeedRole, start: Instant) -> JoinRule {
        JoinRule::new(role, JOIN, Some(GIVE_UP), start)
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn a_node_without_seeds_is_up_at_once() {
        let start = Instant::now();
        let mut rule = rule(SeedRole::Alone, start);
        assert_eq!(rule.handle_view(start, false, &[]), JoinDecision::BecomeUp);
        assert_eq!(rule.state(), JoinState::Joined);
    }

    #[test]
    fn the_first_seed_forms_the_cluster_only_after_the_join_timeout() {
        let start = Instant::now();
        let mut rule = rule(SeedRole::FirstSeed, start);
        let others = names(&["n2", "n3"]);
        assert_eq!(rule.handle_view(start, false, &others), JoinDecision::Wait);
        let almost = start + JOIN - Duration::from_millis(1);
        assert_eq!(rule.handle_view(almost, false, &others), JoinDecision::Wait);
        assert_eq!(
            rule.handle_view(start + JOIN, false, &others),
            JoinDecision::BecomeUp
        );
        // Decided once and for all: a later view does not take it back.
        assert_eq!(
            rule.handle_view(start + GIVE_UP * 2, false, &[]),
            JoinDecision::BecomeUp
        );
    }

    #[test]
    fn a_node_that_becomes_the_first_seed_while_joining_waits_a_whole_join_timeout_from_then() {
        let start = Instant::now();
        let mut rule = rule(SeedRole::Joiner, start);
        let others = names(&["n2"]);
        assert_eq!(
            rule.handle_view(start + JOIN * 2, false, &others),
            JoinDecision::Wait
        );
        // The seed name now resolves with this node lowest: the timeout starts over.
        let resolved = start + JOIN * 2;
        rule.handle_seeds(
            SeedRole::FirstSeed,
            &names(&["warren:7351 (10.0.0.2:7351)"]),
            resolved,
        );
        assert_eq!(rule.role(), SeedRole::FirstSeed);
        let almost = resolved + JOIN - Duration::from_millis(1);
        assert_eq!(rule.handle_view(almost, false, &others), JoinDecision::Wait);
        assert_eq!(
            rule.handle_view(resolved + JOIN, false, &others),
            JoinDecision::BecomeUp
        );
    }

    #[test]
    fn probes_of_seeds_no_longer_resolved_are_forgotten() {
        let start = Instant::now();
        let mut rule = rule(SeedRole::Joiner, start);
        rule.handle_probe("a", ProbeOutcome::Refused("wrong secret".into()));
        rule.handle_seeds(SeedRole::Joiner, &names(&["b"]), start);
        assert_eq!(rule.blocker(), JoinBlocker::Starting);
    }

    #[test]
    fn a_node_that_meets_an_up_member_is_up_one_round_later() {
        for role in [SeedRole::FirstSeed, SeedRole::Joiner] {
            let start = Instant::now();
            let mut rule = rule(role, start);
            let round = Duration::from_millis(200);
            assert_eq!(
                rule.handle_view(start + round, true, &names(&["n1"])),
                JoinDecision::Wait,
                "{role:?} waits a round to learn the others"
            );
            assert_eq!(
                rule.handle_view(start + round * 2, true, &names(&["n1", "n3"])),
                JoinDecision::BecomeUp
            );
        }
    }

    #[test]
    fn a_joiner_never_forms_a_cluster_and_gives_up_at_the_limit() {
        let start = Instant::now();
        let mut rule = rule(SeedRole::Joiner, start);
        let mut now = start;
        while now < start + GIVE_UP {
            assert_eq!(
                rule.handle_view(now, false, &[]),
                JoinDecision::Wait,
                "at {now:?}"
            );
            now += Duration::from_millis(500);
        }
        assert_eq!(rule.handle_view(now, false, &[]), JoinDecision::GiveUp);
        assert!(matches!(rule.state(), JoinState::GaveUp(_)));
        assert_eq!(
            rule.handle_view(now + JOIN, true, &[]),
            JoinDecision::GiveUp,
            "an Up member met after giving up changes nothing"
        );
    }

    #[test]
    fn the_first_seed_that_meets_an_up_cluster_joins_it_rather_than_forming_another() {
        // A restarted first seed: the others are already Up.
        let start = Instant::now();
        let mut rule = rule(SeedRole::FirstSeed, start);
        assert_eq!(
            rule.handle_view(start + JOIN, true, &names(&["n2"])),
            JoinDecision::Wait
        );
        assert_eq!(
            rule.handle_view(start + JOIN * 2, true, &names(&["n2"])),
            JoinDecision::BecomeUp
        );
    }

    #[test]
    fn without_a_limit_a_joiner_waits_forever() {
        let start = Instant::now();
        let mut rule = JoinRule::new(SeedRole::Joiner, JOIN, None, start);
        let much_later = start + Duration::from_secs(365 * 24 * 3600);
        assert_eq!(rule.handle_view(much_later, false, &[]), JoinDecision::Wait);
    }

    #[test]
    fn the_blocker_says_what_stands_in_the_way() {
        let start = Instant::now();
        let mut rule = rule(SeedRole::Joiner, start);
        assert_eq!(rule.blocker(), JoinBlocker::Starting);

        rule.handle_probe(
            "127.0.0.1:1",
            ProbeOutcome::Unreachable("connection refused".to_owned()),
        );
        let JoinBlocker::Unreachable { seeds } = rule.blocker() else {
            panic!("{:?}", rule.blocker());
        };
        assert_eq!(seeds.len(), 1);

        rule.handle_probe(
            "127.0.0.1:2",
            ProbeOutcome::Refused("the peer does not hold the cluster secret".to_owned()),
        );
        assert!(
            matches!(rule.blocker(), JoinBlocker::Refused { seed, .. } if seed == "127.0.0.1:2")
        );
        assert!(rule.blocker().to_string().contains("cluster.secret"));

        rule.handle_probe("127.0.0.1:2", ProbeOutcome::Accepted);
        assert_eq!(
            rule.blocker(),
            JoinBlocker::NoGossip {
                seed: "127.0.0.1:2".to_owned()
            }
        );

        rule.handle_view(start, false, &names(&["n1"]));
        assert_eq!(
            rule.blocker(),
            JoinBlocker::NoUpMember {
                met: names(&["n1"])
            }
        );
        assert_eq!(rule.state(), JoinState::Joining(rule.blocker()));
    }
}
