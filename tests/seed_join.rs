//! The seed rule with real `warren-consumer` processes, a real broker and a real PostgreSQL: a
//! node that cannot join its cluster (its only seed unreachable, or a wrong secret) never forms
//! one of its own, never consumes the queue and never hosts a shard; only the node listed first
//! in the seeds forms a cluster, and a cluster whose first seed starts last forms when it comes
//! up, consuming nothing before.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use support::{Consumer, Orders, TestDb, TestQueue, eventually, free_port, up_members};

const SECRET: &str = "warren-test-secret-0123456789";
const JOIN_TIMEOUT: &str = "1s";
/// How long a node that must not join is watched: several join timeouts.
const WATCH: Duration = Duration::from_secs(5);
const ORDERS: usize = 300;
const DRAIN: Duration = Duration::from_secs(60);
/// warren-consumer's exit status after giving up joining.
const EXIT_GAVE_UP_JOINING: i32 = 3;

/// Starts a node named `name` on `listen` with `seeds`, its secret and store, not waiting for
/// it to consume.
async fn node(
    queue: &TestQueue,
    name: &str,
    listen: SocketAddr,
    seeds: &[SocketAddr],
    secret: &str,
    store: &str,
    env: &[(&str, &str)],
) -> Consumer {
    let listen = listen.to_string();
    let seeds: Vec<String> = seeds.iter().map(ToString::to_string).collect();
    let seeds = seeds.join(",");
    let mut args = vec![
        "--node-id",
        name,
        "--listen",
        &listen,
        "--cluster-secret",
        secret,
        "--entity-store",
        store,
    ];
    if !seeds.is_empty() {
        args.extend(["--seeds", &seeds]);
    }
    let mut env = env.to_vec();
    env.push(("WARREN_CLUSTER__JOIN_TIMEOUT", JOIN_TIMEOUT));
    Consumer::launch(queue, &args, &env).await
}

fn names(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// Watches `nodes` for [`WATCH`]: none joins, consumes or hosts a shard, and the broker sees no
/// consumer beyond `consumers` while the backlog of `ready` messages stays put. Returns the
/// last status of each node.
async fn stay_out(
    nodes: &[&Consumer],
    queue: &TestQueue,
    consumers: u64,
    ready: u64,
) -> Vec<Value> {
    let started = Instant::now();
    let mut last = Vec::new();
    while started.elapsed() < WATCH {
        last.clear();
        for node in nodes {
            let status = node.get("/cluster").await.expect("/cluster answers");
            assert_eq!(status["join"], "joining", "{status}");
            assert!(up_members(&status).is_empty(), "{status}");
            assert_eq!(status["shards_here"], serde_json::json!([]), "{status}");
            assert_eq!(status["singletons_here"], serde_json::json!([]), "{status}");
            assert!(node.get("/health").await.is_none(), "healthy: {status}");
            // Alive, but not ready for traffic while it is not an Up member.
            assert!(node.get("/livez").await.is_some(), "not live: {status}");
            assert!(node.get("/readyz").await.is_none(), "ready: {status}");
            last.push(status);
        }
        let counts = queue.counts().await;
        assert_eq!(counts.consumers, consumers, "{counts:?}");
        if ready > 0 {
            assert_eq!(counts.ready, ready, "{counts:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_only_seed_is_unreachable_never_consumes_and_gives_up() {
    let queue = TestQueue::new("seed-unreachable");
    queue.declare().await;
    let mut orders = Orders::new(&queue, 10);
    orders.publish(ORDERS).await;
    let nobody = free_port([127, 0, 0, 1]);
    let give_up = Duration::from_secs(8);
    let started = Instant::now();
    let mut lonely = node(
        &queue,
        "n2",
        free_port([127, 0, 0, 1]),
        &[nobody],
        SECRET,
        "memory",
        &[("WARREN_CLUSTER__GIVE_UP_JOINING_AFTER", "8s")],
    )
    .await;

    let last = stay_out(&[&lonely], &queue, 0, ORDERS as u64).await;
    let blocker = last[0]["join_blocker"].as_str().unwrap_or_default();
    assert!(
        blocker.contains("no seed is reachable") && blocker.contains(&nobody.to_string()),
        "{}",
        last[0]
    );

    let status = lonely.exited_within(give_up * 3).await;
    println!(
        "exited {:?} after start (give_up_joining_after 8s)",
        started.elapsed()
    );
    assert_eq!(
        status.code(),
        Some(EXIT_GAVE_UP_JOINING),
        "{}",
        lonely.log_tail()
    );
    assert!(
        started.elapsed() >= give_up,
        "gave up after {:?}",
        started.elapsed()
    );
    let log = std::fs::read_to_string(&lonely.log).unwrap_or_default();
    assert!(
        log.contains("giving up joining the cluster"),
        "{}",
        lonely.log_tail()
    );
    assert!(!log.contains("this node consumes the queue"), "{log}");
    let counts = queue.counts().await;
    assert_eq!((counts.ready, counts.consumers), (ORDERS as u64, 0));
}

/// With `RUST_BACKTRACE=1` a failed gossip send is still one line, not a stack backtrace each
/// (an IPv6 seed from an IPv4 socket fails every send, locally).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_gossip_sends_log_no_backtraces_even_with_rust_backtrace_set() {
    let queue = TestQueue::new("seed-backtrace");
    queue.declare().await;
    let seed: SocketAddr = "[::1]:7399".parse().expect("an IPv6 address");
    let lonely = node(
        &queue,
        "n2",
        free_port([127, 0, 0, 1]),
        &[seed],
        SECRET,
        "memory",
        &[("RUST_BACKTRACE", "1")],
    )
    .await;
    let log = eventually(
        "three failed gossip sends in the log",
        Duration::from_secs(30),
        || async {
            let log = std::fs::read_to_string(&lonely.log).unwrap_or_default();
            (log.matches("Failed to gossip").count() >= 3).then_some(log)
        },
    )
    .await;
    assert!(!log.contains("Stack backtrace"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_wrong_secret_is_refused_and_neither_forms_a_cluster_nor_consumes() {
    let queue = TestQueue::new("seed-wrong-secret");
    queue.declare().await;
    let db = TestDb::create("seed_wrong_secret").await;
    let n1_addr = free_port([127, 0, 0, 1]);
    let n1 = node(&queue, "n1", n1_addr, &[n1_addr], SECRET, &db.url(), &[]).await;
    eventually("n1 to consume", DRAIN, || async { n1.get("/health").await }).await;

    let intruder = node(
        &queue,
        "n2",
        free_port([127, 0, 0, 1]),
        &[n1_addr],
        "another-secret-0123456789",
        &db.url(),
        &[],
    )
    .await;
    // While the intruder waits, n1 alone consumes the orders published meanwhile.
    let mut orders = Orders::new(&queue, 10);
    orders.publish(ORDERS).await;
    let last = stay_out(&[&intruder], &queue, 1, 0).await;
    let blocker = last[0]["join_blocker"].as_str().unwrap_or_default();
    assert!(
        blocker.contains("refused") && blocker.contains("cluster.secret"),
        "{}",
        last[0]
    );

    queue.wait_drained(DRAIN).await;
    assert_eq!(queue.dlq_counts().await.ready, 0);
    let status = n1.get("/cluster").await.expect("n1 answers");
    assert_eq!(up_members(&status), names(&["n1"]), "{status}");
    let acked = "warren_deliveries_total{outcome=\"acked\"}";
    assert_eq!(n1.metric(acked).await, ORDERS as f64);
    assert_eq!(intruder.metric(acked).await, 0.0);
    orders.assert_applied_exactly_once(&n1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_seed_alone_forms_the_cluster() {
    let queue = TestQueue::new("seed-first-alone");
    queue.declare().await;
    let mut orders = Orders::new(&queue, 10);
    orders.publish(ORDERS).await;
    let seeds = [(); 3].map(|_| free_port([127, 0, 0, 1]));
    let started = Instant::now();
    let n1 = node(&queue, "n1", seeds[0], &seeds, SECRET, "memory", &[]).await;
    eventually("n1 to consume", DRAIN, || async { n1.get("/health").await }).await;
    println!(
        "first seed consuming {:?} after start (join_timeout 1s)",
        started.elapsed()
    );
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "formed before its join timeout: {:?}",
        started.elapsed()
    );
    let status = n1.get("/cluster").await.expect("n1 answers");
    assert_eq!(status["join"], "joined", "{status}");
    assert_eq!(up_members(&status), names(&["n1"]), "{status}");
    queue.wait_drained(DRAIN).await;
    orders.assert_applied_exactly_once_in_order(&n1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_first_seed_starts_last_forms_when_it_comes_up() {
    let queue = TestQueue::new("seed-first-last");
    queue.declare().await;
    let db = TestDb::create("seed_first_last").await;
    let mut orders = Orders::new(&queue, 30);
    orders.publish(ORDERS).await;
    let seeds = [(); 3].map(|_| free_port([127, 0, 0, 1]));
    let n2 = node(&queue, "n2", seeds[1], &seeds, SECRET, &db.url(), &[]).await;
    let n3 = node(&queue, "n3", seeds[2], &seeds, SECRET, &db.url(), &[]).await;

    // n2 and n3 meet each other, but neither may form the cluster: nothing is consumed.
    eventually("n2 and n3 to meet", DRAIN, || async {
        let status = n2.get("/cluster").await?;
        let blocker = status["join_blocker"].as_str()?.to_owned();
        blocker.contains("no member is Up").then_some(())
    })
    .await;
    let last = stay_out(&[&n2, &n3], &queue, 0, ORDERS as u64).await;
    for status in &last {
        let blocker = status["join_blocker"].as_str().unwrap_or_default();
        assert!(blocker.contains("no member is Up"), "{status}");
    }

    let n1_started = Instant::now();
    let n1 = node(&queue, "n1", seeds[0], &seeds, SECRET, &db.url(), &[]).await;
    for node in [&n1, &n2, &n3] {
        eventually("all three up", DRAIN, || async {
            let status = node.get("/cluster").await?;
            let up = up_members(&status) == names(&["n1", "n2", "n3"]);
            (up && status["join"] == "joined").then_some(())
        })
        .await;
    }
    println!(
        "three nodes up {:?} after the first seed started",
        n1_started.elapsed()
    );
    queue.wait_drained(DRAIN).await;
    assert_eq!(queue.dlq_counts().await.ready, 0);
    orders
        .assert_applied_exactly_once_through(&[&n1, &n2, &n3])
        .await;
}
