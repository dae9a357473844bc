//! Singleton scenarios on cores wired together in memory, on the harness's own clock; the
//! driver scenario at the end runs real tasks on paused time.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;

use super::core::*;
use crate::cluster::member::{ClusterView, Member, MemberStatus, NodeAddr, NodeId};
use crate::testkit::Clock;

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
        roles: BTreeSet::from(["host".to_owned()]),
        status,
        started_at_ms: age,
    }
}

/// Several nodes' cores, the messages between them, and which instances run.
struct Harness {
    cores: BTreeMap<NodeAddr, SingletonCore>,
    /// Messages in flight, delivered by `pump`.
    wire: Vec<(NodeAddr, NodeAddr, SingletonMsg)>,
    running: BTreeSet<NodeAddr>,
    /// Instances told to stop that have not finished stopping yet.
    stopping: BTreeSet<NodeAddr>,
    /// Nodes whose messages are lost (crashed).
    dead: BTreeSet<NodeAddr>,
    clock: Clock,
}

impl Harness {
    fn new(ids: &[&str]) -> Self {
        Self::ranked(ids, 0)
    }

    /// Cores of a singleton placed on the member at `rank`.
    fn ranked(ids: &[&str], rank: usize) -> Self {
        // Each starts, as a node does, with a view of itself joining.
        let clock = Clock::new();
        let placement = Placement {
            role: "host".to_owned(),
            rank,
        };
        let cores = ids
            .iter()
            .map(|id| {
                let mut core =
                    SingletonCore::new("s", placement.clone(), addr(id), Duration::from_secs(1));
                let alone = ClusterView::alone(member(id, 0, MemberStatus::Joining));
                core.handle_view(alone, clock.now());
                (addr(id), core)
            })
            .collect();
        Harness {
            cores,
            wire: Vec::new(),
            running: BTreeSet::new(),
            stopping: BTreeSet::new(),
            dead: BTreeSet::new(),
            clock,
        }
    }

    /// Gives `node` a view with `members`.
    fn view(&mut self, node: &str, members: &[Member]) {
        let me = addr(node);
        let mut view = ClusterView::alone(members.iter().find(|m| m.addr == me).cloned().unwrap());
        for m in members {
            view.members.insert(m.addr.id.clone(), m.clone());
        }
        let now = self.clock.now();
        if let Some(core) = self.cores.get_mut(&me) {
            core.handle_view(view, now);
        }
        self.pump();
    }

    fn view_all(&mut self, members: &[Member]) {
        let ids: Vec<String> = self.cores.keys().map(|a| a.id.to_string()).collect();
        for id in ids {
            if !self.dead.contains(&addr(&id)) {
                self.view(&id, members);
            }
        }
    }

    /// Moves outputs and messages until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for (node, core) in self.cores.iter_mut() {
                while let Some((to, message)) = core.poll_transmit() {
                    self.wire.push((node.clone(), to, message));
                }
                while let Some(event) = core.poll_event() {
                    moved = true;
                    match event {
                        SingletonEvent::Start => {
                            self.running.insert(node.clone());
                        }
                        SingletonEvent::Stop => {
                            self.stopping.insert(node.clone());
                        }
                    }
                }
            }
            for (from, to, message) in std::mem::take(&mut self.wire) {
                if self.dead.contains(&from) || self.dead.contains(&to) {
                    continue;
                }
                moved = true;
                if let Some(core) = self.cores.get_mut(&to) {
                    core.handle_message(from, message, self.clock.now());
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// Instances asked to stop finish stopping.
    fn finish_stopping(&mut self) {
        for node in std::mem::take(&mut self.stopping) {
            self.running.remove(&node);
            if let Some(core) = self.cores.get_mut(&node) {
                core.handle_stopped(self.clock.now());
            }
        }
        self.pump();
    }

    fn advance(&mut self, by: Duration) {
        self.clock.advance(by);
        let now = self.clock.now();
        for core in self.cores.values_mut() {
            core.handle_timeout(now);
        }
        self.pump();
    }

    fn running(&self) -> Vec<&str> {
        self.running.iter().map(|a| a.id.as_str()).collect()
    }
}

fn three_up() -> Vec<Member> {
    vec![
        member("a", 1, MemberStatus::Up),
        member("b", 2, MemberStatus::Up),
        member("c", 3, MemberStatus::Up),
    ]
}

#[test]
fn only_the_oldest_starts_and_only_once_the_others_released() {
    let mut h = Harness::new(&["a", "b", "c"]);
    h.dead.insert(addr("c"));
    h.view_all(&three_up());
    h.advance(Duration::from_secs(3));
    assert!(h.running().is_empty(), "c has not answered");
    h.dead.clear();
    h.view("c", &three_up());
    h.advance(Duration::from_secs(1));
    assert_eq!(h.running(), vec!["a"]);
}

#[test]
fn a_leaving_holder_stops_before_the_next_oldest_starts() {
    let mut h = Harness::new(&["a", "b", "c"]);
    h.view_all(&three_up());
    h.advance(Duration::from_secs(1));
    assert_eq!(h.running(), vec!["a"]);

    let mut leaving = three_up();
    leaving[0].status = MemberStatus::Leaving;
    h.view_all(&leaving);
    assert_eq!(h.running(), vec!["a"], "still stopping");
    assert!(h.stopping.contains(&addr("a")));
    h.advance(Duration::from_secs(3));
    assert_eq!(h.running(), vec!["a"], "b waits however long a takes");
    h.finish_stopping();
    assert_eq!(h.running(), vec!["b"]);
}

#[test]
fn a_ranked_singleton_runs_on_the_member_at_its_rank_and_moves_only_after_it_stopped() {
    let mut h = Harness::ranked(&["a", "b", "c"], 1);
    h.view_all(&three_up());
    h.advance(Duration::from_secs(1));
    assert_eq!(h.running(), vec!["b"], "the second oldest");

    // b leaves: c is second oldest among a and c, and starts once b has stopped.
    let mut leaving = three_up();
    leaving[1].status = MemberStatus::Leaving;
    h.view_all(&leaving);
    h.advance(Duration::from_secs(3));
    assert_eq!(h.running(), vec!["b"], "c waits however long b takes");
    h.finish_stopping();
    assert_eq!(h.running(), vec!["c"]);

    // c goes down too: rank 1 of one member counts round to a.
    let mut alone = leaving.clone();
    alone[1].status = MemberStatus::Down;
    alone[2].status = MemberStatus::Down;
    h.dead.insert(addr("c"));
    h.view("a", &alone);
    h.running.remove(&addr("c"));
    assert_eq!(h.running(), vec!["a"]);
}

#[test]
fn a_crashed_holder_is_replaced_once_it_is_down() {
    let mut h = Harness::new(&["a", "b", "c"]);
    h.view_all(&three_up());
    h.advance(Duration::from_secs(1));
    h.dead.insert(addr("a"));
    h.advance(Duration::from_secs(5));
    assert_eq!(h.running(), vec!["a"], "unreachable is not down");
    let mut down = three_up();
    down[0].status = MemberStatus::Down;
    h.view_all(&down);
    h.running.remove(&addr("a"));
    assert_eq!(h.running(), vec!["b"]);
}

#[test]
fn two_nodes_that_each_think_they_are_oldest_never_both_run_it() {
    let mut h = Harness::new(&["a", "b"]);
    let a_up = vec![
        member("a", 1, MemberStatus::Up),
        member("b", 2, MemberStatus::Up),
    ];
    // b still sees a as joining, so b thinks it is the oldest Up member; a, still joining
    // itself, releases to b.
    let b_view = vec![
        member("a", 1, MemberStatus::Joining),
        member("b", 2, MemberStatus::Up),
    ];
    h.view("b", &b_view);
    assert_eq!(h.running(), vec!["b"]);
    // a is Up now and thinks it is the oldest; b does not release while it thinks so too.
    h.view("a", &a_up);
    for _ in 0..5 {
        h.advance(Duration::from_secs(1));
        assert_eq!(h.running(), vec!["b"]);
    }
    // Views agree: b hands over.
    h.view("b", &a_up);
    h.finish_stopping();
    h.advance(Duration::from_secs(1));
    assert_eq!(h.running(), vec!["a"]);
}

#[test]
fn a_joining_older_node_does_not_displace_a_running_instance_until_up() {
    let mut h = Harness::new(&["a", "b"]);
    let only_b = vec![
        member("b", 2, MemberStatus::Up),
        member("a", 1, MemberStatus::Joining),
    ];
    h.view_all(&only_b);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.running(), vec!["b"]);
    // a becomes Up and is older: b hands over.
    let both = vec![
        member("a", 1, MemberStatus::Up),
        member("b", 2, MemberStatus::Up),
    ];
    h.view_all(&both);
    assert_eq!(h.running(), vec!["b"]);
    h.finish_stopping();
    h.advance(Duration::from_secs(1));
    assert_eq!(h.running(), vec!["a"]);
}

/// Random view changes (every node sees the same views, as converged gossip does) and random
/// stop delays: never two instances at once, and once views settle, exactly one runs where
/// it belongs.
#[test]
fn random_membership_changes_never_run_two_instances() {
    // Ranked singletons move on every join and leave, the oldest only when it goes.
    for rank in 0..4 {
        random_membership_changes_at_rank(rank);
    }
}

fn random_membership_changes_at_rank(rank: usize) {
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};
    for seed in 0..100u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let ids = ["a", "b", "c", "d"];
        let mut h = Harness::ranked(&ids, rank);
        let mut members: Vec<Member> = ids
            .iter()
            .enumerate()
            .map(|(age, id)| member(id, age as u64, MemberStatus::Up))
            .collect();
        for _ in 0..30 {
            let i = rng.random_range(0..members.len());
            members[i].status = match rng.random_range(0..4) {
                0 => MemberStatus::Joining,
                1 | 2 => MemberStatus::Up,
                _ => MemberStatus::Leaving,
            };
            h.view_all(&members);
            assert!(
                h.running.len() <= 1,
                "rank {rank} seed {seed}: {:?}",
                h.running()
            );
            if rng.random_bool(0.5) {
                h.finish_stopping();
                assert!(
                    h.running.len() <= 1,
                    "rank {rank} seed {seed}: {:?}",
                    h.running()
                );
            }
            h.advance(Duration::from_millis(rng.random_range(0..1500)));
            assert!(
                h.running.len() <= 1,
                "rank {rank} seed {seed}: {:?}",
                h.running()
            );
        }
        for m in members.iter_mut() {
            m.status = MemberStatus::Up;
        }
        h.view_all(&members);
        h.finish_stopping();
        h.advance(Duration::from_secs(1));
        h.finish_stopping();
        h.advance(Duration::from_secs(1));
        assert_eq!(h.running(), vec![ids[rank]], "rank {rank} seed {seed}");
    }
}

mod with_the_driver {
    //! The manager task with real instances, over an in-memory network with faults.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::watch;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::cluster::context::NodeContext;
    use crate::cluster::metrics::ClusterMetrics;
    use crate::cluster::singleton::driver::{
        self, SingletonHandle, SingletonSettings, SingletonSpec,
    };
    use crate::delivery::driver::Faults;
    use crate::testkit::network::SimNetwork;

    /// How many instances run at once, and the most that ever did.
    #[derive(Default)]
    struct Census {
        now: AtomicUsize,
        most: AtomicUsize,
        started: AtomicUsize,
    }

    fn spec(census: Arc<Census>) -> SingletonSpec {
        SingletonSpec {
            name: "s".to_owned(),
            placement: Placement::oldest("host"),
            factory: Arc::new(move |cancel: CancellationToken| {
                let census = Arc::clone(&census);
                Box::pin(async move {
                    let n = census.now.fetch_add(1, Ordering::SeqCst) + 1;
                    census.most.fetch_max(n, Ordering::SeqCst);
                    census.started.fetch_add(1, Ordering::SeqCst);
                    cancel.cancelled().await;
                    // Winding down takes a while (a bridge drains its in-flight work).
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    census.now.fetch_sub(1, Ordering::SeqCst);
                })
            }),
        }
    }

    struct Node {
        view: watch::Sender<ClusterView>,
        handle: SingletonHandle,
        stop: CancellationToken,
    }

    fn start(network: &SimNetwork<SingletonMsg>, id: &str, census: &Arc<Census>) -> Node {
        start_with(network, id, vec![spec(Arc::clone(census))])
    }

    /// A node running the manager with `specs`.
    fn start_with(network: &SimNetwork<SingletonMsg>, id: &str, specs: Vec<SingletonSpec>) -> Node {
        let me = member(id, 0, MemberStatus::Joining);
        let (view, view_rx) = watch::channel(ClusterView::alone(me.clone()));
        let (inbox, outbox) = network.join(&me.addr, 64);
        let stop = CancellationToken::new();
        let node = NodeContext {
            me: me.addr,
            view: view_rx,
            metrics: ClusterMetrics::unregistered(),
            shutdown: stop.clone(),
        };
        let handle = driver::spawn(&node, specs, outbox, inbox, SingletonSettings::default());
        Node { view, handle, stop }
    }

    fn set_view(nodes: &[&Node], members: &[Member]) {
        for node in nodes {
            node.view.send_modify(|view| {
                for m in members {
                    view.members.insert(m.addr.id.clone(), m.clone());
                }
            });
        }
    }

    async fn until_running(node: &Node) {
        let mut running = node.handle.running();
        tokio::time::timeout(
            Duration::from_secs(30),
            running.wait_for(|r| r.contains("s")),
        )
        .await
        .expect("the singleton starts here")
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_without_the_singleton_releases_it_so_that_it_still_starts() {
        // c is configured without "s" (as a node with fewer partitions lacks their bridges):
        // a must still hear a release from it.
        let network = SimNetwork::new(Faults::default(), 3);
        let census = Arc::new(Census::default());
        let a = start(&network, "a", &census);
        let b = start(&network, "b", &census);
        let c = start_with(&network, "c", Vec::new());
        set_view(&[&a, &b, &c], &three_up());
        until_running(&a).await;
        assert_eq!(census.started.load(Ordering::SeqCst), 1);
        assert!(c.handle.running().borrow().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn one_instance_runs_and_hands_over_on_leave_and_is_taken_over_on_crash() {
        let faults = Faults {
            drop: 0.2,
            duplicate: 0.2,
            delay: 0.2,
            max_delay: Duration::from_millis(300),
        };
        let network = SimNetwork::new(faults, 7);
        let census = Arc::new(Census::default());
        let a = start(&network, "a", &census);
        let b = start(&network, "b", &census);
        let c = start(&network, "c", &census);
        set_view(&[&a, &b, &c], &three_up());
        until_running(&a).await;

        // a leaves: it winds down, then b takes over.
        let mut leaving = three_up();
        leaving[0].status = MemberStatus::Leaving;
        set_view(&[&a, &b, &c], &leaving);
        until_running(&b).await;
        assert!(!a.handle.running().borrow().contains("s"));
        assert_eq!(
            census.most.load(Ordering::SeqCst),
            1,
            "b started after a wound down"
        );
        a.stop.cancel();
        a.handle.stopped().await;

        // b crashes: once the others see it down, c takes over.
        network.crash(&addr("b"));
        let mut crashed = leaving.clone();
        crashed[0].status = MemberStatus::Down;
        crashed[1].status = MemberStatus::Down;
        set_view(&[&c], &crashed);
        until_running(&c).await;
        b.stop.cancel();
        b.handle.stopped().await;

        assert_eq!(census.started.load(Ordering::SeqCst), 3);
        c.stop.cancel();
        c.handle.stopped().await;
        assert_eq!(
            census.now.load(Ordering::SeqCst),
            0,
            "every instance wound down"
        );
    }
}
