//! The bridge on a real cluster: three `warren-consumer` processes on loopback, one RabbitMQ
//! queue, products stored in a real PostgreSQL database. The oldest node consumes the queue (a
//! singleton) and routes every order to its product on whichever node hosts its shard. These
//! tests kill and stop nodes mid-run and then check, through the broker and through every
//! node, that nothing was lost and nothing applied twice.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use support::{Consumer, Orders, TestDb, TestQueue, eventually, free_port, message_count};
use warren::bridge::BridgeSettings;

const SECRET: &str = "warren-test-secret-0123456789";
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const BRIDGE: &str = "amqp-bridge";
const ACKED: &str = "warren_deliveries_total{outcome=\"acked\"}";
const APPLIED: &str = "warren_orders_applied_total";
/// Orders the bridge holder's sharding producer sent again (lost, or woken).
const RESENDS: &str = "warren_delivery_resends_total";
const DRAIN: Duration = Duration::from_secs(180);

/// The nodes run with the default bridge settings: at most this many orders in flight.
fn max_in_flight() -> f64 {
    f64::from(BridgeSettings::default().max_in_flight)
}

/// The nodes' prefetch (by default twice what may be in flight).
fn prefetch() -> f64 {
    f64::from(BridgeSettings::default().effective_prefetch())
}

/// Three consumer nodes sharing a queue and a database; `nodes[i]` is `None` while node i is
/// down.
struct Cluster {
    queue: TestQueue,
    db: TestDb,
    listen: Vec<SocketAddr>,
    nodes: Vec<Option<Consumer>>,
    extra: Vec<String>,
}

impl Cluster {
    /// Starts n1 (the seed, so the oldest: it consumes), then n2 and n3, and waits until every
    /// node sees all three Up.
    async fn start(test: &str, extra: &[&str]) -> Cluster {
        let queue = TestQueue::new(test);
        queue.declare().await;
        let db = TestDb::create(&test.replace('-', "_")).await;
        let mut cluster = Cluster {
            queue,
            db,
            listen: NODES.iter().map(|_| free_port([127, 0, 0, 1])).collect(),
            nodes: Vec::new(),
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
        };
        for i in 0..NODES.len() {
            let node = cluster.launch(i).await;
            cluster.nodes.push(Some(node));
        }
        cluster.converged(&NODES).await;
        cluster
    }

    /// Starts node `i` (again): n1 alone forms the cluster, the others join through n1 (or
    /// through n2 when n1 is the one restarting).
    async fn launch(&self, i: usize) -> Consumer {
        let seed = if i == 0 { 1 } else { 0 };
        let restarting = self.nodes.len() == NODES.len();
        let seeds = if i == 0 && !restarting {
            String::new()
        } else {
            self.listen[seed].to_string()
        };
        let listen = self.listen[i].to_string();
        let url = self.db.url();
        let mut args = vec![
            "--node-id",
            NODES[i],
            "--listen",
            &listen,
            "--cluster-secret",
            SECRET,
            "--entity-store",
            &url,
        ];
        if !seeds.is_empty() {
            args.extend(["--seeds", &seeds]);
        }
        args.extend(self.extra.iter().map(String::as_str));
        Consumer::start(&self.queue, &args).await
    }

    fn node(&self, i: usize) -> &Consumer {
        self.nodes[i].as_ref().expect("node is running")
    }

    fn running(&self) -> impl Iterator<Item = &Consumer> {
        self.nodes.iter().flatten()
    }

    /// Waits until every running node sees exactly `names` Up.
    async fn converged(&self, names: &[&str]) {
        let mut want: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        want.sort();
        for node in self.running() {
            eventually("the nodes to agree on who is up", DRAIN, || async {
                let status = node.get("/cluster").await?;
                let mut up: Vec<String> = status["members"]
                    .as_array()?
                    .iter()
                    .filter(|m| m["status"] == "up")
                    .filter_map(|m| m["node"].as_str().map(str::to_owned))
                    .collect();
                up.sort();
                (up == want).then_some(())
            })
            .await;
        }
    }

    /// Which node every running node says consumes the queue, once they agree.
    async fn bridge_holder(&self) -> usize {
        eventually("the nodes to agree on the bridge's node", DRAIN, || async {
            let mut holders = Vec::new();
            for node in self.running() {
                let status = node.get("/cluster").await?;
                holders.push(status["singletons"][BRIDGE].as_str()?.to_owned());
            }
            holders.dedup();
            match holders.as_slice() {
                [one] => NODES.iter().position(|n| n == one),
                _ => None,
            }
        })
        .await
    }

    /// Sum of a metric over the running nodes.
    async fn metric(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for node in self.running() {
            sum += node.metric(name).await;
        }
        sum
    }

    /// Waits until node `i` has acked at least `count` deliveries.
    async fn acked_at_least(&self, i: usize, count: f64) {
        let node = self.node(i);
        eventually(&format!("{} to ack {count}", NODES[i]), DRAIN, || async {
            (node.metric(ACKED).await >= count).then_some(())
        })
        .await;
    }

    /// SIGKILLs node `i`.
    async fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.kill().await;
        }
    }

    /// At most `bound` orders reached their product a second time (and were recognised).
    async fn assert_duplicates_at_most(&self, bound: f64) {
        let duplicates = self.metric("warren_entity_duplicates_total").await;
        assert!(
            duplicates <= bound,
            "{duplicates} orders reached their product twice"
        );
    }

    /// Only n1 consumed the queue; returns the acks per running node.
    async fn assert_only_n1_acked(&self) -> BTreeMap<&'static str, f64> {
        let acked = acked_by_node(self).await;
        let elsewhere: f64 = acked
            .iter()
            .filter(|(n, _)| **n != "n1")
            .map(|(_, a)| a)
            .sum();
        assert_eq!(elsewhere, 0.0, "only n1 consumes: {acked:?}");
        acked
    }

    /// Waits until the queue is empty, nothing was dead-lettered, and every product (asked
    /// through each node in turn) holds exactly the orders published for it.
    async fn assert_everything_applied_once(&self, orders: &Orders) {
        self.queue.wait_drained(DRAIN).await;
        assert_eq!(message_count(&self.queue.dlq()).await, 0, "dead letters");
        let nodes: Vec<&Consumer> = self.running().collect();
        orders.assert_applied_exactly_once_through(&nodes).await;
    }
}

/// Publishes `count` more orders in the background; returns the publisher when done.
fn publish_in_background(mut orders: Orders, count: usize) -> tokio::task::JoinHandle<Orders> {
    tokio::spawn(async move {
        orders.publish(count).await;
        orders
    })
}

/// Shards per node, as `node` reports them.
async fn shard_spread(node: &Consumer) -> Option<BTreeMap<String, Vec<u64>>> {
    let status = node.get("/cluster").await?;
    serde_json::from_value(status["shards"].clone()).ok()
}

/// Acked deliveries per node.
async fn acked_by_node(cluster: &Cluster) -> BTreeMap<&'static str, f64> {
    let mut acked = BTreeMap::new();
    for (name, node) in NODES.iter().zip(&cluster.nodes) {
        if let Some(node) = node {
            acked.insert(*name, node.metric(ACKED).await);
        }
    }
    acked
}

/// From now until one of `nodes` other than `killed` acks a delivery.
async fn takeover_time(cluster: &Cluster, killed: Instant) -> Duration {
    eventually("another node to ack", DRAIN, || async {
        for node in cluster.running() {
            if node.metric(ACKED).await > 0.0 {
                return Some(killed.elapsed());
            }
        }
        None
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_singleton_holder_sigkilled_mid_run_loses_nothing_and_applies_nothing_twice() {
    // 20 ms products keep the 10,000 orders going for seconds, so the kill lands mid-run.
    let mut cluster = Cluster::start("kill-singleton", &["--processing-delay-ms", "20"]).await;
    assert_eq!(cluster.bridge_holder().await, 0, "the oldest node consumes");
    let mut orders = Orders::new(&cluster.queue, 100);
    orders.publish(10_000).await;
    cluster.acked_at_least(0, 2_000.0).await;
    assert!(
        cluster.node(0).metric(ACKED).await < 10_000.0,
        "the kill must come mid-run"
    );

    cluster.kill(0).await;
    let killed = Instant::now();
    let publishing = publish_in_background(orders, 20_000);
    let takeover = takeover_time(&cluster, killed).await;
    eprintln!(
        "singleton takeover after SIGKILL: {takeover:?} (kill → first ack by the new holder)"
    );
    let new_holder = cluster.bridge_holder().await;
    assert_ne!(new_holder, 0);

    // Back later, as the youngest node: it hosts shards but does not take the queue back.
    let orders = publishing.await.expect("publishing finished");
    cluster.nodes[0] = Some(cluster.launch(0).await);
    cluster.converged(&NODES).await;
    assert_eq!(cluster.bridge_holder().await, new_holder);
    cluster.assert_everything_applied_once(&orders).await;
    assert_eq!(orders.total(), 30_000);
    // Only what n1 had applied and not yet acked came back: at most a prefetch.
    cluster.assert_duplicates_at_most(prefetch()).await;

    // Any node tells where every shard is: each on one node, the killed node's elsewhere now.
    // Shards may still move (n1 is back), so two answers in a row must agree.
    let spread = eventually("n2 to report three nodes' shards", DRAIN, || async {
        let first = shard_spread(cluster.node(1)).await?;
        let second = shard_spread(cluster.node(1)).await?;
        (first.len() == 3 && first == second).then_some(first)
    })
    .await;
    let mut all: Vec<u64> = spread.values().flatten().copied().collect();
    let hosted = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), hosted, "a shard on two nodes: {spread:?}");
    assert!(hosted > 0, "{spread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_host_sigkilled_mid_run_loses_nothing_and_applies_nothing_twice() {
    // 20 ms products keep the 10,000 orders going for seconds, so the kill lands mid-run.
    let mut cluster = Cluster::start("kill-host", &["--processing-delay-ms", "20"]).await;
    assert_eq!(cluster.bridge_holder().await, 0);
    let mut orders = Orders::new(&cluster.queue, 100);
    orders.publish(10_000).await;
    // n3 holds some products' shards and is working on them when it dies.
    eventually("n3 to host products and apply orders", DRAIN, || async {
        let status = cluster.node(2).get("/cluster").await?;
        let applied = cluster.node(2).metric(APPLIED).await;
        (status["entities_here"].as_u64()? > 0 && applied > 0.0).then_some(())
    })
    .await;
    cluster.acked_at_least(0, 2_000.0).await;
    let resent_before = cluster.node(0).metric(RESENDS).await;
    cluster.kill(2).await;
    assert!(
        cluster.node(0).metric(ACKED).await < 10_000.0,
        "the kill must come mid-run"
    );
    let publishing = publish_in_background(orders, 20_000);
    // What n3 held unconfirmed is sent again, to the products' new homes, before n3 is back.
    cluster.converged(&NODES[..2]).await;
    let resent = eventually("n1 to resend what n3 held", DRAIN, || async {
        let resent = cluster.node(0).metric(RESENDS).await;
        (resent > resent_before).then_some(resent)
    })
    .await;
    eprintln!(
        "after the SIGKILL of n3: {} orders resent",
        resent - resent_before
    );
    let orders = publishing.await.expect("publishing finished");
    cluster.nodes[2] = Some(cluster.launch(2).await);
    cluster.converged(&NODES).await;
    cluster.assert_everything_applied_once(&orders).await;
    // The products' new homes had loaded what n3 stored: at most what was in flight came
    // twice.
    cluster.assert_duplicates_at_most(max_in_flight()).await;
    let acked = cluster.assert_only_n1_acked().await;
    assert_eq!(acked["n1"], 30_000.0, "{acked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_of_the_singleton_holder_hands_over_without_a_second_redelivery() {
    // A SIGTERM stops the bridge only once the node has announced it is leaving (about a
    // second): 20 ms products and 20,000 orders keep work in the queue past that (1 and 5 ms
    // products finished everything in between once settled deliveries stopped holding
    // in-flight slots).
    let mut cluster = Cluster::start("stop-singleton", &["--processing-delay-ms", "20"]).await;
    assert_eq!(cluster.bridge_holder().await, 0);
    let mut orders = Orders::new(&cluster.queue, 100);
    orders.publish(20_000).await;
    cluster.acked_at_least(0, 1_000.0).await;
    assert!(
        cluster.node(0).metric(ACKED).await < 20_000.0,
        "the stop must come mid-run"
    );

    let holder = cluster.nodes[0].take().expect("n1 runs");
    let stopped = Instant::now();
    let status = holder.terminate().await;
    eprintln!(
        "graceful stop of the singleton holder took {:?}",
        stopped.elapsed()
    );
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    let new_holder = cluster.bridge_holder().await;
    assert_ne!(new_holder, 0);
    cluster.assert_everything_applied_once(&orders).await;
    // n1 stopped with work left: the new holder took over the rest of the queue.
    let taken_over = cluster.node(new_holder).metric(ACKED).await;
    assert!(taken_over > 0.0, "the new holder acked nothing");

    // Only deliveries the broker had pushed and the bridge had not taken went back, once,
    // when n1 closed its channel: what it had taken was finished and acked first, so no
    // order reached a product twice.
    let redelivered = cluster.metric("warren_redelivered_total").await;
    let duplicates = cluster.metric("warren_entity_duplicates_total").await;
    eprintln!(
        "after the handover: {taken_over} acked by the new holder, {redelivered} redelivered, \
         {duplicates} duplicates"
    );
    assert!(
        redelivered <= prefetch(),
        "{redelivered} redelivered, more than one prefetch"
    );
    assert_eq!(duplicates, 0.0, "an order reached its product twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_waits_in_the_broker_while_slow_products_on_three_nodes_work() {
    // 50 ms per order and 25 in flight: at most 500 orders a second leave the backlog, whatever
    // the machine's load (in-flight work is what is with the products). Publishing the 20,000
    // runs at 1,000-3,000 a second here, so 10,000 or more stay ready after it, for 10 s of
    // sampling at 500 a second (a sample takes about a second: rabbitmqctl), and they drain in
    // 40 s or more. (At 50 in flight a CI run published slower than the bridge drained.)
    const IN_FLIGHT: &str = "25";
    const PREFETCH: u64 = 100;
    let cluster = Cluster::start(
        "cluster-backpressure",
        &[
            "--processing-delay-ms",
            "50",
            "--max-in-flight",
            IN_FLIGHT,
            "--prefetch",
            &PREFETCH.to_string(),
        ],
    )
    .await;
    let mut orders = Orders::new(&cluster.queue, 100);
    // Warmed up before the backlog arrives (waiting for it with the backlog already there let
    // a fast bridge drain it first): every product has run and every node hosts some.
    orders.publish(300).await;
    cluster.acked_at_least(0, 300.0).await;
    for (name, node) in NODES.iter().zip(cluster.running()) {
        eventually(&format!("{name} to host products"), DRAIN, || async {
            let status = node.get("/cluster").await?;
            (status["entities_here"].as_u64()? > 0).then_some(())
        })
        .await;
    }
    // 3 KiB of padding each: pulled into the nodes, 20,000 would add ~60 MiB.
    orders.publish_padded(20_000, 3 * 1024).await;
    let baseline: Vec<u64> = cluster.running().map(Consumer::rss_kib).collect();
    let mut peak = baseline.clone();
    let mut max_unacked = 0;
    let until = Instant::now() + Duration::from_secs(10);
    let mut samples = 0;
    // A sample every half second: each asks rabbitmqctl, which costs a core for a moment.
    // Sampled while the backlog lasts, for 10 s at most.
    let mut every = tokio::time::interval(Duration::from_millis(500));
    while Instant::now() < until {
        every.tick().await;
        let counts = cluster.queue.counts().await;
        max_unacked = max_unacked.max(counts.unacked);
        if counts.ready < 5_000 {
            break;
        }
        for (peak, node) in peak.iter_mut().zip(cluster.running()) {
            *peak = (*peak).max(node.rss_kib());
        }
        samples += 1;
    }
    let acked = cluster.metric(ACKED).await;
    eprintln!(
        "backpressure on 3 nodes: {samples} samples, max unacked {max_unacked}, {acked} acked, rss KiB {baseline:?} → peak {peak:?}"
    );
    assert!(
        samples >= 5,
        "the backlog must wait in the broker while sampled"
    );
    assert!(
        max_unacked <= PREFETCH,
        "broker unacked {max_unacked} exceeded the prefetch {PREFETCH}"
    );
    for ((node, before), after) in NODES.iter().zip(&baseline).zip(&peak) {
        let growth_mib = (*after as f64 - *before as f64) / 1024.0;
        assert!(
            growth_mib < 16.0,
            "{node} grew by {growth_mib:.1} MiB while a 60 MiB backlog waited"
        );
    }
    // The backlog drains, each order applied once, by the products wherever they live.
    cluster.assert_everything_applied_once(&orders).await;
    let acked = cluster.assert_only_n1_acked().await;
    assert_eq!(acked["n1"], 20_300.0, "{acked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_closed_broker_connection_on_the_cluster_resumes_and_loses_nothing() {
    // 20 ms per order and 20 in flight: about 1,000 orders a second at best, so the 20,000
    // outlast publishing them and the seconds rabbitmqctl takes to find and close the
    // connection (at 100 in flight a CI run drained them first).
    const PREFETCH: f64 = 80.0;
    let cluster = Cluster::start(
        "cluster-connection-loss",
        &[
            "--processing-delay-ms",
            "20",
            "--max-in-flight",
            "20",
            "--prefetch",
            "80",
        ],
    )
    .await;
    let mut orders = Orders::new(&cluster.queue, 100);
    orders.publish(20_000).await;
    cluster.acked_at_least(0, 1_000.0).await;
    support::close_connection(&cluster.node(0).connection_name).await;
    assert!(
        cluster.node(0).metric(ACKED).await < 19_000.0,
        "closed mid-run"
    );
    eventually("n1 to reconnect", DRAIN, || async {
        (cluster.node(0).metric("warren_amqp_reconnects_total").await >= 1.0).then_some(())
    })
    .await;
    cluster.assert_everything_applied_once(&orders).await;
    cluster.assert_duplicates_at_most(PREFETCH).await;
    cluster.assert_only_n1_acked().await;
}
