//! The shard coordinator, sans IO: it decides where each shard lives. It runs as a cluster
//! singleton and keeps no state of its own on disk: a new coordinator (after a handover or a
//! crash) learns the allocation from the regions' registrations, and waits for every live
//! region to register (or for `registration_wait`) before it allocates anything new, so a shard
//! that still lives somewhere is not given a second home.
//!
//! Allocation: a shard nobody hosts goes to the Up region with the fewest shards (Akka's least
//! shard allocation), on its first message, or at once when it lost its home to a hand-off or
//! a downed node. Rebalance: on a timer, shards move from the fullest region to the
//! emptiest while they differ by more than `rebalance_threshold`, at most
//! `max_concurrent_handoffs` at a time. A hand-off: every region forgets the shard's home
//! (`BeginHandOff`, acknowledged), then the owner stops the shard's entities (`HandOff`,
//! answered `ShardStopped`), then the shard is free to be allocated again. A region on a
//! Leaving node hands off all its shards; a region on a Down node loses them at once.
//!
//! Inputs: `handle_view`, `handle_message`, `handle_timeout`; outputs: `poll_transmit`,
//! `poll_timeout`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::cluster::member::{ClusterView, MemberStatus, NodeAddr};
use crate::sharding::messages::{FromCoordinator, ToCoordinator};
use crate::sharding::shard::ShardId;

/// How the coordinator allocates and moves shards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorSettings {
    /// How often the allocation is checked for imbalance.
    #[serde(with = "humantime_serde")]
    pub rebalance_interval: Duration,
    /// Shards moved at once by a rebalance.
    pub max_concurrent_handoffs: usize,
    /// A region with this many more shards than the emptiest gives one up.
    pub rebalance_threshold: usize,
    /// Unanswered messages are repeated this often.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// A hand-off that has not finished by then is completed anyway (the owner is stuck).
    #[serde(with = "humantime_serde")]
    pub handoff_timeout: Duration,
    /// How long a new coordinator waits for every live region to register.
    #[serde(with = "humantime_serde")]
    pub registration_wait: Duration,
}

impl Default for CoordinatorSettings {
    fn default() -> Self {
        CoordinatorSettings {
            rebalance_interval: Duration::from_secs(2),
            max_concurrent_handoffs: 3,
            rebalance_threshold: 1,
            retry_interval: Duration::from_millis(500),
            handoff_timeout: Duration::from_secs(30),
            registration_wait: Duration::from_secs(5),
        }
    }
}

struct Handoff {
    owner: NodeAddr,
    /// Regions that have not acknowledged `BeginHandOff` yet.
    unacked: BTreeSet<NodeAddr>,
    handoff_sent: bool,
    deadline: Instant,
}

/// The coordinator of one entity type.
pub struct Coordinator {
    settings: CoordinatorSettings,
    role: String,
    started: Instant,
    view: Option<ClusterView>,
    /// Registered regions and the shards allocated to each.
    regions: BTreeMap<NodeAddr, BTreeSet<ShardId>>,
    allocations: BTreeMap<ShardId, NodeAddr>,
    /// Allocated, and the new home has not confirmed yet.
    unconfirmed: BTreeSet<ShardId>,
    handoffs: BTreeMap<ShardId, Handoff>,
    /// Regions that asked for a shard's home and wait for it.
    waiting: BTreeMap<ShardId, BTreeSet<NodeAddr>>,
    next_retry: Instant,
    next_rebalance: Instant,
    transmits: VecDeque<(NodeAddr, FromCoordinator)>,
}

impl Coordinator {
    /// A coordinator for regions on members with `role`, starting at `now`.
    pub fn new(settings: CoordinatorSettings, role: &str, now: Instant) -> Self {
        Coordinator {
            next_retry: now + settings.retry_interval,
            next_rebalance: now + settings.rebalance_interval,
            settings,
            role: role.to_owned(),
            started: now,
            view: None,
            regions: BTreeMap::new(),
            allocations: BTreeMap::new(),
            unconfirmed: BTreeSet::new(),
            handoffs: BTreeMap::new(),
            waiting: BTreeMap::new(),
            transmits: VecDeque::new(),
        }
    }

    /// The membership view changed.
    pub fn handle_view(&mut self, view: ClusterView, now: Instant) {
        let gone: Vec<NodeAddr> = self
            .regions
            .keys()
            .filter(|region| !view.is_alive(region))
            .cloned()
            .collect();
        self.view = Some(view);
        for region in gone {
            self.remove_region(&region, now);
        }
        self.hand_off_leaving_regions(now);
        self.serve_waiting(now);
    }

    /// A message from the region on `from`.
    pub fn handle_message(&mut self, from: NodeAddr, message: ToCoordinator, now: Instant) {
        let Some(view) = &self.view else {
            return;
        };
        if !view.is_alive(&from) {
            return;
        }
        if let ToCoordinator::Register { hosted } = message {
            self.register(from, hosted, now);
            return;
        }
        if !self.regions.contains_key(&from) {
            self.transmits
                .push_back((from, FromCoordinator::RegisterFirst));
            return;
        }
        match message {
            ToCoordinator::Register { .. } => {}
            ToCoordinator::GetShardHome { shard } => self.get_shard_home(from, shard, now),
            ToCoordinator::ShardStarted { shard } => {
                if self.allocations.get(&shard) == Some(&from) {
                    self.unconfirmed.remove(&shard);
                }
            }
            ToCoordinator::BeginHandOffAck { shard } => {
                if let Some(handoff) = self.handoffs.get_mut(&shard) {
                    handoff.unacked.remove(&from);
                }
                self.advance_handoff(shard);
            }
            ToCoordinator::ShardStopped { shard } => {
                if self
                    .handoffs
                    .get(&shard)
                    .is_some_and(|h| h.owner == from && h.handoff_sent)
                {
                    self.finish_handoff(shard, now);
                }
            }
        }
    }

    /// Time passed: repeat what was not answered, rebalance, give up on stuck hand-offs.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_retry {
            self.next_retry = now + self.settings.retry_interval;
            self.retry(now);
            self.serve_waiting(now);
        }
        if now >= self.next_rebalance {
            self.next_rebalance = now + self.settings.rebalance_interval;
            self.rebalance(now);
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<(NodeAddr, FromCoordinator)> {
        self.transmits.pop_front()
    }

    /// When [`Self::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_retry.min(self.next_rebalance)
    }

    fn register(&mut self, region: NodeAddr, hosted: Vec<ShardId>, now: Instant) {
        let first_time = !self.regions.contains_key(&region);
        self.regions.entry(region.clone()).or_default();
        for shard in hosted {
            match self.allocations.get(&shard) {
                Some(owner) if *owner != region => {
                    // Two regions claim it (a stale one survived a coordinator change): the
                    // first claim stands, the other stops its copy.
                    warn!(%shard, %owner, claimant = %region, "shard claimed twice; stopping the second copy");
                    self.transmits
                        .push_back((region.clone(), FromCoordinator::HandOff { shard }));
                }
                Some(_) => {}
                None => {
                    self.allocations.insert(shard, region.clone());
                    if let Some(shards) = self.regions.get_mut(&region) {
                        shards.insert(shard);
                    }
                }
            }
        }
        if first_time {
            info!(%region, "region registered");
        }
        self.transmits
            .push_back((region, FromCoordinator::RegisterAck));
        self.hand_off_leaving_regions(now);
        self.serve_waiting(now);
    }

    fn get_shard_home(&mut self, from: NodeAddr, shard: ShardId, now: Instant) {
        if !self.handoffs.contains_key(&shard)
            && let Some(owner) = self.allocations.get(&shard)
        {
            self.transmits.push_back((
                from,
                FromCoordinator::ShardHome {
                    shard,
                    node: owner.clone(),
                },
            ));
            return;
        }
        self.waiting.entry(shard).or_default().insert(from);
        self.serve_waiting(now);
    }

    /// Every region the coordinator should have heard from has registered, or waiting longer
    /// would only delay the cluster.
    fn registration_complete(&self, now: Instant) -> bool {
        if now.duration_since(self.started) >= self.settings.registration_wait {
            return true;
        }
        let Some(view) = &self.view else {
            return false;
        };
        view.members
            .values()
            .filter(|m| m.status != MemberStatus::Down && m.has_role(&self.role))
            .all(|m| self.regions.contains_key(&m.addr))
    }

    /// Allocates the shards regions wait for, where possible.
    fn serve_waiting(&mut self, now: Instant) {
        if !self.registration_complete(now) {
            return;
        }
        let shards: Vec<ShardId> = self.waiting.keys().copied().collect();
        for shard in shards {
            if self.handoffs.contains_key(&shard) {
                continue;
            }
            let owner = match self.allocations.get(&shard) {
                Some(owner) => owner.clone(),
                None => match self.least_loaded() {
                    Some(target) => {
                        self.allocate(shard, target.clone());
                        target
                    }
                    None => continue,
                },
            };
            for region in self.waiting.remove(&shard).unwrap_or_default() {
                self.transmits.push_back((
                    region,
                    FromCoordinator::ShardHome {
                        shard,
                        node: owner.clone(),
                    },
                ));
            }
        }
    }

    fn allocate(&mut self, shard: ShardId, region: NodeAddr) {
        debug!(%shard, %region, "shard allocated");
        self.allocations.insert(shard, region.clone());
        self.regions
            .entry(region.clone())
            .or_default()
            .insert(shard);
        self.unconfirmed.insert(shard);
        self.transmits.push_back((
            region.clone(),
            FromCoordinator::ShardHome {
                shard,
                node: region,
            },
        ));
    }

    /// Regions that may receive shards: registered, on Up members with the role.
    fn allocatable(&self) -> Vec<(&NodeAddr, usize)> {
        let Some(view) = &self.view else {
            return Vec::new();
        };
        self.regions
            .iter()
            .filter(|(region, _)| {
                view.member(region)
                    .is_some_and(|m| m.status == MemberStatus::Up && m.has_role(&self.role))
            })
            .map(|(region, shards)| (region, shards.len()))
            .collect()
    }

    fn least_loaded(&self) -> Option<NodeAddr> {
        self.allocatable()
            .into_iter()
            .min_by_key(|(region, count)| (*count, (*region).clone()))
            .map(|(region, _)| region.clone())
    }

    fn rebalance(&mut self, now: Instant) {
        if !self.registration_complete(now) {
            return;
        }
        let mut moves = 0;
        while self.handoffs.len() < self.settings.max_concurrent_handoffs {
            // Shards already leaving a region do not count for it.
            let mut loads: Vec<(NodeAddr, usize)> = self
                .allocatable()
                .into_iter()
                .map(|(region, count)| {
                    let leaving = self
                        .handoffs
                        .values()
                        .filter(|h| h.owner == *region)
                        .count();
                    (region.clone(), count.saturating_sub(leaving))
                })
                .collect();
            loads.sort_by_key(|(region, count)| (*count, region.clone()));
            let (Some((_, least)), Some((fullest, most))) =
                (loads.first().cloned(), loads.last().cloned())
            else {
                return;
            };
            if most <= least + self.settings.rebalance_threshold {
                break;
            }
            let Some(shard) = self
                .regions
                .get(&fullest)
                .and_then(|shards| {
                    shards
                        .iter()
                        .find(|s| !self.handoffs.contains_key(s) && !self.unconfirmed.contains(s))
                })
                .copied()
            else {
                break;
            };
            info!(%shard, from = %fullest, "rebalancing shard");
            self.begin_handoff(shard, fullest, now);
            moves += 1;
        }
        if moves > 0 {
            debug!(moves, "rebalance started hand-offs");
        }
    }

    fn hand_off_leaving_regions(&mut self, now: Instant) {
        let Some(view) = &self.view else {
            return;
        };
        let leaving: Vec<(NodeAddr, Vec<ShardId>)> = self
            .regions
            .iter()
            .filter(|(region, _)| {
                view.member(region)
                    .is_some_and(|m| m.status == MemberStatus::Leaving)
            })
            .map(|(region, shards)| (region.clone(), shards.iter().copied().collect()))
            .collect();
        for (region, shards) in leaving {
            for shard in shards {
                if !self.handoffs.contains_key(&shard) {
                    self.begin_handoff(shard, region.clone(), now);
                }
            }
        }
    }

    fn begin_handoff(&mut self, shard: ShardId, owner: NodeAddr, now: Instant) {
        let unacked: BTreeSet<NodeAddr> = self.regions.keys().cloned().collect();
        for region in &unacked {
            self.transmits
                .push_back((region.clone(), FromCoordinator::BeginHandOff { shard }));
        }
        self.handoffs.insert(
            shard,
            Handoff {
                owner,
                unacked,
                handoff_sent: false,
                deadline: now + self.settings.handoff_timeout,
            },
        );
    }

    fn advance_handoff(&mut self, shard: ShardId) {
        if let Some(handoff) = self.handoffs.get_mut(&shard)
            && handoff.unacked.is_empty()
            && !handoff.handoff_sent
        {
            handoff.handoff_sent = true;
            self.transmits
                .push_back((handoff.owner.clone(), FromCoordinator::HandOff { shard }));
        }
    }

    fn finish_handoff(&mut self, shard: ShardId, now: Instant) {
        if let Some(handoff) = self.handoffs.remove(&shard) {
            debug!(%shard, from = %handoff.owner, "hand-off done");
            if let Some(shards) = self.regions.get_mut(&handoff.owner) {
                shards.remove(&shard);
            }
        }
        self.allocations.remove(&shard);
        self.unconfirmed.remove(&shard);
        self.place_now(shard, now);
        self.serve_waiting(now);
    }

    /// Gives a shard that lost its home a new one at once (the emptiest region), rather than
    /// on its next message: a rebalance then really moves shards to the new node (instead of
    /// only taking them from the full ones), and the cluster's layout is settled before
    /// traffic needs it.
    fn place_now(&mut self, shard: ShardId, now: Instant) {
        if self.allocations.contains_key(&shard) || !self.registration_complete(now) {
            return;
        }
        if let Some(target) = self.least_loaded() {
            self.allocate(shard, target);
        }
    }

    fn remove_region(&mut self, region: &NodeAddr, now: Instant) {
        info!(%region, "region gone; its shards are free");
        let shards = self.regions.remove(region).unwrap_or_default();
        for shard in &shards {
            self.allocations.remove(shard);
            self.unconfirmed.remove(shard);
            self.handoffs.remove(shard);
        }
        for shard in shards {
            self.place_now(shard, now);
        }
        for handoff in self.handoffs.values_mut() {
            handoff.unacked.remove(region);
        }
        let shards: Vec<ShardId> = self.handoffs.keys().copied().collect();
        for shard in shards {
            self.advance_handoff(shard);
        }
        for waiting in self.waiting.values_mut() {
            waiting.remove(region);
        }
        self.waiting.retain(|_, regions| !regions.is_empty());
        self.serve_waiting(now);
    }

    fn retry(&mut self, now: Instant) {
        for shard in self.unconfirmed.iter().copied().collect::<Vec<_>>() {
            if let Some(region) = self.allocations.get(&shard) {
                self.transmits.push_back((
                    region.clone(),
                    FromCoordinator::ShardHome {
                        shard,
                        node: region.clone(),
                    },
                ));
            }
        }
        let mut stuck = Vec::new();
        for (shard, handoff) in &self.handoffs {
            if handoff.deadline <= now {
                stuck.push(*shard);
            } else if handoff.handoff_sent {
                self.transmits.push_back((
                    handoff.owner.clone(),
                    FromCoordinator::HandOff { shard: *shard },
                ));
            } else {
                for region in &handoff.unacked {
                    self.transmits.push_back((
                        region.clone(),
                        FromCoordinator::BeginHandOff { shard: *shard },
                    ));
                }
            }
        }
        for shard in stuck {
            warn!(%shard, "hand-off timed out; reallocating the shard anyway");
            self.finish_handoff(shard, now);
        }
    }
}
