//! Three `warren-consumer` processes on loopback forming one cluster, sharing a queue and a
//! PostgreSQL database: started, killed, restarted and checked through every node.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;
use warren::bridge::BridgeSettings;

use super::{Consumer, Orders, TestDb, TestQueue, eventually, free_port, message_count};

/// Node `i`'s own loopback address (127.0.0.11, .12, …).
pub fn node_ip(i: usize) -> [u8; 4] {
    [127, 0, 0, 11 + i as u8]
}

/// The node addresses 127.0.0.11… are shared by every test process on the machine, and a
/// partition cuts them by address alone: a cluster test run beside another (nextest runs test
/// binaries in parallel) would have its links cut by the other's partition. This file lock,
/// taken before the first node starts and released when the [`Cluster`] is dropped (or its
/// process dies), lets one cluster at a time use them, whatever runs the tests.
struct AddressLock(std::fs::File);

impl AddressLock {
    async fn take() -> AddressLock {
        let path = std::env::temp_dir().join("warren-test-node-addresses.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file = tokio::task::spawn_blocking(move || file.lock().map(|()| file))
            .await
            .expect("lock task")
            .unwrap_or_else(|e| panic!("locking {}: {e}", path.display()));
        AddressLock(file)
    }
}

/// Node `i`'s address, for a partition.
pub fn node_addr(i: usize) -> IpAddr {
    IpAddr::from(node_ip(i))
}

pub const SECRET: &str = "warren-test-secret-0123456789";
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];
pub const BRIDGE: &str = "amqp-bridge";
pub const ACKED: &str = "warren_deliveries_total{outcome=\"acked\"}";
pub const APPLIED: &str = "warren_orders_applied_total";
/// Orders the bridge holder's sharding producer sent again (lost, or woken).
pub const RESENDS: &str = "warren_delivery_resends_total";
pub const DRAIN: Duration = Duration::from_secs(180);
/// `--processing-delay-ms` for the kill tests: 100 products this slow drain at most 1,000
/// orders a second, so a kill after 2,000 acks leaves at least 8 s of the 10,000 to go however
/// loaded the machine is (with 20 ms, 5,000 a second, a loaded CI run once acked all 10,000
/// before the kill landed).
pub const MID_RUN_DELAY_MS: &str = "100";

/// The nodes run with the default bridge settings: at most this many orders in flight.
pub fn max_in_flight() -> f64 {
    f64::from(BridgeSettings::default().max_in_flight)
}

/// The nodes' prefetch unless a test sets its own: pinned below the default, so the bounds the
/// tests derive from it (orders redelivered or applied twice after a handover) stay as strict as
/// they were when the default was smaller.
const PREFETCH: u16 = 400;

/// The nodes' prefetch.
pub fn prefetch() -> f64 {
    f64::from(PREFETCH)
}

/// Three consumer nodes sharing a queue and a database; `nodes[i]` is `None` while node i is
/// down.
pub struct Cluster {
    /// Held while the cluster lives: the node addresses are one per machine.
    _addresses: AddressLock,
    pub queue: TestQueue,
    /// The database in the shared server, unless the test brought its own.
    pub db: Option<TestDb>,
    /// The nodes' `--entity-store`.
    pub store: String,
    pub listen: Vec<SocketAddr>,
    pub nodes: Vec<Option<Consumer>>,
    pub extra: Vec<String>,
}

impl Cluster {
    /// Starts n1 (the seed, so the oldest: it consumes), then n2 and n3, and waits until every
    /// node sees all three Up.
    pub async fn start(test: &str, extra: &[&str]) -> Cluster {
        let db = TestDb::create(&test.replace('-', "_")).await;
        let store = db.url();
        Self::start_with(TestQueue::new(test), extra, Some(db), store).await
    }

    /// Like [`Self::start`], on `queue` (maybe on a private broker), with the products in the
    /// database at `store`.
    pub async fn start_with(
        queue: TestQueue,
        extra: &[&str],
        db: Option<TestDb>,
        store: String,
    ) -> Cluster {
        let addresses = AddressLock::take().await;
        // Holding the lock, no other cluster uses these addresses: any partition rule still in
        // place was left by a run that was killed mid-partition, and would cut this cluster.
        super::partition::remove_leftovers();
        queue.declare().await;
        let mut cluster = Cluster {
            _addresses: addresses,
            queue,
            db,
            store,
            // Each node on its own loopback address, which it also dials from, so a test can cut
            // the network between nodes (see `partition`) and leave the broker reachable.
            listen: (0..NODES.len()).map(|i| free_port(node_ip(i))).collect(),
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
    pub async fn launch(&self, i: usize) -> Consumer {
        let seed = if i == 0 { 1 } else { 0 };
        let restarting = self.nodes.len() == NODES.len();
        let seeds = if i == 0 && !restarting {
            String::new()
        } else {
            self.listen[seed].to_string()
        };
        let listen = self.listen[i].to_string();
        let url = self.store.clone();
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
        let prefetch = PREFETCH.to_string();
        if !args.contains(&"--prefetch") {
            args.extend(["--prefetch", &prefetch]);
        }
        Consumer::start(&self.queue, &args).await
    }

    pub fn node(&self, i: usize) -> &Consumer {
        self.nodes[i].as_ref().expect("node is running")
    }

    pub fn running(&self) -> impl Iterator<Item = &Consumer> {
        self.nodes.iter().flatten()
    }

    /// Waits until every running node sees exactly `names` Up.
    pub async fn converged(&self, names: &[&str]) {
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
    pub async fn bridge_holder(&self) -> usize {
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
    pub async fn metric(&self, name: &str) -> f64 {
        let mut sum = 0.0;
        for node in self.running() {
            sum += node.metric(name).await;
        }
        sum
    }

    /// Waits until node `i` has acked at least `count` deliveries.
    pub async fn acked_at_least(&self, i: usize, count: f64) {
        let node = self.node(i);
        eventually(&format!("{} to ack {count}", NODES[i]), DRAIN, || async {
            (node.metric(ACKED).await >= count).then_some(())
        })
        .await;
    }

    /// SIGKILLs node `i`.
    pub async fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.kill().await;
        }
    }

    /// At most `bound` orders reached their product a second time (and were recognised).
    pub async fn assert_duplicates_at_most(&self, bound: f64) {
        let duplicates = self.metric("warren_entity_duplicates_total").await;
        assert!(
            duplicates <= bound,
            "{duplicates} orders reached their product twice"
        );
    }

    /// Only n1 consumed the queue; returns the acks per running node.
    pub async fn assert_only_n1_acked(&self) -> BTreeMap<&'static str, f64> {
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
    pub async fn assert_everything_applied_once(&self, orders: &Orders) {
        self.queue.wait_drained(DRAIN).await;
        assert_eq!(message_count(&self.queue.dlq()).await, 0, "dead letters");
        let nodes: Vec<&Consumer> = self.running().collect();
        orders.assert_applied_exactly_once_through(&nodes).await;
    }
}

/// Publishes `count` more orders in the background; returns the publisher when done.
pub fn publish_in_background(mut orders: Orders, count: usize) -> tokio::task::JoinHandle<Orders> {
    tokio::spawn(async move {
        orders.publish(count).await;
        orders
    })
}

/// Shards per node, as `node` reports them.
pub async fn shard_spread(node: &Consumer) -> Option<BTreeMap<String, Vec<u64>>> {
    let status = node.get("/cluster").await?;
    serde_json::from_value(status["shards"].clone()).ok()
}

/// Acked deliveries per node.
pub async fn acked_by_node(cluster: &Cluster) -> BTreeMap<&'static str, f64> {
    let mut acked = BTreeMap::new();
    for (name, node) in NODES.iter().zip(&cluster.nodes) {
        if let Some(node) = node {
            acked.insert(*name, node.metric(ACKED).await);
        }
    }
    acked
}

/// From now until one of `nodes` other than `killed` acks a delivery.
pub async fn takeover_time(cluster: &Cluster, killed: Instant) -> Duration {
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

/// The SIGKILL test: with 10,000 orders in flight the node that consumes the queue is killed;
/// another takes over, the killed node comes back as the youngest, and in the end every order
/// was applied exactly once (at most a prefetch redelivered) and every shard lives on one node.
/// `cluster` must run [`MID_RUN_DELAY_MS`] products, so the kill lands mid-run.
pub async fn sigkill_the_singleton_holder_mid_run(mut cluster: Cluster) {
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
