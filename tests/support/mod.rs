//! Support for the integration tests: a uniquely named queue that is deleted afterwards, live
//! queue counts from the broker, the real `warren-consumer` as a child process, a recording
//! publisher, and waiting for a condition with a deadline (never a bare sleep).

#![allow(dead_code)] // each test binary uses a different part

pub mod certs;
pub mod cluster;
pub mod partition;
pub mod private_postgres;
pub mod private_rabbitmq;
pub mod process;

pub use process::{die_with_the_test, free_port, path, run};

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use uuid::Uuid;
use warren::amqp::{
    AmqpSettings, ConfirmedPublisher, OutgoingMessage, PublisherSettings, topology,
};
use warren::order::{CreateOrder, OrderId};

const MANAGEMENT: &str = "http://127.0.0.1:15672/api";

/// The PostgreSQL server `scripts/test` starts, as the role it creates (allowed CREATEDB).
pub const POSTGRES: &str = "postgres://warren:warren@127.0.0.1:5432";

/// A database that exists for one test, dropped afterwards.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub async fn create(test: &str) -> Self {
        let suffix = Uuid::new_v4().simple().to_string();
        let name = format!("warren_test_{test}_{}", &suffix[..8]);
        admin(&format!("CREATE DATABASE {name}")).await;
        TestDb { name }
    }

    /// The URL a node's `--entity-store` takes.
    pub fn url(&self) -> String {
        format!("{POSTGRES}/{}", self.name)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // A plain thread with its own runtime: Drop cannot await on the test's.
        let cleanup = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(admin(&statement));
            }
        });
        let _ = cleanup.join();
    }
}

async fn admin(statement: &str) {
    let (client, connection) =
        tokio_postgres::connect(&format!("{POSTGRES}/postgres"), tokio_postgres::NoTls)
            .await
            .expect("PostgreSQL reachable (scripts/test starts it)");
    let driver = tokio::spawn(connection);
    client
        .batch_execute(statement)
        .await
        .unwrap_or_else(|e| panic!("{statement}: {e}"));
    drop(client);
    let _ = driver.await;
}

/// The members a node's `GET /cluster` page lists as Up.
pub fn up_members(status: &serde_json::Value) -> std::collections::BTreeSet<String> {
    status["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["status"] == "up")
        .filter_map(|m| m["node"].as_str().map(str::to_owned))
        .collect()
}

/// Polls `check` every 100 ms until it yields a value; panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where cargo put the workspace's binary or example `name` (next to this test's `deps`
/// folder, examples in `examples/`). Examples first: cargo never deletes a binary whose target
/// became an example, and a stale one must not be tested.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = [dir.join("examples").join(name), dir.join(name)]
        .into_iter()
        .find(|path| path.exists());
    path.unwrap_or_else(|| {
        panic!(
            "{name} is missing in {}: build the workspace and its examples first (scripts/test does)",
            dir.display()
        )
    })
}

/// Ready, unacked and consumer counts of a queue, straight from the queue process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub ready: u64,
    pub unacked: u64,
    pub consumers: u64,
}

/// A queue (with its dead-letter exchange and queue) that exists for one test.
pub struct TestQueue {
    pub name: String,
    pub queue_type: warren::amqp::QueueType,
    /// Partition queues (1: the one queue `name`).
    pub partitions: u16,
    /// A private broker's URI and node name; the shared broker when `None`.
    pub broker: Option<(String, String)>,
    /// Whether the queue is Warren's to declare, or exists already (`passive`).
    pub declare: warren::amqp::DeclareMode,
}

impl TestQueue {
    /// A fresh, unique queue name; the topology is declared by whoever connects first.
    pub fn new(test: &str) -> Self {
        let suffix = Uuid::new_v4().simple().to_string();
        TestQueue {
            name: format!("warren-test-{test}-{}", &suffix[..8]),
            queue_type: warren::amqp::QueueType::Classic,
            partitions: 1,
            broker: None,
            declare: warren::amqp::DeclareMode::All,
        }
    }

    /// Like [`Self::new`], split into `partitions` partition queues.
    pub fn partitioned(test: &str, partitions: u16) -> Self {
        let mut queue = Self::new(test);
        queue.partitions = partitions;
        queue
    }

    /// Like [`Self::new`], on a private broker.
    pub fn on(test: &str, broker: &private_rabbitmq::PrivateRabbitMq) -> Self {
        let mut queue = Self::new(test);
        queue.broker = Some((broker.uri(), broker.node.clone()));
        queue
    }

    /// Like [`Self::new`], declared as a quorum queue.
    pub fn quorum(test: &str) -> Self {
        let mut queue = Self::new(test);
        queue.queue_type = warren::amqp::QueueType::Quorum;
        queue
    }

    pub fn dlq(&self) -> String {
        topology::dead_letter_queue(&self.name)
    }

    pub fn amqp(&self) -> AmqpSettings {
        let defaults = AmqpSettings::default();
        AmqpSettings {
            uri: self
                .broker
                .as_ref()
                .map_or(defaults.uri, |(uri, _)| uri.clone()),
            queue: self.name.clone(),
            partitions: self.partitions,
            queue_type: self.queue_type,
            declare: self.declare,
            connection_name: Some(format!("{}-test", self.name)),
            ..AmqpSettings::default()
        }
    }

    /// Declares the topology now (so messages can be published before a consumer exists).
    pub async fn declare(&self) {
        let connection = self.amqp().connect("warren-test-declare").await.unwrap();
        topology::declare(&connection, &self.amqp()).await.unwrap();
        connection.close(200, "done".into()).await.unwrap();
    }

    /// Live counts from `rabbitmqctl` (the management API lags by its stats interval), summed
    /// over the partition queues.
    pub async fn counts(&self) -> QueueCounts {
        let mut sum = QueueCounts::default();
        for queue in self.amqp().source_queues() {
            let counts = counts_of(&queue, self.node()).await;
            sum.ready += counts.ready;
            sum.unacked += counts.unacked;
            sum.consumers += counts.consumers;
        }
        sum
    }

    pub async fn dlq_counts(&self) -> QueueCounts {
        counts_of(&self.dlq(), self.node()).await
    }

    /// The private broker's node name, if any.
    fn node(&self) -> Option<&str> {
        self.broker.as_ref().map(|(_, node)| node.as_str())
    }

    /// Takes every message off the dead-letter queue: its body and `x-warren-error` header.
    pub async fn take_dead_letters(&self) -> Vec<(Vec<u8>, String)> {
        let connection = self.amqp().connect("warren-test-dlq").await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        let mut letters = Vec::new();
        while let Some(message) = channel
            .basic_get(
                ShortString::from(self.dlq().as_str()),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            let reason = message
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(warren::amqp::ERROR_HEADER).cloned())
                .map(|v| match v {
                    AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            letters.push((message.delivery.data, reason));
        }
        connection.close(200, "done".into()).await.unwrap();
        letters
    }

    /// Waits until the queue is empty (nothing ready, nothing unacked). A quorum queue's counts
    /// are published on the broker's tick, so they may read zero just after a publish: wait for
    /// the consumer first.
    pub async fn wait_drained(&self, timeout: Duration) {
        eventually(&format!("{} to drain", self.name), timeout, || async {
            let counts = self.counts().await;
            (counts.ready == 0 && counts.unacked == 0).then_some(())
        })
        .await;
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        // A private broker goes with its test.
        if self.broker.is_some() {
            return;
        }
        let queue = |name: &str| format!("{MANAGEMENT}/queues/%2F/{name}");
        let exchange = |name: &str| format!("{MANAGEMENT}/exchanges/%2F/{name}");
        let mut urls: Vec<String> = self
            .amqp()
            .source_queues()
            .iter()
            .map(|q| queue(q))
            .collect();
        // With partitions the single queue stays declared too.
        urls.extend([
            queue(&self.name),
            queue(&self.dlq()),
            exchange(&topology::dead_letter_exchange(&self.name)),
            exchange(&warren::amqp::settings::partition_exchange(&self.name)),
        ]);
        // A plain thread: blocking HTTP may not run on the test's async runtime.
        let cleanup = std::thread::spawn(move || {
            let client = reqwest::blocking::Client::new();
            for url in urls {
                let _ = client.delete(url).basic_auth("guest", Some("guest")).send();
            }
        });
        let _ = cleanup.join();
    }
}

async fn counts_of(queue: &str, node: Option<&str>) -> QueueCounts {
    #[derive(Deserialize)]
    struct Row {
        name: String,
        messages_ready: u64,
        messages_unacknowledged: u64,
        consumers: u64,
    }
    let node: Vec<&str> = node.map(|n| vec!["-n", n]).unwrap_or_default();
    let output = Command::new("rabbitmqctl")
        .args(node)
        .args([
            "list_queues",
            "-q",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "--formatter",
            "json",
        ])
        .output()
        .await
        .expect("rabbitmqctl runs");
    assert!(
        output.status.success(),
        "rabbitmqctl list_queues failed: {output:?}"
    );
    let rows: Vec<Row> = serde_json::from_slice(&output.stdout).expect("rabbitmqctl json");
    // A queue that does not exist has no counts: zeros would make `wait_drained` on a wrong
    // name pass at once.
    rows.into_iter()
        .find(|row| row.name == queue)
        .map(|row| QueueCounts {
            ready: row.messages_ready,
            unacked: row.messages_unacknowledged,
            consumers: row.consumers,
        })
        .unwrap_or_else(|| panic!("queue {queue} does not exist"))
}

/// The queue's type and arguments as the broker reports them.
pub async fn queue_description(queue: &str) -> String {
    let output = Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "type",
            "arguments",
        ])
        .output()
        .await
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find(|line| line.split('\t').next() == Some(queue))
        .unwrap_or_default()
        .to_owned()
}

/// Force-closes a client connection from the broker side, found by its connection name.
pub async fn close_connection(connection_name: &str) {
    let output = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .await
        .expect("rabbitmqctl runs");
    let listing = String::from_utf8_lossy(&output.stdout);
    let needle = format!("{{\"connection_name\",\"{connection_name}\"}}");
    let pid = listing
        .lines()
        .find(|line| line.contains(&needle))
        .and_then(|line| line.split('\t').next())
        .unwrap_or_else(|| panic!("no connection named {connection_name}:\n{listing}"))
        .to_owned();
    let status = Command::new("rabbitmqctl")
        .args(["close_connection", &pid, "warren test: forced close"])
        .status()
        .await
        .expect("rabbitmqctl runs");
    assert!(status.success(), "close_connection failed");
}

/// `GET /products/{id}` (what the product keeps), and every order of its history from
/// `GET /products/{id}/orders` (what the store keeps).
#[derive(Debug, Deserialize)]
pub struct ProductView {
    pub product_id: String,
    pub total_quantity: u64,
    pub order_count: u64,
    pub recent_orders: Vec<OrderId>,
    /// Every page of `/orders`, in the order applied.
    #[serde(skip)]
    pub orders: Vec<OrderId>,
}

/// One page of `GET /products/{id}/orders`.
#[derive(Debug, Deserialize)]
pub struct OrdersPage {
    pub orders: Vec<StoredOrder>,
    pub next: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct StoredOrder {
    pub seq: u64,
    pub order_id: OrderId,
    pub quantity: u32,
}

/// A running `warren-consumer`; killed when dropped.
pub struct Consumer {
    child: Child,
    pub base: String,
    pub connection_name: String,
    pub log: PathBuf,
    http: reqwest::Client,
    /// The folder the node runs in, where its default `data_dir` (`warren-data`) lands: a
    /// fresh one per launch unless the test names one, so nodes never share a store file and a
    /// restarted node starts empty as before. Dropped after `child`, so it goes once the node
    /// is killed.
    _work_dir: Option<tempfile::TempDir>,
}

impl Consumer {
    /// Starts the real binary on `queue` with extra flags and waits until it consumes.
    pub async fn start(queue: &TestQueue, extra: &[&str]) -> Consumer {
        Self::consuming(Self::launch(queue, extra, &[]).await).await
    }

    /// Like [`Self::start`], in the working directory `dir`, which outlives the node: started
    /// again there, a node with default settings finds the products it stored.
    pub async fn start_in(dir: &std::path::Path, queue: &TestQueue, extra: &[&str]) -> Consumer {
        Self::consuming(Self::spawn(queue, extra, &[], Some(dir)).await).await
    }

    /// Returns `consumer` once it consumes; panics with its log after 30 s.
    async fn consuming(consumer: Consumer) -> Consumer {
        let ready = async {
            while consumer.get("/health").await.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .is_err()
        {
            panic!(
                "{} not consuming after 30 s; its log ends:\n{}",
                consumer.base,
                consumer.log_tail()
            );
        }
        consumer
    }

    /// Starts the real binary on `queue` with extra flags and environment variables, and
    /// returns once it serves HTTP (it may not be consuming, nor ever be).
    pub async fn launch(queue: &TestQueue, extra: &[&str], env: &[(&str, &str)]) -> Consumer {
        Self::spawn(queue, extra, env, None).await
    }

    /// Launches in `dir`, or in a fresh folder removed with the node.
    async fn spawn(
        queue: &TestQueue,
        extra: &[&str],
        env: &[(&str, &str)],
        dir: Option<&std::path::Path>,
    ) -> Consumer {
        let connection_name = format!(
            "{}-{}",
            queue.name,
            &Uuid::new_v4().simple().to_string()[..6]
        );
        let log = std::env::temp_dir().join(format!("{connection_name}.log"));
        let fresh = dir.is_none().then(|| {
            tempfile::Builder::new()
                .prefix(&format!("{connection_name}-work-"))
                .tempdir()
                .expect("the node's working directory")
        });
        let work_dir = dir
            .or(fresh.as_ref().map(tempfile::TempDir::path))
            .expect("named or fresh");
        let stderr = std::fs::File::create(&log).expect("log file");
        let queue_type = match queue.queue_type {
            warren::amqp::QueueType::Classic => "classic",
            warren::amqp::QueueType::Quorum => "quorum",
        };
        let uri = queue.amqp().uri;
        let mut command = Command::new(binary("warren-consumer"));
        command
            .args(["--uri", &uri])
            .args(["--queue", &queue.name, "--queue-type", queue_type])
            .args(["--partitions", &queue.partitions.to_string()])
            .args(match queue.declare {
                warren::amqp::DeclareMode::All => ["--declare", "all"],
                warren::amqp::DeclareMode::Passive => ["--declare", "passive"],
            })
            .args(["--metrics-addr", "127.0.0.1:0"])
            .args(["--connection-name", &connection_name])
            .args(extra)
            .current_dir(work_dir)
            .env("RUST_LOG", "info,lapin=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        die_with_the_test(command.as_std_mut());
        let mut child = command.spawn().expect("warren-consumer starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("consumer printed its address in time")
            .expect("stdout readable")
            .unwrap_or_else(|| panic!("consumer exited early; see {}", log.display()));
        let base = first
            .rsplit(' ')
            .next()
            .expect("address on the first line")
            .to_owned();
        Consumer {
            child,
            base,
            connection_name,
            log,
            http: reqwest::Client::new(),
            _work_dir: fresh,
        }
    }

    /// Waits (up to `timeout`) for the process to exit by itself; returns its status.
    pub async fn exited_within(&mut self, timeout: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("still running after {timeout:?}:\n{}", self.log_tail()))
            .expect("exit status")
    }

    /// A metric's value, summed over the series with `name`'s metric name that carry at least
    /// `name`'s labels (`warren_in_flight` sums every partition's; `…{outcome="acked"}` every
    /// partition's acked). Panics if no series matches: every series the tests read is
    /// exported from the start
    /// (plain counters and gauges at 0, labelled outcomes pre-resolved), so a missing one means
    /// a renamed metric or changed labels, which would otherwise read as 0.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("metrics unreachable ({e}); log:\n{}", self.log_tail()))
            .text()
            .await
            .expect("metrics text");
        warren::metrics::sum_series(&text, name)
            .unwrap_or_else(|| panic!("{} exports no series {name}", self.base))
    }

    /// A JSON page of the node's HTTP endpoint, or `None` if it does not answer with 200.
    pub async fn get(&self, path: &str) -> Option<serde_json::Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// The product's state, or `None` for 404.
    pub async fn product(&self, id: &str) -> Option<ProductView> {
        let response = self
            .http
            .get(format!("{}/products/{id}", self.base))
            .send()
            .await
            .unwrap_or_else(|e| panic!("products unreachable ({e}); log:\n{}", self.log_tail()));
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return None;
        }
        let status = response.status();
        let body = response.text().await.expect("product body");
        let view: Result<ProductView, _> = serde_json::from_str(&body);
        let mut view = view.unwrap_or_else(|e| panic!("product {id}: {status} {body}: {e}"));
        let mut from = Some(0);
        while let Some(page) = from {
            // Short pages, so that every test that reads orders reads across pages.
            let page = self.orders_page(id, page, 37).await;
            view.orders
                .extend(page.orders.into_iter().map(|order| order.order_id));
            from = page.next;
        }
        Some(view)
    }

    /// One page of the product's stored orders.
    pub async fn orders_page(&self, id: &str, from: u64, limit: usize) -> OrdersPage {
        let path = format!("/products/{id}/orders?from={from}&limit={limit}");
        let page = self.get(&path).await;
        let page = page.unwrap_or_else(|| panic!("{path} did not answer 200"));
        serde_json::from_value(page).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Resident memory of the process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        process::rss_kib(self.child.id().expect("running")).expect("VmRSS")
    }

    /// SIGKILL: no chance to ack or close anything.
    pub async fn kill(mut self) {
        self.child.kill().await.expect("kill");
    }

    /// SIGTERM, then wait for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("consumer exits after SIGTERM")
            .expect("exit status")
    }

    /// The consumer's log so far, for assertion messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Publishes orders and remembers, per product, the order ids in publish order and the sum of
/// their quantities.
pub struct Orders {
    publisher: ConfirmedPublisher,
    products: Vec<String>,
    next: usize,
    pub published: BTreeMap<String, Vec<(Uuid, u32)>>,
}

impl Orders {
    pub fn new(queue: &TestQueue, products: usize) -> Self {
        let publisher = ConfirmedPublisher::new(PublisherSettings {
            amqp: AmqpSettings {
                connection_name: Some(format!("{}-publisher", queue.name)),
                ..queue.amqp()
            },
            max_outstanding: 1000,
            connection_name: format!("{}-publisher", queue.name),
        });
        Orders {
            publisher,
            products: (0..products).map(|p| format!("p{p}")).collect(),
            next: 0,
            published: BTreeMap::new(),
        }
    }

    /// Publishes `count` orders round-robin over the products (quantities 1–9), confirmed.
    pub async fn publish(&mut self, count: usize) {
        self.publish_padded(count, 0).await;
    }

    /// Like [`Self::publish`], with an ignored `padding` field of `padding` bytes per message.
    pub async fn publish_padded(&mut self, count: usize, padding: usize) {
        for _ in 0..count {
            let product = self.products[self.next % self.products.len()].clone();
            let quantity = (self.next % 9) as u32 + 1;
            self.next += 1;
            let id = Uuid::new_v4();
            let order = CreateOrder {
                order_id: id.into(),
                customer_id: "c".into(),
                product_id: product.clone(),
                quantity,
                trace_context: None,
            };
            let mut json = serde_json::to_value(&order).unwrap();
            if padding > 0 {
                json["padding"] = serde_json::Value::String("x".repeat(padding));
            }
            self.published
                .entry(product.clone())
                .or_default()
                .push((id, quantity));
            self.keyed(serde_json::to_vec(&json).unwrap(), product)
                .await;
        }
        self.publisher.flush().await;
        let stats = self.publisher.stats();
        assert_eq!(stats.confirmed, stats.accepted, "every publish confirmed");
        assert_eq!(stats.returned, 0);
    }

    /// Publishes a body as is (for malformed input).
    pub async fn raw(&mut self, body: Vec<u8>) {
        self.keyed(body, String::new()).await;
    }

    /// Publishes a body with the partition key of the entity it is for.
    pub async fn keyed(&mut self, body: Vec<u8>, partition_key: String) {
        self.publisher
            .publish(OutgoingMessage {
                body,
                message_id: None,
                partition_key,
                traceparent: None,
            })
            .await;
    }

    pub async fn flush(&mut self) {
        self.publisher.flush().await;
    }

    pub fn stats(&self) -> warren::amqp::PublisherStats {
        self.publisher.stats()
    }

    pub fn total(&self) -> usize {
        self.published.values().map(Vec::len).sum()
    }

    /// Asserts that every product holds exactly what was published for it: its stored orders
    /// are the published ones in publish order (the store keeps each once by its key), and the
    /// product's own total, count and newest order ids agree (an order applied twice, or a
    /// stored one it never applied, would change them).
    pub async fn assert_applied_exactly_once_in_order(&self, consumer: &Consumer) {
        for (product, orders) in &self.published {
            let view = consumer
                .product(product)
                .await
                .unwrap_or_else(|| panic!("product {product} unknown to the consumer"));
            let expected_ids: Vec<OrderId> = orders.iter().map(|(id, _)| (*id).into()).collect();
            let expected_total: u64 = orders.iter().map(|(_, q)| u64::from(*q)).sum();
            assert_eq!(view.total_quantity, expected_total, "total of {product}");
            assert_eq!(view.order_count, orders.len() as u64, "count of {product}");
            assert_eq!(view.orders, expected_ids, "orders of {product}");
            let kept = view.recent_orders.len();
            assert!(
                kept > 0 && kept <= expected_ids.len(),
                "{kept} recent orders of {product}"
            );
            let recent = &expected_ids[expected_ids.len() - kept..];
            assert_eq!(view.recent_orders, recent, "recent orders of {product}");
        }
    }

    /// Asserts each product's total and its set of orders (order may differ after a republish
    /// or a redelivery across a reconnect).
    pub async fn assert_applied_exactly_once(&self, consumer: &Consumer) {
        self.assert_applied_exactly_once_through(&[consumer]).await;
    }

    /// Like [`Self::assert_applied_exactly_once`], asking each product through the next of
    /// `nodes` in turn (a cluster answers from wherever the product lives).
    pub async fn assert_applied_exactly_once_through(&self, nodes: &[&Consumer]) {
        for (i, (product, orders)) in self.published.iter().enumerate() {
            let node = nodes[i % nodes.len()];
            let view = node
                .product(product)
                .await
                .unwrap_or_else(|| panic!("product {product} unknown to {}", node.base));
            let mut expected_ids: Vec<OrderId> =
                orders.iter().map(|(id, _)| (*id).into()).collect();
            let mut applied = view.orders.clone();
            expected_ids.sort();
            applied.sort();
            let expected_total: u64 = orders.iter().map(|(_, q)| u64::from(*q)).sum();
            assert_eq!(view.total_quantity, expected_total, "total of {product}");
            assert_eq!(view.order_count, orders.len() as u64, "count of {product}");
            assert_eq!(applied, expected_ids, "orders of {product}");
        }
    }
}

/// Passive declare: how many messages the dead-letter queue holds (live).
pub async fn message_count(queue: &str) -> u32 {
    let connection = AmqpSettings::default()
        .connect("warren-test-count")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            ShortString::from(queue),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    connection.close(200, "done".into()).await.unwrap();
    declared.message_count()
}
