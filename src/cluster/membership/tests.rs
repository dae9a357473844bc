//! Membership on real UDP sockets on loopback, real time (chitchat runs its own timers).

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::cluster::auth::ClusterSecret;
use crate::testkit::free_port;

const SECRET: &str = "a test cluster secret";

fn settings(seeds: &[SocketAddr]) -> MembershipSettings {
    MembershipSettings {
        seeds: seeds.iter().map(ToString::to_string).collect(),
        join_timeout: Duration::from_secs(1),
        ..MembershipSettings::default()
    }
}

fn secret(text: &str) -> Security {
    Security::Secret(ClusterSecret::new(text).unwrap())
}

async fn node(id: &str, seeds: &[SocketAddr], security: Security) -> (Membership, SocketAddr) {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
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
        settings(seeds),
        security,
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
    // Both gave up joining and formed clusters of their own, having gossiped with the seed.
    until(&intruder, "the intruder alone and up", |v| {
        all_up(v, &["x"]) && v.members.len() == 1
    })
    .await;
    until(&open, "the insecure node alone and up", |v| {
        all_up(v, &["y"]) && v.members.len() == 1
    })
    .await;
    for m in [&a, &b, &c] {
        let view = m.view().borrow().clone();
        assert_eq!(view.members.len(), 3, "{view:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_is_down_within_seconds_and_a_leaving_one_at_once() {
    let (a, seed) = node("a", &[], secret(SECRET)).await;
    let (b, _) = node("b", &[seed], secret(SECRET)).await;
    let (c, _) = node("c", &[seed], secret(SECRET)).await;
    until(&a, "three up members", |v| all_up(v, &["a", "b", "c"])).await;
    until(&b, "three up members", |v| all_up(v, &["a", "b", "c"])).await;

    let crashed_at = Instant::now();
    c.crash();
    until(&a, "c down", |v| {
        status_of(v, "c") == Some(MemberStatus::Down)
    })
    .await;
    let detection = crashed_at.elapsed();
    println!("crash detected after {detection:?}");
    // The default settings aim at about 3 s: the failure detector, then `down_after`.
    assert!(
        detection >= Duration::from_millis(1500),
        "took {detection:?}"
    );
    assert!(detection < Duration::from_secs(5), "took {detection:?}");

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
