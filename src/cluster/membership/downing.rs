//! Downing: which side of a split survives (Akka's split-brain resolver). Pure: the membership
//! tracker feeds it what this node sees (the members that count, and which of them it cannot
//! reach) with the time, and reads back which runs are down and whether this node must down
//! itself. No clock, no I/O.
//!
//! The rule is the same on every node, so the sides of a partition reach opposite answers
//! without talking: each node waits until its unreachable set has not changed for
//! `stable_after`, then applies the strategy to "my side" (itself and every member it reaches)
//! against "the other side" (the unreachable ones). A losing side downs itself at once; a
//! winning side downs the others only `down_removal_margin` later, so the losers have stopped
//! before anyone takes their shards and singletons over. A decision is final for those runs:
//! a healed partition does not bring a downed run back (it must restart as a new run). A run
//! that can be reached again when the margin ends, and has not downed itself, saw the heal in
//! time: it is not downed, and its work stays where it is. A node whose view keeps changing
//! while members are unreachable downs itself once that has lasted `stable_after` plus half
//! the margin, so a flapping link cannot keep a losing side alive past the takeover.
//!
//! Only Up and Leaving members count (Akka counts the same); a node that is still joining
//! takes no decision.
//!
//! With [`Strategy::LeaseMajority`] the rule asks a lease (a row in the shared database) instead
//! of trusting the count alone: the side that keep-majority would keep asks at once, the other
//! after a delay, and only the side that gets the lease stays. The resolver says when to ask
//! ([`Resolver::lease_request`]); the tracker asks and hands back the answer
//! ([`Resolver::handle_lease`]).

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::cluster::member::{Member, MemberStatus, NodeAddr};

/// Which side of a partition stays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// The side with more than half of the members stays; on equal halves, the side holding
    /// the lowest address (Akka's tie rule).
    KeepMajority,
    /// The side with at least `quorum_size` members stays; a side below it downs itself (with
    /// a quorum above half the cluster, at most one side can stay).
    StaticQuorum {
        /// Members a side needs to stay.
        quorum_size: usize,
    },
    /// The side with the oldest member stays. With `down_if_alone`, an oldest member cut off
    /// alone from two or more others downs itself and they stay.
    KeepOldest {
        /// The oldest alone on its side goes instead of the rest.
        down_if_alone: bool,
    },
    /// Both sides ask for a lease; the one that gets it stays, the other goes (a side that
    /// cannot reach the lease goes too). The side keep-majority would keep asks first.
    LeaseMajority {
        /// How long the other side waits before it asks.
        delay_for_minority: Duration,
    },
    /// No resolver: a member unreachable for `down_after` is down at once, on both sides of a
    /// partition, and comes back if it heals. Both sides then run the same shards.
    Off,
}

impl Strategy {
    /// The strategy's name, as configured.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::KeepMajority => "keep-majority",
            Strategy::StaticQuorum { .. } => "static-quorum",
            Strategy::KeepOldest { .. } => "keep-oldest",
            Strategy::LeaseMajority { .. } => "lease-majority",
            Strategy::Off => "off",
        }
    }
}

/// What the strategy says about this node's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// This side stays; the unreachable members are to be downed.
    KeepMySide,
    /// This side goes: this node downs itself.
    DownMySide,
}

/// The strategy applied to one view: `members` are the members that count (Up or Leaving,
/// this node included), `unreachable` those of them this node cannot reach (`me` is always
/// on its own side).
pub fn decide(
    strategy: Strategy,
    me: &NodeAddr,
    members: &[&Member],
    unreachable: &BTreeSet<NodeAddr>,
) -> Decision {
    let mine = |m: &&&Member| m.addr == *me || !unreachable.contains(&m.addr);
    let my_side: Vec<&Member> = members.iter().filter(mine).copied().collect();
    let other_side = members.len() - my_side.len();
    let keep = match strategy {
        Strategy::Off => true,
        // Who asks for the lease first; the lease decides.
        Strategy::KeepMajority | Strategy::LeaseMajority { .. } => {
            if my_side.len() != other_side {
                my_side.len() > other_side
            } else {
                let lowest = members.iter().map(|m| &m.addr).min();
                lowest.is_some_and(|low| my_side.iter().any(|m| &m.addr == low))
            }
        }
        Strategy::StaticQuorum { quorum_size } => my_side.len() >= quorum_size,
        Strategy::KeepOldest { down_if_alone } => {
            let oldest = members.iter().min_by(|a, b| a.age_key().cmp(&b.age_key()));
            match oldest {
                None => true,
                Some(oldest) if my_side.iter().any(|m| m.addr == oldest.addr) => {
                    !(down_if_alone && my_side.len() == 1 && other_side >= 2)
                }
                // The oldest is on the other side: stay only when it is alone there and this
                // side has two or more (it downs itself by the rule above).
                Some(_) => down_if_alone && other_side == 1 && my_side.len() >= 2,
            }
        }
    };
    if keep {
        Decision::KeepMySide
    } else {
        Decision::DownMySide
    }
}

/// Why this node downed itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DownReason {
    /// The strategy put this node on the losing side of a partition.
    LosingSide {
        /// The strategy.
        strategy: &'static str,
        /// Members this node could reach, itself included.
        reachable: usize,
        /// Members it could not.
        unreachable: usize,
    },
    /// Another member declared this run down (it decided while this node could not hear it,
    /// or before a partition healed): this run never comes back.
    DownedByOthers,
    /// Some member stayed unreachable while the view kept changing, longer than the
    /// strategy may wait: every node in that state downs itself (Akka's
    /// down-all-when-unstable).
    Unstable {
        /// How long the view had been unstable.
        unstable_for: Duration,
    },
    /// The lease went to the other side, or could not be asked for.
    LeaseNotAcquired {
        /// What the lease said.
        why: String,
    },
}

impl fmt::Display for DownReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DownReason::LosingSide {
                strategy,
                reachable,
                unreachable,
            } => write!(
                f,
                "on the losing side of a partition ({strategy}: {reachable} reachable, \
                 {unreachable} unreachable)"
            ),
            DownReason::DownedByOthers => write!(f, "the cluster declared this node down"),
            DownReason::Unstable { unstable_for } => write!(
                f,
                "members stayed unreachable for {unstable_for:?} without the view settling"
            ),
            DownReason::LeaseNotAcquired { why } => {
                write!(f, "its side of a partition did not get the lease: {why}")
            }
        }
    }
}

/// How the resolver waits and decides.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DowningSettings {
    /// The rule.
    pub strategy: Strategy,
    /// How long the unreachable set must stay the same before the rule is applied.
    pub stable_after: Duration,
    /// How much longer a winning side waits before it downs the others (and takes over their
    /// shards), so that they have downed themselves by then.
    pub down_removal_margin: Duration,
}

impl Default for DowningSettings {
    fn default() -> Self {
        DowningSettings {
            strategy: Strategy::KeepMajority,
            stable_after: Duration::from_secs(5),
            down_removal_margin: Duration::from_secs(3),
        }
    }
}

/// A lease the resolver wants asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRequest {
    /// Who asks: the lowest address of this node's side, the same on every node of it, so the
    /// nodes of one side share the lease.
    pub holder: String,
    /// Not before then.
    pub at: Instant,
}

/// A split-brain resolver for one node.
///
/// Input: [`Self::handle_view`] after every membership round, with the time. Output:
/// [`Self::downed`] (runs this node decided are down; they never come back) and
/// [`Self::downed_self`] (this node must stop). Deadlines need no timer: the tracker calls
/// in every gossip round.
#[derive(Debug)]
pub struct Resolver {
    settings: DowningSettings,
    /// The members that counted and the unreachable ones among them, when last seen.
    observed: (BTreeSet<NodeAddr>, BTreeSet<NodeAddr>),
    /// Since when [`Self::observed`] has not changed.
    stable_since: Instant,
    /// Runs decided down, due at the instant (the removal margin) given.
    pending: Option<(BTreeSet<NodeAddr>, Instant)>,
    /// The lease to ask for before deciding, and the runs it would decide on.
    lease: Option<(LeaseRequest, BTreeSet<NodeAddr>)>,
    /// Since when some member has been unreachable without the view settling.
    unstable_since: Option<Instant>,
    downed: BTreeSet<NodeAddr>,
    downed_self: Option<DownReason>,
}

impl Resolver {
    /// A resolver with nothing seen yet, at `now`.
    pub fn new(settings: DowningSettings, now: Instant) -> Self {
        Resolver {
            settings,
            observed: (BTreeSet::new(), BTreeSet::new()),
            stable_since: now,
            pending: None,
            lease: None,
            unstable_since: None,
            downed: BTreeSet::new(),
            downed_self: None,
        }
    }

    /// The rule in use.
    pub fn strategy(&self) -> Strategy {
        self.settings.strategy
    }

    /// What `me` sees at `now`: `members` (every member this node knows, with their status)
    /// and the runs among them it cannot reach.
    pub fn handle_view(
        &mut self,
        now: Instant,
        me: &NodeAddr,
        members: &[&Member],
        unreachable: &BTreeSet<NodeAddr>,
    ) {
        if self.downed_self.is_some() || self.settings.strategy == Strategy::Off {
            return;
        }
        if let Some((runs, due)) = self.pending.take() {
            if now < due {
                self.pending = Some((runs, due));
            } else {
                // A run that can be reached again and has not downed itself saw the partition
                // heal before it decided: it keeps its work, and nobody takes it over.
                let gone = |run: &NodeAddr| {
                    unreachable.contains(run)
                        || members
                            .iter()
                            .find(|m| m.addr == *run)
                            .is_none_or(|m| m.status == MemberStatus::Down)
                };
                self.downed.extend(runs.into_iter().filter(gone));
            }
        }
        let counted: Vec<&Member> = members
            .iter()
            .copied()
            .filter(|m| matches!(m.status, MemberStatus::Up | MemberStatus::Leaving))
            .filter(|m| !self.downed.contains(&m.addr))
            .collect();
        let is_member = counted.iter().any(|m| m.addr == *me);
        let unreachable: BTreeSet<NodeAddr> = counted
            .iter()
            .filter(|m| m.addr != *me && unreachable.contains(&m.addr))
            .map(|m| m.addr.clone())
            .collect();
        let observed = (
            counted.iter().map(|m| m.addr.clone()).collect(),
            unreachable,
        );
        if observed != self.observed {
            self.observed = observed;
            self.stable_since = now;
            // The question asked for another split.
            self.lease = None;
        }
        let (_, unreachable) = &self.observed;
        let deciding = self.pending.is_some() || self.lease.is_some();
        if !is_member || unreachable.is_empty() || deciding {
            self.unstable_since = None;
            return;
        }
        if now.duration_since(self.stable_since) < self.settings.stable_after {
            let since = *self.unstable_since.get_or_insert(self.stable_since);
            // Akka's down-all-when-unstable: a view that never settles could keep this node
            // from ever deciding while the other side takes its work over on its own clock.
            if now.duration_since(since) >= self.unstable_limit() {
                self.downed_self = Some(DownReason::Unstable {
                    unstable_for: now.duration_since(since),
                });
            }
            return;
        }
        let decision = decide(self.settings.strategy, me, &counted, unreachable);
        if let Strategy::LeaseMajority { delay_for_minority } = self.settings.strategy {
            let holder = counted
                .iter()
                .map(|m| &m.addr)
                .filter(|addr| !unreachable.contains(addr))
                .min()
                .map(ToString::to_string)
                .unwrap_or_default();
            let delay = match decision {
                Decision::KeepMySide => Duration::ZERO,
                Decision::DownMySide => delay_for_minority,
            };
            let request = LeaseRequest {
                holder,
                at: now + delay,
            };
            self.lease = Some((request, unreachable.clone()));
            return;
        }
        match decision {
            Decision::KeepMySide => {
                let due = self.losers_deadline() + self.settings.down_removal_margin;
                self.pending = Some((unreachable.clone(), due.max(now)));
            }
            Decision::DownMySide => {
                self.downed_self = Some(DownReason::LosingSide {
                    strategy: self.settings.strategy.name(),
                    reachable: counted.len() - unreachable.len(),
                    unreachable: unreachable.len(),
                });
            }
        }
    }

    /// The lease to ask for now, if one is due (asked again until answered).
    pub fn lease_request(&self, now: Instant) -> Option<&LeaseRequest> {
        match &self.lease {
            Some((request, _)) if request.at <= now && self.downed_self.is_none() => Some(request),
            _ => None,
        }
    }

    /// The lease's answer at `now`: `Ok` when this side got it (the others are downed a
    /// removal margin later), otherwise why not (this node downs itself).
    pub fn handle_lease(&mut self, now: Instant, answer: Result<(), String>) {
        let Some((_, unreachable)) = self.lease.take() else {
            return;
        };
        match answer {
            Ok(()) => {
                let margin = self.settings.down_removal_margin;
                // A slow answer does not shorten the margin the other side has to go.
                let due = (self.losers_deadline() + margin).max(now + margin);
                self.pending = Some((unreachable, due));
            }
            Err(why) => {
                self.downed_self = Some(DownReason::LeaseNotAcquired { why });
            }
        }
    }

    /// When the other side has gone by the rule: once it settled (at the same time as this
    /// side at the earliest), plus, with a lease, the delay before the minority asks.
    fn losers_deadline(&self) -> Instant {
        let asks_later = match self.settings.strategy {
            Strategy::LeaseMajority { delay_for_minority } => delay_for_minority,
            _ => Duration::ZERO,
        };
        self.stable_since + self.settings.stable_after + asks_later
    }

    /// How long the unreachable set may keep changing before this node downs itself: past
    /// `stable_after` by half the removal margin, so it goes before a side that did settle
    /// (at the same time at the earliest) takes its work over.
    fn unstable_limit(&self) -> Duration {
        self.settings.stable_after + self.settings.down_removal_margin / 2
    }

    /// Another member declared this run down.
    pub fn handle_downed_by_others(&mut self) {
        if self.downed_self.is_none() {
            self.downed_self = Some(DownReason::DownedByOthers);
        }
    }

    /// Runs this node decided are down; final.
    pub fn downed(&self) -> &BTreeSet<NodeAddr> {
        &self.downed
    }

    /// Forgets decisions about runs gossip no longer knows (kept bounded).
    pub fn retain(&mut self, known: impl Fn(&NodeAddr) -> bool) {
        self.downed.retain(known);
    }

    /// Runs this node will down once the removal margin has passed, and when.
    pub fn pending(&self) -> Option<(&BTreeSet<NodeAddr>, Instant)> {
        self.pending.as_ref().map(|(runs, due)| (runs, *due))
    }

    /// Why this node must down itself, once it must.
    pub fn downed_self(&self) -> Option<&DownReason> {
        self.downed_self.as_ref()
    }
}

#[cfg(test)]
mod tests;
