//! Membership on real UDP sockets on loopback, real time (chitchat runs its own timers).

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::cluster::auth::ClusterSecret;
use crate::cluster::membership::downing::DownReason;
use crate::cluster::membership::join::JoinBlocker;
use crate::testkit::free_port;

const SECRET: &str = "a test cluster secret";
const JOIN_TIMEOUT: Duration = Duration::from_secs(1);

fn settings(seeds: &[SocketAddr]) -> MembershipSettings {
    MembershipSettings {
        seeds: seeds.iter().map(ToString::to_string).collect(),
        join_timeout: JOIN_TIMEOUT,
        ..MembershipSettings::default()
    }
}

fn secret(text: &str) -> Security {
    Security::Secret(ClusterSecret::new(text).unwrap())
}

async fn node(id: &str, seeds: &[SocketAddr], security: Security) -> (Membership, SocketAddr) {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    node_at(id, addr, seeds, security).await
}

async fn node_at(
    id: &str,
    addr: SocketAddr,
    seeds: &[SocketAddr],
    security: Security,
) -> (Membership, SocketAddr) {
    start_node(id, addr, settings(seeds), security).await
}

async fn start_node(
    id: &str,
    addr: SocketAddr,
    settings: MembershipSettings,
    security: Security,
) -> (Membership, SocketAddr) {
    let started_at_ms = crate::delivery::durable::wall_clock_millis();
    let me = Member {
        addr: NodeAddr {
            id: NodeId::new(id),
            generation: started_at_ms,
        },
        rpc_addr: addr,
        roles: BTreeSet::from(["shard-host".to_owned()]),
        status: MemberStatus::Joining,
        started_at_ms,
    };
    let membership = Membership::start(
        me,
        addr,
        settings,
        security,
        None,
        None,
        ClusterMetrics::unregistered(),
    )
    .await
    .unwrap();
    (membership, addr)
}

/// Waits until `membership`'s view satisfies `check`, for at most 10 s.
async fn until(membership: &Membership, what: &str, check: impl Fn(&ClusterView) -> bool) {
    let mut view = membership.view();
    tokio::time::timeout(Duration::from_secs(10), view.wait_for(|v| check(v)))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "timed out waiting for {what}: {:?}",
                membership.view().borrow()
            )
        })
        .unwrap();
}

fn status_of(view: &ClusterView, id: &str) -> Option<MemberStatus> {
    view.members.get(&NodeId::new(id)).map(|m| m.status)
}

fn all_up(view: &ClusterView, ids: &[&str]) -> bool {
    ids.iter()
        .all(|id| status_of(view, id) == Some(MemberStatus::Up))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_the_secret_meet_and_a_node_without_it_is_never_a_member() {
    let (a, seed) = node("a", &[], secret(SECRET)).await;
    let (b, _) = node("b", &[seed], secret(SECRET)).await;
    let (c, _) = node("c", &[seed], secret(SECRET)).await;
    for m in [&a, &b, &c] {
        until(m, "three up members", |v| all_up(v, &["a", "b", "c"])).await;
    }
    let (intruder, _) = node("x", &[seed], secret("some other secret value")).await;
    let (open, _) = node("y", &[seed], Security::Insecure).await;
    // Neither forms a cluster of its own, however long it waits past the join timeout.
    for (m, id) in [(&intruder, "x"), (&open, "y")] {
        never_up(m, id, JOIN_TIMEOUT * 3).await;
    }
    for m in [&a, &b, &c] {
        let view = m.view().borrow().clone();
        assert_eq!(view.members.len(), 3, "{view:?}");
    }
}

/// Waits until `membership` (node `id`) is joining for a reason that `check` accepts; returns it.
async fn joining_blocked(
    membership: &Membership,
    id: &str,
    check: impl Fn(&JoinBlocker) -> bool,
) -> JoinBlocker {
    let mut join = membership.join_state();
    let state = tokio::time::timeout(
        Duration::from_secs(10),
        join.wait_for(|s| matches!(s, JoinState::Joining(b) if check(b))),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{id}: join state stayed {:?}",
            membership.join_state().borrow()
        )
    })
    .unwrap()
    .clone();
    let JoinState::Joining(blocker) = state else {
        unreachable!()
    };
    blocker
}

/// Asserts that node `id` does not become Up within `window`.
async fn never_up(membership: &Membership, id: &str, window: Duration) {
    let mut view = membership.view();
    let up = tokio::time::timeout(
        window,
        view.wait_for(|v| status_of(v, id) == Some(MemberStatus::Up)),
    )
    .await;
    assert!(
        up.is_err(),
        "{id} became Up: {:?}",
        membership.view().borrow()
    );
    assert!(matches!(
        *membership.join_state().borrow(),
        JoinState::Joining(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_first_seed_forms_a_cluster_and_the_others_wait_for_it() {
    let [a_addr, b_addr, c_addr] = [(); 3].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
    let seeds = [a_addr, b_addr, c_addr];
    let (b, _) = node_at("b", b_addr, &seeds, secret(SECRET)).await;
    let (c, _) = node_at("c", c_addr, &seeds, secret(SECRET)).await;
    // b and c meet each other, but neither may form the cluster: a is listed first.
    let blocker = joining_blocked(&b, "b", |b| matches!(b, JoinBlocker::NoUpMember { .. })).await;
    assert_eq!(
        blocker,
        JoinBlocker::NoUpMember {
            met: vec!["c".to_owned()]
        }
    );
    never_up(&b, "b", JOIN_TIMEOUT * 3).await;
    never_up(&c, "c", Duration::ZERO).await;

    let (a, _) = node_at("a", a_addr, &seeds, secret(SECRET)).await;
    for m in [&a, &b, &c] {
        until(m, "three up members", |v| all_up(v, &["a", "b", "c"])).await;
        assert_eq!(*m.join_state().borrow(), JoinState::Joined);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_seed_alone_forms_the_cluster_after_the_join_timeout() {
    let [a_addr, b_addr] = [(); 2].map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())));
    let started = Instant::now();
    let (a, _) = node_at("a", a_addr, &[a_addr, b_addr], secret(SECRET)).await;
    until(&a, "a up", |v| all_up(v, &["a"])).await;
    assert!(
        started.elapsed() >= JOIN_TIMEOUT,
        "up after {:?}",
        started.elapsed()
    );
    assert_eq!(*a.join_state().borrow(), JoinState::Joined);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_seed_is_unreachable_says_so_and_gives_up() {
    let nobody = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let me = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let give_up = Duration::from_secs(3);
    let started = Instant::now();
    let (lonely, _) = start_node(
        "lonely",
        me,
        MembershipSettings {
            give_up_after: Some(give_up),
            ..settings(&[nobody])
        },
        secret(SECRET),
    )
    .await;
    let blocker = joining_blocked(&lonely, "lonely", |b| {
        matches!(b, JoinBlocker::Unreachable { .. })
    })
    .await;
    assert!(
        blocker.to_string().contains(&nobody.to_string()),
        "{blocker}"
    );
    let mut join = lonely.join_state();
    tokio::time::timeout(
        give_up * 3,
        join.wait_for(|s| matches!(s, JoinState::GaveUp(JoinBlocker::Unreachable { .. }))),
    )
    .await
    .unwrap_or_else(|_| panic!("did not give up: {:?}", lonely.join_state().borrow()))
    .unwrap();
    assert!(
        started.elapsed() >= give_up,
        "gave up after {:?}",
        started.elapsed()
    );
    assert!(!all_up(&lonely.view().borrow(), &["lonely"]));
}

/// Settings with a short downing wait, so a crash is resolved within the tests' 10 s.
fn quick_downing(seeds: &[SocketAddr]) -> MembershipSettings {
    MembershipSettings {
        downing: DowningSettings {
            stable_after: Duration::from_secs(2),
            down_removal_margin: Duration::from_secs(1),
            ..DowningSettings::default()
        },
        ..settings(seeds)
    }
}

async fn quick_node(id: &str, seeds: &[SocketAddr]) -> (Membership, SocketAddr) {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    start_node(id, addr, quick_downing(seeds), secret(SECRET)).await
}

/// Like [`quick_downing`] with a wide removal margin: two peers that crash together may be
/// called unreachable up to 2 s apart before this node's view counts as unstable.
fn patient_downing(seeds: &[SocketAddr]) -> MembershipSettings {
    let mut settings = quick_downing(seeds);
    settings.downing.down_removal_margin = Duration::from_secs(4);
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_is_down_once_the_majority_has_waited_and_a_leaving_one_at_once() {
    let (a, seed) = quick_node("a", &[]).await;
    let (b, _) = quick_node("b", &[seed]).await;
    let (c, _) = quick_node("c", &[seed]).await;
    until(&a, "three up members", |v| all_up(v, &["a", "b", "c"])).await;
    until(&b, "three up members", |v| all_up(v, &["a", "b", "c"])).await;

    let crashed_at = Instant::now();
    c.crash();
    until(&a, "c unreachable", |v| {
        v.unreachable.iter().any(|n| n.id.as_str() == "c")
    })
    .await;
    let unreachable_after = crashed_at.elapsed();
    assert_eq!(status_of(&a.view().borrow(), "c"), Some(MemberStatus::Up));
    until(&a, "c down", |v| {
        status_of(v, "c") == Some(MemberStatus::Down)
    })
    .await;
    let detection = crashed_at.elapsed();
    println!("crash: unreachable after {unreachable_after:?}, down after {detection:?}");
    // Never before the failure detector, `down_after`, `stable_after` and the margin.
    let settings = quick_downing(&[]);
    let earliest =
        settings.down_after + settings.downing.stable_after + settings.downing.down_removal_margin;
    assert!(detection >= earliest, "took {detection:?}");
    assert!(
        detection < earliest + Duration::from_secs(4),
        "took {detection:?}"
    );
    assert!(a.downed_self().borrow().is_none());
    assert!(
        a.view().borrow().unreachable.is_empty(),
        "a down member is not unreachable"
    );

    let leaving_at = Instant::now();
    let leaving = tokio::spawn(async move {
        b.leave().await;
        b
    });
    until(&a, "b leaving", |v| {
        status_of(v, "b") == Some(MemberStatus::Leaving)
    })
    .await;
    let b = leaving.await.unwrap();
    b.shutdown().await;
    until(&a, "b down", |v| {
        status_of(v, "b") == Some(MemberStatus::Down)
    })
    .await;
    let left = leaving_at.elapsed();
    println!("graceful leave seen as down after {left:?}");
    assert!(left < Duration::from_secs(2), "took {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_majority_downs_itself_and_never_downs_them() {
    let patient = |id: &'static str, seeds: Vec<SocketAddr>| async move {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        start_node(id, addr, patient_downing(&seeds), secret(SECRET)).await
    };
    let (a, seed) = patient("a", vec![]).await;
    let (b, _) = patient("b", vec![seed]).await;
    let (c, _) = patient("c", vec![seed]).await;
    until(&a, "three up members", |v| all_up(v, &["a", "b", "c"])).await;
    // From a's side, two crashes look exactly like a partition with a alone.
    let cut_at = Instant::now();
    b.crash();
    c.crash();
    let mut downed = a.downed_self();
    tokio::time::timeout(Duration::from_secs(10), downed.wait_for(Option::is_some))
        .await
        .expect("a downs itself")
        .unwrap();
    let took = cut_at.elapsed();
    println!("alone: downed itself after {took:?}");
    assert_eq!(
        *a.downed_self().borrow(),
        Some(DownReason::LosingSide {
            strategy: "keep-majority",
            reachable: 1,
            unreachable: 2
        })
    );
    let settings = patient_downing(&[]);
    assert!(took >= settings.down_after + settings.downing.stable_after);
    // Its own view says so a moment later (the round that decided publishes it).
    until(&a, "a down in its own view", |v| {
        status_of(v, "a") == Some(MemberStatus::Down)
    })
    .await;
    let view = a.view().borrow().clone();
    for other in ["b", "c"] {
        assert_eq!(status_of(&view, other), Some(MemberStatus::Up), "{view:?}");
    }
}
