//! Sharding scenarios on the sans-IO cores: several nodes' regions and the coordinator (moved
//! to the oldest node, as the singleton would be) wired through a message queue with seeded
//! faults, entities played by the harness, on the harness's own clock.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use super::coordinator::{Coordinator, CoordinatorSettings};
use super::messages::{FromCoordinator, ShardingMsg, ToCoordinator};
use super::region::{EntityCommand, Region, RegionSettings};
use super::shard::shard_of;
use crate::cluster::member::{ClusterView, Member, MemberStatus, NodeAddr, NodeId};
use crate::ids::EntityId;
use crate::testkit::Clock;

const ROLE: &str = "host";

fn addr(id: &str) -> NodeAddr {
    NodeAddr {
        id: NodeId::new(id),
        generation: 1,
    }
}

fn member(id: &str, age: u64, status: MemberStatus) -> Member {
    Member {
        addr: addr(id),
        rpc_addr: "127.0.0.1:1".parse().unwrap(),
        roles: BTreeSet::from([ROLE.to_owned()]),
        status,
        started_at_ms: age,
    }
}

fn entity(n: u64) -> EntityId {
    EntityId::new(format!("entity-{n}"))
}

#[derive(Clone, Copy, Default)]
struct Faults {
    drop: f64,
    duplicate: f64,
    reorder: f64,
}

struct Harness {
    rng: SmallRng,
    faults: Faults,
    members: BTreeMap<NodeAddr, Member>,
    regions: BTreeMap<NodeAddr, Region<u64>>,
    coordinator: Option<(NodeAddr, Coordinator)>,
    wire: VecDeque<(NodeAddr, NodeAddr, ShardingMsg<u64>)>,
    /// Entities running on each node now.
    live: BTreeMap<NodeAddr, BTreeSet<EntityId>>,
    /// Stops asked for and not yet done (they finish on the next step).
    stopping: Vec<(NodeAddr, EntityId)>,
    /// Every message each entity processed, with the node it ran on.
    received: BTreeMap<EntityId, Vec<(NodeAddr, u64)>>,
    crashed: BTreeSet<NodeAddr>,
    clock: Clock,
}

impl Harness {
    fn new(seed: u64, faults: Faults) -> Self {
        Harness {
            rng: SmallRng::seed_from_u64(seed),
            faults,
            members: BTreeMap::new(),
            regions: BTreeMap::new(),
            coordinator: None,
            wire: VecDeque::new(),
            live: BTreeMap::new(),
            stopping: Vec::new(),
            received: BTreeMap::new(),
            crashed: BTreeSet::new(),
            clock: Clock::new(),
        }
    }

    fn settings() -> RegionSettings {
        RegionSettings {
            shards: 20,
            passivate_after: Duration::ZERO,
            ..RegionSettings::default()
        }
    }

    fn add_node(&mut self, id: &str, age: u64) {
        let node = addr(id);
        self.members
            .insert(node.clone(), member(id, age, MemberStatus::Up));
        self.regions.insert(
            node.clone(),
            Region::new(Self::settings(), ROLE, node.clone()),
        );
        self.live.insert(node, BTreeSet::new());
        self.publish_view();
    }

    fn set_status(&mut self, id: &str, status: MemberStatus) {
        if let Some(m) = self.members.get_mut(&addr(id)) {
            m.status = status;
        }
        self.publish_view();
    }

    /// The node dies: its region, entities and messages are gone; the others see it Down.
    fn crash(&mut self, id: &str) {
        let node = addr(id);
        self.crashed.insert(node.clone());
        self.regions.remove(&node);
        self.live.remove(&node);
        self.stopping.retain(|(n, _)| *n != node);
        if self.coordinator.as_ref().is_some_and(|(n, _)| *n == node) {
            self.coordinator = None;
        }
        self.set_status(id, MemberStatus::Down);
    }

    fn view(&self, me: &NodeAddr) -> ClusterView {
        let mut view = ClusterView::alone(self.members[me].clone());
        for m in self.members.values() {
            view.members.insert(m.addr.id.clone(), m.clone());
        }
        view
    }

    /// Every live node gets the same view; the coordinator moves to the oldest Up node.
    fn publish_view(&mut self) {
        let now = self.clock.now();
        let nodes: Vec<NodeAddr> = self.regions.keys().cloned().collect();
        for node in &nodes {
            let view = self.view(node);
            if let Some(region) = self.regions.get_mut(node) {
                region.handle_view(view, now);
            }
        }
        let oldest = nodes
            .first()
            .map(|n| self.view(n))
            .and_then(|v| v.oldest_up(ROLE).map(|m| m.addr.clone()));
        let current = self.coordinator.as_ref().map(|(n, _)| n.clone());
        if oldest != current {
            // A new singleton instance: it starts from nothing.
            self.coordinator = oldest.map(|node| {
                (
                    node,
                    Coordinator::new(
                        CoordinatorSettings {
                            registration_wait: Duration::from_secs(3),
                            ..CoordinatorSettings::default()
                        },
                        ROLE,
                        now,
                    ),
                )
            });
        }
        if let Some((node, coordinator)) = &mut self.coordinator {
            let view = {
                let mut view = ClusterView::alone(self.members[node].clone());
                for m in self.members.values() {
                    view.members.insert(m.addr.id.clone(), m.clone());
                }
                view
            };
            coordinator.handle_view(view, now);
        }
        self.pump();
    }

    fn send(&mut self, from: &str, to: u64, message: u64) {
        let now = self.clock.now();
        if let Some(region) = self.regions.get_mut(&addr(from)) {
            region.deliver(entity(to), message, now);
        }
        self.pump();
    }

    /// Moves outputs; delivers the wire (with faults) until nothing moves.
    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            let now = self.clock.now();
            for (node, region) in self.regions.iter_mut() {
                while let Some((to, message)) = region.poll_transmit() {
                    self.wire.push_back((node.clone(), to, message));
                }
                while let Some(command) = region.poll_command() {
                    moved = true;
                    let live = self.live.entry(node.clone()).or_default();
                    match command {
                        EntityCommand::Deliver { entity, message } => {
                            live.insert(entity.clone());
                            self.received
                                .entry(entity)
                                .or_default()
                                .push((node.clone(), message));
                        }
                        EntityCommand::Stop { entity } => {
                            self.stopping.push((node.clone(), entity));
                        }
                    }
                }
            }
            if let Some((node, coordinator)) = &mut self.coordinator {
                while let Some((to, message)) = coordinator.poll_transmit() {
                    self.wire
                        .push_back((node.clone(), to, ShardingMsg::FromCoordinator(message)));
                }
            }
            self.assert_no_entity_twice();
            while let Some((from, to, message)) = self.wire.pop_front() {
                moved = true;
                if self.crashed.contains(&from) || self.crashed.contains(&to) {
                    continue;
                }
                let faults = self.faults;
                if from != to {
                    if self.rng.random_bool(faults.drop) {
                        continue;
                    }
                    if self.rng.random_bool(faults.reorder) && !self.wire.is_empty() {
                        self.wire.push_back((from, to, message));
                        continue;
                    }
                    if self.rng.random_bool(faults.duplicate) {
                        self.deliver_wire(from.clone(), to.clone(), message.clone(), now);
                    }
                }
                self.deliver_wire(from, to, message, now);
            }
            if !moved {
                return;
            }
        }
        panic!("the cores never settled");
    }

    fn deliver_wire(
        &mut self,
        from: NodeAddr,
        to: NodeAddr,
        message: ShardingMsg<u64>,
        now: Instant,
    ) {
        match message {
            ShardingMsg::ToCoordinator(message) => {
                if let Some((node, coordinator)) = &mut self.coordinator
                    && *node == to
                {
                    coordinator.handle_message(from, message, now);
                }
            }
            other => {
                if let Some(region) = self.regions.get_mut(&to) {
                    region.handle_message(from, other, now);
                }
            }
        }
    }

    /// Entities asked to stop finish stopping.
    fn finish_stops(&mut self) {
        let now = self.clock.now();
        for (node, entity) in std::mem::take(&mut self.stopping) {
            if let Some(live) = self.live.get_mut(&node) {
                live.remove(&entity);
            }
            if let Some(region) = self.regions.get_mut(&node) {
                region.handle_entity_stopped(&entity, now);
            }
        }
        self.pump();
    }

    fn run_for(&mut self, total: Duration) {
        let step = Duration::from_millis(100);
        let end = self.clock.now() + total;
        while self.clock.now() < end {
            self.clock.advance(step);
            let now = self.clock.now();
            for region in self.regions.values_mut() {
                region.handle_timeout(now);
            }
            if let Some((_, coordinator)) = &mut self.coordinator {
                coordinator.handle_timeout(now);
            }
            self.pump();
            self.finish_stops();
        }
    }

    fn assert_no_entity_twice(&self) {
        let mut seen: BTreeMap<&EntityId, &NodeAddr> = BTreeMap::new();
        for (node, entities) in &self.live {
            for e in entities {
                if let Some(other) = seen.insert(e, node) {
                    panic!("{e} runs on {other} and {node} at once");
                }
            }
        }
    }

    fn shards_per_node(&self) -> BTreeMap<String, usize> {
        self.regions
            .iter()
            .map(|(node, region)| (node.id.to_string(), region.hosted_shards().len()))
            .collect()
    }

    fn messages_of(&self, n: u64) -> Vec<u64> {
        self.received
            .get(&entity(n))
            .map(|r| r.iter().map(|(_, m)| *m).collect())
            .unwrap_or_default()
    }
}

#[test]
fn messages_reach_their_entities_and_shards_spread_over_the_nodes() {
    let mut h = Harness::new(1, Faults::default());
    h.add_node("a", 1);
    h.add_node("b", 2);
    h.add_node("c", 3);
    h.run_for(Duration::from_secs(1));
    for n in 0..60 {
        h.send(["a", "b", "c"][n as usize % 3], n, n * 10);
    }
    h.run_for(Duration::from_secs(5));
    for n in 0..60 {
        assert_eq!(h.messages_of(n), vec![n * 10], "entity {n}");
    }
    let spread = h.shards_per_node();
    assert!(spread.values().all(|c| *c >= 1), "{spread:?}");
    // Entities of one shard share a node.
    for n in 0..60 {
        let node = &h.received[&entity(n)][0].0;
        let shard = shard_of(&entity(n), 20);
        assert!(h.regions[node].hosted_shards().contains(&shard));
    }
}

#[test]
fn a_joining_node_takes_shards_without_an_entity_ever_running_twice() {
    let mut h = Harness::new(2, Faults::default());
    h.add_node("a", 1);
    h.add_node("b", 2);
    h.run_for(Duration::from_secs(1));
    // Every shard gets a home on a or b.
    for n in 0..200 {
        h.send("a", n, 1);
    }
    h.run_for(Duration::from_secs(3));
    assert_eq!(h.shards_per_node().values().sum::<usize>(), 20);
    h.add_node("c", 3);
    // Keep sending while shards move.
    for round in 2..12 {
        for n in 0..200 {
            h.send(["a", "b", "c"][n as usize % 3], n, round);
        }
        h.run_for(Duration::from_secs(1));
    }
    h.run_for(Duration::from_secs(10));
    let spread = h.shards_per_node();
    assert!(spread.values().all(|c| (6..=7).contains(c)), "{spread:?}");
    for n in 0..200 {
        let got = h.messages_of(n);
        let mut sorted = got.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            sorted,
            (1..12).collect::<Vec<_>>(),
            "entity {n} got {got:?}"
        );
        assert_eq!(
            got.len(),
            11,
            "nothing delivered twice to entity {n}: {got:?}"
        );
    }
}

#[test]
fn a_joining_node_gets_its_share_of_shards_without_any_traffic() {
    let mut h = Harness::new(4, Faults::default());
    h.add_node("a", 1);
    h.add_node("b", 2);
    h.run_for(Duration::from_secs(1));
    for n in 0..200 {
        h.send("a", n, 1);
    }
    h.run_for(Duration::from_secs(3));
    assert_eq!(h.shards_per_node().values().sum::<usize>(), 20);
    // No message after the join: moved shards must still land on c, not vanish.
    h.add_node("c", 3);
    h.run_for(Duration::from_secs(20));
    let spread = h.shards_per_node();
    assert_eq!(spread.values().sum::<usize>(), 20, "{spread:?}");
    assert!(spread.values().all(|c| (6..=7).contains(c)), "{spread:?}");
}

#[test]
fn a_crashed_nodes_shards_are_hosted_elsewhere_and_its_entities_restart_there() {
    let mut h = Harness::new(3, Faults::default());
    h.add_node("a", 1);
    h.add_node("b", 2);
    h.add_node("c", 3);
    h.run_for(Duration::from_secs(1));
    for n in 0..100 {
        h.send("a", n, 1);
    }
    h.run_for(Duration::from_secs(3));
    let on_c: Vec<u64> = (0..100)
        .filter(|n| h.received[&entity(*n)][0].0 == addr("c"))
        .collect();
    assert!(!on_c.is_empty());
    h.crash("c");
    for n in 0..100 {
        h.send("b", n, 2);
    }
    h.run_for(Duration::from_secs(5));
    for n in on_c {
        let last = h.received[&entity(n)].last().unwrap();
        assert_eq!(last.1, 2);
        assert_ne!(last.0, addr("c"));
    }
    assert_eq!(h.shards_per_node().values().sum::<usize>(), 20);
}

#[test]
fn a_leaving_node_hands_off_every_shard_and_the_coordinator_moves_with_it() {
    let mut h = Harness::new(4, Faults::default());
    h.add_node("a", 1);
    h.add_node("b", 2);
    h.add_node("c", 3);
    h.run_for(Duration::from_secs(1));
    for n in 0..100 {
        h.send("b", n, 1);
    }
    h.run_for(Duration::from_secs(3));
    // a (the oldest, so also the coordinator's node) leaves.
    h.set_status("a", MemberStatus::Leaving);
    for n in 0..100 {
        h.send("b", n, 2);
    }
    h.run_for(Duration::from_secs(8));
    assert_eq!(h.shards_per_node()["a"], 0, "{:?}", h.shards_per_node());
    for n in 0..100 {
        assert_eq!(h.messages_of(n), vec![1, 2], "entity {n}");
    }
}

/// Lost, duplicated and reordered control messages: shards still all find a home, messages
/// sent after the cluster settled arrive, and no entity ever runs on two nodes at once.
#[test]
fn faulty_links_never_give_an_entity_two_homes() {
    for seed in 0..20 {
        let faults = Faults {
            drop: 0.2,
            duplicate: 0.2,
            reorder: 0.2,
        };
        let mut h = Harness::new(seed, faults);
        h.add_node("a", 1);
        h.add_node("b", 2);
        h.run_for(Duration::from_secs(1));
        for n in 0..50 {
            h.send("a", n, 1);
        }
        h.add_node("c", 3);
        h.run_for(Duration::from_secs(6));
        h.crash("a");
        h.run_for(Duration::from_secs(10));
        h.faults = Faults::default();
        for n in 0..50 {
            h.send("b", n, 2);
        }
        h.run_for(Duration::from_secs(5));
        for n in 0..50 {
            assert_eq!(
                h.messages_of(n).last(),
                Some(&2),
                "seed {seed}: entity {n} got {:?}",
                h.messages_of(n)
            );
        }
        assert_eq!(
            h.shards_per_node().values().sum::<usize>(),
            20,
            "seed {seed}"
        );
    }
}

/// A view of `members` as seen from `me`.
fn view_of(me: &str, members: &[(&str, u64, MemberStatus)]) -> ClusterView {
    ClusterView {
        self_addr: addr(me),
        members: members
            .iter()
            .map(|(id, age, status)| (NodeId::new(*id), member(id, *age, *status)))
            .collect(),
        unreachable: Default::default(),
    }
}

/// The coordinator's view can lag the region's: a home it names on a node the region already
/// knows is down must not swallow the messages.
#[test]
fn a_region_does_not_send_to_a_home_it_knows_is_down() {
    let now = Instant::now();
    let mut region: Region<u64> = Region::new(Harness::settings(), ROLE, addr("b"));
    region.handle_view(
        view_of(
            "b",
            &[
                ("a", 1, MemberStatus::Up),
                ("b", 2, MemberStatus::Up),
                ("x", 3, MemberStatus::Down),
            ],
        ),
        now,
    );
    region.handle_message(
        addr("a"),
        ShardingMsg::FromCoordinator(FromCoordinator::RegisterAck),
        now,
    );
    while region.poll_transmit().is_some() {}
    region.deliver(entity(1), 7, now);
    let shard = shard_of(&entity(1), Harness::settings().shards);
    assert!(matches!(
        region.poll_transmit(),
        Some((
            _,
            ShardingMsg::ToCoordinator(ToCoordinator::GetShardHome { .. })
        ))
    ));
    let stale = FromCoordinator::ShardHome {
        shard,
        node: addr("x"),
    };
    region.handle_message(addr("a"), ShardingMsg::FromCoordinator(stale), now);
    assert_eq!(
        region.poll_transmit(),
        None,
        "nothing goes to the dead node"
    );
    assert_eq!(region.buffered(), 1);
    // It asks again after the retry interval, and delivers once the home is alive.
    let later = now + Harness::settings().retry_interval;
    region.handle_timeout(later);
    assert!(matches!(
        region.poll_transmit(),
        Some((
            _,
            ShardingMsg::ToCoordinator(ToCoordinator::GetShardHome { .. })
        ))
    ));
    let fresh = FromCoordinator::ShardHome {
        shard,
        node: addr("a"),
    };
    region.handle_message(addr("a"), ShardingMsg::FromCoordinator(fresh), later);
    assert!(matches!(
        region.poll_transmit(),
        Some((to, ShardingMsg::Deliver(_))) if to == addr("a")
    ));
}

/// With messages buffered and nobody to ask (the coordinator's node changed, or none is Up),
/// the region's next deadline must not stay in the past: its driver would spin.
#[test]
fn a_region_without_a_coordinator_to_ask_does_not_wake_constantly() {
    let now = Instant::now();
    let mut region: Region<u64> = Region::new(Harness::settings(), ROLE, addr("b"));
    let both = [("a", 1, MemberStatus::Up), ("b", 2, MemberStatus::Up)];
    region.handle_view(view_of("b", &both), now);
    region.handle_message(
        addr("a"),
        ShardingMsg::FromCoordinator(FromCoordinator::RegisterAck),
        now,
    );
    region.deliver(entity(1), 7, now);
    while region.poll_transmit().is_some() {}
    // The coordinator's node leaves: b re-registers with itself, unanswered so far.
    let leaving = [
        ("a", 1, MemberStatus::Down),
        ("b", 2, MemberStatus::Leaving),
    ];
    region.handle_view(view_of("b", &leaving), now);
    let later = now + Duration::from_secs(5);
    region.handle_timeout(later);
    let next = region.poll_timeout();
    assert!(
        next.is_none_or(|at| at > later),
        "{next:?} is not after {later:?}"
    );
}

/// A failed entity restarts after a pause that doubles with each failure; what arrives for it
/// meanwhile waits and is delivered at the restart.
#[test]
fn a_failed_entity_restarts_after_a_growing_pause_with_what_waited() {
    let now = Instant::now();
    let settings = Harness::settings();
    let mut region: Region<u64> = Region::new(settings.clone(), ROLE, addr("b"));
    region.handle_view(view_of("b", &[("b", 1, MemberStatus::Up)]), now);
    let from_b = |message| ShardingMsg::FromCoordinator(message);
    region.handle_message(addr("b"), from_b(FromCoordinator::RegisterAck), now);
    let shard = shard_of(&entity(1), settings.shards);
    let home = FromCoordinator::ShardHome {
        shard,
        node: addr("b"),
    };
    region.handle_message(addr("b"), from_b(home), now);
    region.deliver(entity(1), 1, now);
    let deliver = |n| EntityCommand::Deliver {
        entity: entity(1),
        message: n,
    };
    assert_eq!(region.poll_command(), Some(deliver(1)));

    let mut pause = settings.restart_min;
    let mut at = now;
    for round in 0..2_u64 {
        region.handle_entity_failed(&entity(1), at);
        region.deliver(entity(1), 10 + round, at);
        assert_eq!(region.poll_command(), None, "it waits while restarting");
        assert_eq!(region.poll_timeout(), Some(at + pause));
        region.handle_timeout(at + pause - Duration::from_millis(1));
        assert_eq!(region.poll_command(), None);
        at += pause;
        region.handle_timeout(at);
        assert_eq!(region.poll_command(), Some(deliver(10 + round)));
        pause *= 2;
    }
}
