//! A shard region, sans IO: one per node and entity type. It routes entity messages to the
//! region hosting their shard (asking the coordinator where that is, and buffering, bounded,
//! until it knows), hosts the shards the coordinator gives it, and runs their entities'
//! lifecycles: start on the first message, passivate when idle or when more than
//! `max_active_entities` run (the least recently used first), restart after a failure with a
//! growing pause, and stop (each entity finishing what it holds) when the shard is handed off.
//!
//! The entities themselves run in the driver: the region only says, through
//! [`Region::poll_command`], to deliver to an entity (starting it if it is not running) or to
//! stop it, and hears back when one stopped or failed.
//!
//! Inputs: `deliver` (from this node), `handle_view`, `handle_message`, `handle_entity_stopped`,
//! `handle_entity_failed`, `handle_timeout`. Outputs: `poll_transmit`, `poll_command`,
//! `poll_timeout`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::cluster::member::{ClusterView, NodeAddr};
use crate::eviction::{least_recently_used, shrink_when_mostly_empty};
use crate::ids::EntityId;
use crate::sharding::messages::{Deliver, FromCoordinator, ShardingMsg, ToCoordinator};
use crate::sharding::shard::{ShardId, shard_of};

/// A message bounced between regions more often than this is dropped.
const MAX_HOPS: u8 = 3;

/// How a region routes and keeps entities.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionSettings {
    /// Number of shards; every node of the cluster must use the same number.
    pub shards: u32,
    /// Messages waiting for a shard's home to be known, all shards together; beyond it new
    /// ones are dropped (their senders resend).
    pub buffer_size: usize,
    /// Unanswered questions to the coordinator are repeated this often.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// An entity without messages for this long is stopped (zero: never).
    #[serde(with = "humantime_serde")]
    pub passivate_after: Duration,
    /// An entity quiet for this long, holding and owing nothing, goes dormant (zero: never):
    /// its task, inbox and protocol state are dropped and only its own state is kept, so an
    /// idle entity costs little more than that state; its next message starts a task again
    /// without loading from the store. Counted among the active entities until passivated.
    #[serde(with = "humantime_serde")]
    pub hibernate_after: Duration,
    /// At most this many entities run here at once (Akka's active-entity limit): starting one
    /// more stops the least recently used first, so a node's memory is bounded by the entities
    /// it keeps, not by every entity it ever saw. Stopped a hundredth of the limit at a time,
    /// so the search for them, a scan of every entity, stays rare.
    pub max_active_entities: usize,
    /// First pause before restarting an entity that failed; doubles up to `restart_max`.
    #[serde(with = "humantime_serde")]
    pub restart_min: Duration,
    /// Longest pause before restarting a failed entity.
    #[serde(with = "humantime_serde")]
    pub restart_max: Duration,
}

impl Default for RegionSettings {
    fn default() -> Self {
        RegionSettings {
            shards: 50,
            buffer_size: 10_000,
            retry_interval: Duration::from_millis(500),
            passivate_after: Duration::from_secs(120),
            hibernate_after: Duration::from_secs(5),
            max_active_entities: 100_000,
            restart_min: Duration::from_millis(200),
            restart_max: Duration::from_secs(10),
        }
    }
}

/// What the driver must do with an entity.
#[derive(Debug, PartialEq, Eq)]
pub enum EntityCommand<P> {
    /// Deliver `message` to `entity`, starting it first if it does not run.
    Deliver {
        /// The entity.
        entity: EntityId,
        /// The message.
        message: P,
    },
    /// Stop `entity` once it has finished the messages it holds; report when it has.
    Stop {
        /// The entity.
        entity: EntityId,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Running,
    /// Asked to stop (passivation or hand-off); messages wait until it has.
    Stopping,
    /// Failed; restarts at the given time.
    Restarting(Instant),
}

struct Entity<P> {
    shard: ShardId,
    phase: Phase,
    last_active: Instant,
    /// Messages that arrived while it was stopping or restarting.
    waiting: VecDeque<P>,
    failures: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hosting {
    Active,
    HandingOff,
}

/// What a region does with one message for `entity`.
enum Route {
    Local,
    Remote(NodeAddr),
    Unknown,
}

/// The region of one entity type on one node.
pub struct Region<P> {
    settings: RegionSettings,
    role: String,
    me: NodeAddr,
    view: Option<ClusterView>,
    coordinator: Option<NodeAddr>,
    registered: bool,
    next_register: Option<Instant>,
    homes: HashMap<ShardId, NodeAddr>,
    /// Messages for shards whose home is unknown, and when their home was last asked for.
    buffered: BTreeMap<ShardId, VecDeque<(EntityId, P)>>,
    buffered_total: usize,
    asked_at: HashMap<ShardId, Instant>,
    hosted: BTreeMap<ShardId, Hosting>,
    entities: HashMap<EntityId, Entity<P>>,
    /// Entities waiting out a restart pause: while none does, timers need no entity scan.
    restarting: usize,
    /// Entities asked to stop and not stopped yet: they no longer count as active.
    stopping: usize,
    /// Bumped whenever the hosted shards or the coordinator change, so a driver republishes
    /// its status only then.
    layout_version: u64,
    next_passivation_scan: Option<Instant>,
    transmits: VecDeque<(NodeAddr, ShardingMsg<P>)>,
    commands: VecDeque<EntityCommand<P>>,
}

impl<P: Clone> Region<P> {
    /// The region of node `me`, hosting shards if `me` has `role`.
    pub fn new(settings: RegionSettings, role: &str, me: NodeAddr) -> Self {
        Region {
            settings,
            role: role.to_owned(),
            me,
            view: None,
            coordinator: None,
            registered: false,
            next_register: None,
            homes: HashMap::new(),
            buffered: BTreeMap::new(),
            buffered_total: 0,
            asked_at: HashMap::new(),
            hosted: BTreeMap::new(),
            entities: HashMap::new(),
            restarting: 0,
            stopping: 0,
            layout_version: 0,
            next_passivation_scan: None,
            transmits: VecDeque::new(),
            commands: VecDeque::new(),
        }
    }

    /// Changes whenever [`Self::hosted_shards`] or [`Self::coordinator`] may have.
    pub fn layout_version(&self) -> u64 {
        self.layout_version
    }

    /// Shards hosted here now (including those being handed off).
    pub fn hosted_shards(&self) -> Vec<ShardId> {
        self.hosted.keys().copied().collect()
    }

    /// Entities running (or stopping, or waiting to restart) here.
    pub fn entity_count(&self) -> usize {
        self.entities.len()
    }

    /// Messages waiting for a shard's home.
    pub fn buffered(&self) -> usize {
        self.buffered_total
    }

    /// Where this region thinks the coordinator runs.
    pub fn coordinator(&self) -> Option<&NodeAddr> {
        self.coordinator.as_ref()
    }

    /// Sends `message` to `entity`, wherever it lives.
    pub fn deliver(&mut self, entity: EntityId, message: P, now: Instant) {
        self.route(entity, message, 0, now);
    }

    /// The membership view changed.
    pub fn handle_view(&mut self, view: ClusterView, now: Instant) {
        let coordinator = view.oldest_up(&self.role).map(|m| m.addr.clone());
        self.homes.retain(|_, home| view.is_alive(home));
        self.view = Some(view);
        if coordinator != self.coordinator {
            self.coordinator = coordinator;
            self.layout_version += 1;
            self.registered = false;
            self.next_register = Some(now);
        }
        self.step(now);
    }

    /// A message from another node (or from this node's coordinator).
    pub fn handle_message(&mut self, from: NodeAddr, message: ShardingMsg<P>, now: Instant) {
        match message {
            ShardingMsg::Deliver(Deliver {
                entity,
                message,
                hops,
            }) => self.route(entity, message, hops.saturating_add(1), now),
            ShardingMsg::FromCoordinator(message) => {
                if Some(&from) == self.coordinator.as_ref() {
                    self.on_coordinator_message(message, now);
                }
            }
            ShardingMsg::ToCoordinator(_) => {}
        }
    }

    /// An entity stopped after [`EntityCommand::Stop`].
    pub fn handle_entity_stopped(&mut self, entity: &EntityId, now: Instant) {
        let Some(state) = self.entities.remove(entity) else {
            return;
        };
        shrink_when_mostly_empty(&mut self.entities);
        match state.phase {
            Phase::Restarting(_) => self.restarting -= 1,
            Phase::Stopping => self.stopping -= 1,
            Phase::Running => {}
        }
        let shard = state.shard;
        if !state.waiting.is_empty() {
            // Messages came while it stopped: route them again (to a new home, after a
            // hand-off, or to a fresh start here).
            for message in state.waiting {
                self.route(entity.clone(), message, 0, now);
            }
        }
        self.finish_handoff_if_done(shard);
    }

    /// An entity ended without being asked to: it restarts after a pause, and its messages
    /// wait until then.
    pub fn handle_entity_failed(&mut self, entity: &EntityId, now: Instant) {
        let Some(phase) = self.entities.get(entity).map(|e| e.phase) else {
            return;
        };
        if phase == Phase::Stopping {
            // It was stopping anyway.
            self.handle_entity_stopped(entity, now);
            return;
        }
        let (min, max) = (self.settings.restart_min, self.settings.restart_max);
        if let Some(state) = self.entities.get_mut(entity) {
            state.failures = state.failures.saturating_add(1);
            let pause = min
                .saturating_mul(1 << state.failures.saturating_sub(1).min(10))
                .min(max);
            warn!(%entity, ?pause, "entity failed; restarting after a pause");
            if !matches!(state.phase, Phase::Restarting(_)) {
                self.restarting += 1;
            }
            state.phase = Phase::Restarting(now + pause);
        }
    }

    /// Time passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let restarts: Vec<EntityId> = if self.restarting == 0 {
            Vec::new()
        } else {
            self.entities
                .iter()
                .filter(|(_, e)| matches!(e.phase, Phase::Restarting(at) if at <= now))
                .map(|(id, _)| id.clone())
                .collect()
        };
        for entity in restarts {
            if let Some(state) = self.entities.get_mut(&entity) {
                self.restarting -= 1;
                state.phase = Phase::Running;
                state.last_active = now;
                for message in std::mem::take(&mut state.waiting) {
                    self.commands.push_back(EntityCommand::Deliver {
                        entity: entity.clone(),
                        message,
                    });
                }
            }
        }
        if self.next_passivation_scan.is_some_and(|at| at <= now) {
            self.passivate_idle(now);
        }
        self.step(now);
    }

    /// The next message for another node.
    pub fn poll_transmit(&mut self) -> Option<(NodeAddr, ShardingMsg<P>)> {
        self.transmits.pop_front()
    }

    /// The next thing to do with an entity.
    pub fn poll_command(&mut self) -> Option<EntityCommand<P>> {
        self.commands.pop_front()
    }

    /// When [`Self::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        debug_assert_eq!(
            self.stopping,
            self.entities
                .values()
                .filter(|e| e.phase == Phase::Stopping)
                .count()
        );
        debug_assert_eq!(
            self.restarting,
            self.entities
                .values()
                .filter(|e| matches!(e.phase, Phase::Restarting(_)))
                .count()
        );
        let restart = (self.restarting > 0)
            .then(|| {
                self.entities
                    .values()
                    .filter_map(|e| match e.phase {
                        Phase::Restarting(at) => Some(at),
                        _ => None,
                    })
                    .min()
            })
            .flatten();
        // Asks repeat only while someone can answer them (otherwise the deadline would stay
        // in the past and the driver would spin).
        let can_ask = self.registered && self.coordinator.is_some();
        let asks = (can_ask && !self.buffered.is_empty())
            .then(|| {
                self.asked_at
                    .values()
                    .map(|at| *at + self.settings.retry_interval)
                    .min()
            })
            .flatten();
        [
            self.next_register,
            self.next_passivation_scan,
            asks,
            restart,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn route(&mut self, entity: EntityId, message: P, hops: u8, now: Instant) {
        if hops > MAX_HOPS {
            debug!(%entity, "message bounced between regions too often; dropped");
            return;
        }
        let shard = shard_of(&entity, self.settings.shards);
        let route = match self.hosted.get(&shard) {
            Some(Hosting::Active) => Route::Local,
            Some(Hosting::HandingOff) => Route::Unknown,
            None => match self.homes.get(&shard) {
                Some(home) if *home == self.me => Route::Unknown,
                Some(home) => Route::Remote(home.clone()),
                None => Route::Unknown,
            },
        };
        match route {
            Route::Local => self.deliver_local(shard, entity, message, now),
            Route::Remote(home) => self.transmits.push_back((
                home,
                ShardingMsg::Deliver(Deliver {
                    entity,
                    message,
                    hops,
                }),
            )),
            Route::Unknown => {
                if self.buffered_total >= self.settings.buffer_size {
                    debug!(%entity, "region buffer full; message dropped (its sender resends)");
                    return;
                }
                self.buffered
                    .entry(shard)
                    .or_default()
                    .push_back((entity, message));
                self.buffered_total += 1;
                self.ask_home(shard, now);
            }
        }
    }

    fn deliver_local(&mut self, shard: ShardId, entity: EntityId, message: P, now: Instant) {
        // One lookup for an entity that runs already, the common case.
        let phase = match self.entities.get_mut(&entity) {
            Some(state) => {
                state.last_active = now;
                state.phase
            }
            None => {
                self.entities.insert(
                    entity.clone(),
                    Entity {
                        shard,
                        phase: Phase::Running,
                        last_active: now,
                        waiting: VecDeque::new(),
                        failures: 0,
                    },
                );
                self.limit_active(&entity);
                Phase::Running
            }
        };
        match phase {
            Phase::Running => {
                self.commands
                    .push_back(EntityCommand::Deliver { entity, message });
                if self.next_passivation_scan.is_none() && !self.settings.passivate_after.is_zero()
                {
                    self.next_passivation_scan = Some(now + self.settings.passivate_after / 2);
                }
            }
            Phase::Stopping | Phase::Restarting(_) => {
                if let Some(state) = self.entities.get_mut(&entity) {
                    state.waiting.push_back(message);
                }
            }
        }
    }

    fn ask_home(&mut self, shard: ShardId, now: Instant) {
        let due = self
            .asked_at
            .get(&shard)
            .is_none_or(|at| *at + self.settings.retry_interval <= now);
        if !due || !self.registered {
            return;
        }
        if let Some(coordinator) = &self.coordinator {
            self.asked_at.insert(shard, now);
            self.transmits.push_back((
                coordinator.clone(),
                ShardingMsg::ToCoordinator(ToCoordinator::GetShardHome { shard }),
            ));
        }
    }

    fn on_coordinator_message(&mut self, message: FromCoordinator, now: Instant) {
        match message {
            FromCoordinator::RegisterAck => {
                if !self.registered {
                    self.registered = true;
                    self.next_register = None;
                    self.asked_at.clear();
                    let shards: Vec<ShardId> = self.buffered.keys().copied().collect();
                    for shard in shards {
                        self.ask_home(shard, now);
                    }
                }
            }
            FromCoordinator::RegisterFirst => {
                self.registered = false;
                self.next_register = Some(now);
            }
            FromCoordinator::ShardHome { shard, node } => {
                // A coordinator whose view lags ours may name a node we already know is down:
                // keep the messages and ask again later rather than send them to nowhere.
                let dead =
                    node != self.me && self.view.as_ref().is_some_and(|view| !view.is_alive(&node));
                if dead {
                    debug!(%shard, %node, "shard home is down here; asking again later");
                    return;
                }
                if node == self.me {
                    if self.hosted.get(&shard) != Some(&Hosting::HandingOff)
                        && self.hosted.insert(shard, Hosting::Active).is_none()
                    {
                        self.layout_version += 1;
                    }
                    self.coordinator_message(ToCoordinator::ShardStarted { shard });
                }
                self.homes.insert(shard, node);
                self.asked_at.remove(&shard);
                if let Some(waiting) = self.buffered.remove(&shard) {
                    self.buffered_total -= waiting.len();
                    for (entity, message) in waiting {
                        self.route(entity, message, 0, now);
                    }
                }
            }
            FromCoordinator::BeginHandOff { shard } => {
                self.homes.remove(&shard);
                self.coordinator_message(ToCoordinator::BeginHandOffAck { shard });
            }
            FromCoordinator::HandOff { shard } => {
                self.homes.remove(&shard);
                if let Some(hosting) = self.hosted.get_mut(&shard) {
                    *hosting = Hosting::HandingOff;
                    let stopping: Vec<EntityId> = self
                        .entities
                        .iter()
                        .filter(|(_, e)| e.shard == shard && e.phase != Phase::Stopping)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for entity in stopping {
                        self.stop_entity(&entity);
                    }
                }
                self.finish_handoff_if_done(shard);
            }
        }
    }

    fn stop_entity(&mut self, entity: &EntityId) {
        if let Some(state) = self.entities.get_mut(entity) {
            match state.phase {
                // Restarting (not running): the driver reports it stopped at once, and its
                // waiting messages are routed again from there.
                Phase::Running | Phase::Restarting(_) => {
                    if matches!(state.phase, Phase::Restarting(_)) {
                        self.restarting -= 1;
                    }
                    self.stopping += 1;
                    state.phase = Phase::Stopping;
                    self.commands.push_back(EntityCommand::Stop {
                        entity: entity.clone(),
                    });
                }
                Phase::Stopping => {}
            }
        }
    }

    /// A shard being handed off whose entities have all stopped is reported stopped.
    fn finish_handoff_if_done(&mut self, shard: ShardId) {
        // An active shard is not being handed off: skip the scan of every entity.
        if self.hosted.get(&shard) == Some(&Hosting::Active) {
            return;
        }
        if self.entities.values().any(|e| e.shard == shard) {
            return;
        }
        if self.hosted.remove(&shard).is_some() {
            self.layout_version += 1;
        }
        self.coordinator_message(ToCoordinator::ShardStopped { shard });
    }

    fn coordinator_message(&mut self, message: ToCoordinator) {
        if let Some(coordinator) = &self.coordinator {
            self.transmits
                .push_back((coordinator.clone(), ShardingMsg::ToCoordinator(message)));
        }
    }

    /// Over the active-entity limit after `newest` started: stops the least recently used
    /// running entities, at least a hundredth of the limit of them.
    fn limit_active(&mut self, newest: &EntityId) {
        let least_recent = least_recently_used(
            self.entities.len() - self.stopping,
            self.settings.max_active_entities,
            self.entities
                .iter()
                .filter(|(id, e)| e.phase == Phase::Running && *id != newest)
                .map(|(id, e)| (e.last_active, id)),
        );
        if !least_recent.is_empty() {
            debug!(
                count = least_recent.len(),
                "passivating the least recently used entities"
            );
        }
        for entity in least_recent {
            self.stop_entity(&entity);
        }
    }

    fn passivate_idle(&mut self, now: Instant) {
        let after = self.settings.passivate_after;
        let idle: Vec<EntityId> = self
            .entities
            .iter()
            .filter(|(_, e)| {
                e.phase == Phase::Running && now.duration_since(e.last_active) >= after
            })
            .map(|(id, _)| id.clone())
            .collect();
        for entity in idle {
            debug!(%entity, "passivating idle entity");
            self.stop_entity(&entity);
        }
        self.next_passivation_scan = (!self.entities.is_empty()).then(|| now + after / 2);
    }

    fn step(&mut self, now: Instant) {
        if self.next_register.is_some_and(|at| at <= now) && !self.registered {
            if let Some(coordinator) = self.coordinator.clone() {
                let hosted: Vec<ShardId> = self
                    .hosted
                    .iter()
                    .filter(|(_, h)| **h == Hosting::Active)
                    .map(|(s, _)| *s)
                    .collect();
                self.transmits.push_back((
                    coordinator,
                    ShardingMsg::ToCoordinator(ToCoordinator::Register { hosted }),
                ));
            }
            self.next_register = Some(now + self.settings.retry_interval);
        }
        if self.registered {
            let due: Vec<ShardId> = self
                .buffered
                .keys()
                .copied()
                .filter(|s| {
                    self.asked_at
                        .get(s)
                        .is_none_or(|at| *at + self.settings.retry_interval <= now)
                })
                .collect();
            for shard in due {
                self.ask_home(shard, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::cluster::member::{Member, MemberStatus, NodeId};

    const ROLE: &str = "host";

    /// A region alone in its cluster, coordinator of itself, hosting every shard.
    fn hosting_every_shard(max_active_entities: usize, now: Instant) -> Region<u32> {
        let me = NodeAddr {
            id: NodeId::new("n1"),
            generation: 1,
        };
        let member = Member {
            addr: me.clone(),
            rpc_addr: "127.0.0.1:1".parse().expect("an address"),
            roles: BTreeSet::from([ROLE.to_owned()]),
            status: MemberStatus::Up,
            started_at_ms: 1,
        };
        let settings = RegionSettings {
            shards: 4,
            passivate_after: Duration::ZERO,
            max_active_entities,
            ..RegionSettings::default()
        };
        let mut region = Region::new(settings, ROLE, me.clone());
        region.handle_view(ClusterView::alone(member), now);
        let from_coordinator = ShardingMsg::FromCoordinator;
        region.handle_message(
            me.clone(),
            from_coordinator(FromCoordinator::RegisterAck),
            now,
        );
        for shard in 0..4 {
            let home = FromCoordinator::ShardHome {
                shard: ShardId(shard),
                node: me.clone(),
            };
            region.handle_message(me.clone(), from_coordinator(home), now);
        }
        while region.poll_transmit().is_some() {}
        region
    }

    fn entity(n: u32) -> EntityId {
        EntityId::new(format!("entity-{n}"))
    }

    /// The entities the region asked to stop since last asked.
    fn stopped(region: &mut Region<u32>) -> BTreeSet<EntityId> {
        std::iter::from_fn(|| region.poll_command())
            .filter_map(|command| match command {
                EntityCommand::Stop { entity } => Some(entity),
                EntityCommand::Deliver { .. } => None,
            })
            .collect()
    }

    #[test]
    fn one_entity_over_the_limit_stops_the_least_recently_used() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut region = hosting_every_shard(3, start);
        for (n, second) in [(0, 0), (1, 1), (2, 2), (0, 3)] {
            region.deliver(entity(n), n, at(second));
        }
        assert!(stopped(&mut region).is_empty(), "three fit");
        region.deliver(entity(3), 3, at(4));
        assert_eq!(stopped(&mut region), BTreeSet::from([entity(1)]));
        // entity-1 is still stopping: it no longer counts, so the next start stops one more.
        region.deliver(entity(4), 4, at(5));
        assert_eq!(stopped(&mut region), BTreeSet::from([entity(2)]));
        region.handle_entity_stopped(&entity(1), at(6));
        region.handle_entity_stopped(&entity(2), at(6));
        assert_eq!(region.entity_count(), 3);
        // A message for a passivated entity starts it again, at the cost of the oldest.
        region.deliver(entity(1), 1, at(7));
        assert_eq!(stopped(&mut region), BTreeSet::from([entity(0)]));
    }

    #[test]
    fn the_least_recently_used_hundredth_of_the_limit_stops_at_once() {
        let start = Instant::now();
        let mut region = hosting_every_shard(200, start);
        for n in 0..200 {
            region.deliver(entity(n), n, start + Duration::from_millis(u64::from(n)));
        }
        assert!(stopped(&mut region).is_empty());
        region.deliver(entity(200), 200, start + Duration::from_secs(1));
        assert_eq!(stopped(&mut region), BTreeSet::from([entity(0), entity(1)]));
        // Two stopping, 201 known: 199 active, so the next start stops nothing.
        region.deliver(entity(201), 201, start + Duration::from_secs(2));
        assert!(stopped(&mut region).is_empty());
    }
}
