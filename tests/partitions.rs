//! Partitioned consumption on a real broker: `--partitions N` turns the queue into N partition
//! queues fed by a consistent-hash exchange keyed on the product, each consumed by its own
//! bridge singleton, spread over the nodes. These tests check the routing (one product, one
//! partition) with the real producer binary, the refusal of a partition count the broker's
//! topology was not declared with, and, on three `warren-consumer` processes, that every
//! product gets its orders exactly once and in publish order while the broker shows at most one
//! consumer per partition queue, also across a SIGKILL of a consuming node.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use lapin::options::BasicGetOptions;
use lapin::types::ShortString;
use serde::Deserialize;
use tokio::process::Command;

use support::cluster::{ACKED, Cluster, DRAIN, NODES, publish_in_background};
use support::{Consumer, Orders, TestDb, TestQueue, binary, eventually, message_count};
use warren::bridge_singleton_name;
use warren::order::CreateOrder;

const PARTITIONS: u16 = 3;

/// Orders the broker holds (ready or unacked) at least when a consuming node is killed.
const IN_HAND: u64 = 1_000;

#[tokio::test]
async fn the_producer_binary_sends_every_order_of_a_product_to_one_partition() {
    let queue = TestQueue::partitioned("partition-routing", PARTITIONS);
    let products: Vec<String> = (0..30).map(|p| format!("product-{p}")).collect();
    let output = Command::new(binary("warren-producer"))
        .args(["--queue", &queue.name, "--partitions", "3"])
        .args(["--count", "900", "--rate", "0", "--products"])
        .arg(products.join(","))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("900 confirmed, 0 returned"), "{stdout}");

    // Take every message off every partition queue: which partitions each product went to.
    let connection = queue.amqp().connect("warren-test-drain").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut partitions_of: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut per_partition = BTreeMap::new();
    for partition in queue.amqp().source_queues() {
        let mut count = 0;
        while let Some(message) = channel
            .basic_get(
                ShortString::from(partition.as_str()),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            let order: CreateOrder = serde_json::from_slice(&message.delivery.data).unwrap();
            partitions_of
                .entry(order.product_id)
                .or_default()
                .insert(partition.clone());
            count += 1;
        }
        per_partition.insert(partition, count);
    }
    connection.close(200, "done".into()).await.unwrap();
    assert_eq!(
        per_partition.values().sum::<u32>(),
        900,
        "{per_partition:?}"
    );
    assert!(
        per_partition.values().all(|&count| count > 0),
        "30 products reach every partition: {per_partition:?}"
    );
    for (product, partitions) in &partitions_of {
        assert_eq!(partitions.len(), 1, "{product} in {partitions:?}");
    }
}

#[tokio::test]
async fn a_partition_count_other_than_the_declared_one_is_refused_by_both_binaries() {
    let queue = TestQueue::partitioned("partition-mismatch", PARTITIONS);
    queue.declare().await;
    let mut orders = Orders::new(&queue, 5);
    orders.publish(30).await;
    for partitions in ["1", "2", "4"] {
        let stderr = refused_producer(&queue.name, partitions).await;
        assert!(
            stderr.contains("another partition count than amqp.partitions"),
            "--partitions {partitions}: {stderr}"
        );
    }
    // Nothing was published, and no queue of another layout was created.
    assert_eq!(queue.counts().await.ready, 30);
    let queues = queue_names().await;
    assert!(
        !queues.contains(&format!("{}.p3", queue.name)),
        "{queues:?}"
    );

    // The consumer keeps refusing (and says why) rather than consuming a subset.
    let wrong = TestQueue {
        name: queue.name.clone(),
        partitions: 2,
        queue_type: queue.queue_type,
        broker: None,
        declare: queue.declare,
    };
    let consumer = Consumer::launch(&wrong, &[], &[]).await;
    eventually("the consumer to refuse the topology", DRAIN, || async {
        consumer
            .log_tail()
            .contains("another partition count than amqp.partitions = 2")
            .then_some(())
    })
    .await;
    assert_eq!(queue.counts().await.ready, 30, "nothing was consumed");
}

#[tokio::test]
async fn a_backlog_in_the_queue_from_before_it_was_partitioned_is_refused() {
    // The layout of a version without partitions: the single queue, holding orders, and no
    // partition exchange.
    let queue = TestQueue::new("partition-upgrade");
    queue.declare().await;
    Orders::new(&queue, 5).publish(10).await;
    reqwest::Client::new()
        .delete(format!(
            "http://127.0.0.1:15672/api/exchanges/%2F/{}.partitions",
            queue.name
        ))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();

    let stderr = refused_producer(&queue.name, "3").await;
    assert!(
        stderr.contains(&format!(
            "the unpartitioned queue `{}` holds 10 messages",
            queue.name
        )),
        "{stderr}"
    );
    assert_eq!(queue.counts().await.ready, 10, "the backlog is untouched");
}

#[tokio::test]
async fn partition_queues_hold_the_hash_buckets_a_restarted_broker_gives_them() {
    // A restarted broker rebuilds the consistent-hash ring from the exchange's bindings sorted
    // by queue name (p0, p1, p10, p11, p2, …); had the first declaration bound them in another
    // order, a restart would move entities between partitions.
    let queue = TestQueue::partitioned("partition-ring", 12);
    queue.declare().await;
    let output = Command::new("rabbitmq-diagnostics")
        .args(["consistent_hash_exchange_ring_state", "-p", "/"])
        .arg(warren::amqp::settings::partition_exchange(&queue.name))
        .output()
        .await
        .expect("rabbitmq-diagnostics runs");
    let text = String::from_utf8_lossy(&output.stdout);
    // Lines read "Ring index: 4, queue: '<name>.p2'".
    let mut ring: Vec<(usize, String)> = text
        .lines()
        .filter_map(|line| {
            let (index, queue) = line.strip_prefix("Ring index: ")?.split_once(", queue: ")?;
            Some((index.parse().ok()?, queue.trim_matches('\'').to_owned()))
        })
        .collect();
    ring.sort();
    let mut by_name = queue.amqp().source_queues();
    by_name.sort();
    let expected: Vec<(usize, String)> = by_name.into_iter().enumerate().collect();
    assert_eq!(ring, expected, "{text}");
}

/// Runs warren-producer on `queue` with `--partitions partitions`, which must fail; its stderr.
async fn refused_producer(queue: &str, partitions: &str) -> String {
    let output = Command::new(binary("warren-producer"))
        .args(["--queue", queue, "--partitions", partitions])
        .args(["--count", "10", "--rate", "0"])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success(), "--partitions {partitions} ran");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every queue on the shared broker.
async fn queue_names() -> Vec<String> {
    let output = Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name"])
        .output()
        .await
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Which node every running node says holds each partition's bridge, once they all agree and
/// every bridge is held.
async fn bridge_holders(cluster: &Cluster) -> BTreeMap<u16, String> {
    eventually(
        "the nodes to agree on every bridge's node",
        DRAIN,
        || async {
            let mut seen = Vec::new();
            for node in cluster.running() {
                let status = node.get("/cluster").await?;
                let mut holders = BTreeMap::new();
                for partition in 0..PARTITIONS {
                    let name = bridge_singleton_name(PARTITIONS, partition);
                    holders.insert(partition, status["singletons"][&name].as_str()?.to_owned());
                }
                seen.push(holders);
            }
            seen.dedup();
            (seen.len() == 1).then(|| seen.remove(0))
        },
    )
    .await
}

#[derive(Deserialize)]
struct ConsumerRow {
    queue_name: String,
    consumer_tag: String,
}

/// Samples the broker's consumers of `queues` until `stop`: the most any queue had at once,
/// and every connection (a consumer tag without its session number) seen per queue.
async fn watch_consumers(
    queues: Vec<String>,
    stop: Arc<AtomicBool>,
) -> (usize, BTreeMap<String, BTreeSet<String>>) {
    let (mut most, mut connections) = (0, BTreeMap::<String, BTreeSet<String>>::new());
    while !stop.load(Ordering::Relaxed) {
        // Each sample starts an Erlang VM: leave the two cores to the broker and the nodes.
        tokio::time::sleep(SAMPLE_PAUSE).await;
        let output = Command::new("rabbitmqctl")
            .args(["list_consumers", "-q", "queue_name", "consumer_tag"])
            .args(["--formatter", "json"])
            .output()
            .await
            .expect("rabbitmqctl runs");
        let Ok(rows) = serde_json::from_slice::<Vec<ConsumerRow>>(&output.stdout) else {
            continue;
        };
        let mut now: BTreeMap<&str, usize> = BTreeMap::new();
        for row in rows.iter().filter(|r| queues.contains(&r.queue_name)) {
            *now.entry(row.queue_name.as_str()).or_default() += 1;
            let connection = row
                .consumer_tag
                .rsplit_once('-')
                .map_or(row.consumer_tag.as_str(), |(connection, _session)| {
                    connection
                });
            connections
                .entry(row.queue_name.clone())
                .or_default()
                .insert(connection.to_owned());
        }
        most = most.max(now.values().copied().max().unwrap_or(0));
    }
    (most, connections)
}

/// Between two samples of the broker's consumers.
const SAMPLE_PAUSE: std::time::Duration = std::time::Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_consume_three_partitions_in_order_and_take_over_a_killed_nodes_partition() {
    let queue = TestQueue::partitioned("partitions-cluster", PARTITIONS);
    let db = TestDb::create("partitions_cluster").await;
    let store = db.url();
    // 60 products of 50 ms drain at most 1,200 orders a second, well below what the publisher
    // confirms, so a backlog builds and the kill lands on work in hand.
    let extra = ["--processing-delay-ms", "50"];
    let mut cluster = Cluster::start_with(queue, &extra, Some(db), store).await;

    // Partition i runs on the i-th oldest node: all three consume.
    let holders = bridge_holders(&cluster).await;
    let consuming: BTreeSet<&String> = holders.values().collect();
    assert_eq!(consuming.len(), 3, "one partition per node: {holders:?}");

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_consumers(
        cluster.queue.amqp().source_queues(),
        Arc::clone(&stop),
    ));
    let publishing = publish_in_background(Orders::new(&cluster.queue, 60), 12_000);
    let in_hand = eventually("every node acking, with a backlog", DRAIN, || async {
        for node in cluster.running() {
            if node.metric(ACKED).await < 50.0 {
                return None;
            }
        }
        let counts = cluster.queue.counts().await;
        (counts.ready + counts.unacked >= IN_HAND).then_some(counts)
    })
    .await;

    // SIGKILL the node holding partition 1; the survivors take every partition.
    let victim = NODES
        .iter()
        .position(|n| *n == holders[&1])
        .expect("a known node");
    cluster.kill(victim).await;
    let survivors: Vec<&str> = NODES
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| *n)
        .collect();
    cluster.converged(&survivors).await;
    let orders = publishing.await.expect("publishing finished");
    let after = bridge_holders(&cluster).await;
    eprintln!(
        "partitions before the kill {holders:?}, after {after:?}; {} ready and {} unacked at the kill",
        in_hand.ready, in_hand.unacked
    );
    assert!(
        after
            .values()
            .all(|node| survivors.contains(&node.as_str())),
        "survivors hold every partition: {after:?}"
    );
    assert_ne!(after[&1], holders[&1], "partition 1 moved");

    cluster.queue.wait_drained(DRAIN).await;
    stop.store(true, Ordering::Relaxed);
    let (most, connections) = watcher.await.expect("watcher");
    assert_eq!(message_count(&cluster.queue.dlq()).await, 0, "dead letters");
    let node = cluster.running().next().expect("a survivor");
    orders.assert_applied_exactly_once_in_order(node).await;
    assert_eq!(orders.total(), 12_000);
    assert_eq!(
        most, 1,
        "a partition queue had two consumers at once: {connections:?}"
    );
    let p1 = &cluster.queue.amqp().source_queues()[1];
    assert!(
        connections.get(p1).is_some_and(|c| c.len() >= 2),
        "partition 1 was consumed by two nodes' connections, before and after the kill: {connections:?}"
    );
}
