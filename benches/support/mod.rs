//! What the benchmarks share: a queue filled with orders and deleted afterwards, the
//! `warren-consumer` process with its metrics, CPU time from /proc, medians, a free cluster
//! port.

#![allow(dead_code)] // each benchmark uses a different part

// The tests' own private broker and certificates, for benchmarks that need a broker of their own.
#[path = "../../tests/support/certs.rs"]
pub mod certs;
#[path = "../../tests/support/private_rabbitmq.rs"]
pub mod private_rabbitmq;
#[path = "../../tests/support/process.rs"]
pub mod process;

pub use process::{free_port, path, run};

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeleteOptions};
use lapin::types::{FieldTable, ShortString};
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;
use warren::amqp::{
    AmqpSettings, ConfirmedPublisher, OutgoingMessage, PublisherSettings, topology,
};
use warren::order::CreateOrder;

/// Consumer CPU (user + system) in seconds of process `pid`, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime are the 12th and 13th fields after the command name.
    stat_seconds(pid, 11..=12)
}

/// CPU (user + system) of process `pid` and of its children that ended, in seconds: a
/// server's connection processes end with their client, and their time then counts in the
/// parent's cutime and cstime.
pub fn cpu_seconds_with_ended_children(pid: u32) -> f64 {
    stat_seconds(pid, 11..=14)
}

/// The clock-tick fields `fields` of /proc/`pid`/stat (counted after the command name),
/// summed, in seconds (0 once the process is gone).
fn stat_seconds(pid: u32, fields: std::ops::RangeInclusive<usize>) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let values: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields
        .filter_map(|i| values.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

/// The whole machine's busy and total CPU ticks so far, from /proc/stat (idle and iowait are
/// not busy): how close a run came to using every core.
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = ticks.iter().sum();
    let idle = ticks.get(3).copied().unwrap_or(0) + ticks.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The variable `name` as a number, or `default` when unset or not a number.
pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// How long a fresh persistent backlog is left to the broker before a run: it keeps writing
/// it to disk for a while, and measuring during that would charge its background work to
/// whichever consumer runs first.
pub const SETTLE: Duration = Duration::from_secs(3);

/// Settings for a queue of this run's own, named `warren-bench-<random>`.
pub fn fresh_queue() -> AmqpSettings {
    AmqpSettings {
        queue: format!("warren-bench-{}", &Uuid::new_v4().simple().to_string()[..8]),
        ..AmqpSettings::default()
    }
}

/// [`fill`], then [`SETTLE`].
pub async fn fill_settled(amqp: &AmqpSettings, messages: usize, products: usize) {
    fill(amqp, messages, products).await;
    tokio::time::sleep(SETTLE).await;
}

/// Publishes `messages` persistent orders round-robin over `products` products, confirmed.
pub async fn fill(amqp: &AmqpSettings, messages: usize, products: usize) {
    fill_with(amqp, messages, |i| i % products).await;
}

/// Publishes `messages` persistent orders, order `i` for product `product(i)`, confirmed.
pub async fn fill_with(
    amqp: &AmqpSettings,
    messages: usize,
    mut product: impl FnMut(usize) -> usize,
) {
    let mut publisher = ConfirmedPublisher::new(PublisherSettings {
        amqp: amqp.clone(),
        max_outstanding: 2000,
        connection_name: "warren-bench-fill".into(),
    });
    for i in 0..messages {
        let order = CreateOrder {
            order_id: Uuid::new_v4().into(),
            customer_id: (i % 10_000).to_string(),
            product_id: product(i).to_string(),
            quantity: (i % 9) as u32 + 1,
            trace_context: None,
        };
        let body = serde_json::to_vec(&order).expect("order encodes");
        publisher
            .publish(OutgoingMessage {
                body,
                message_id: None,
                partition_key: order.product_id,
                traceparent: None,
            })
            .await;
    }
    publisher.flush().await;
    assert_eq!(publisher.stats().confirmed as usize, messages);
    publisher.close().await;
}

/// Deletes the queue (or its partition queues), its dead-letter queue and the exchanges.
pub async fn delete(amqp: &AmqpSettings) {
    let connection = amqp.connect("warren-bench-cleanup").await.expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let mut queues = amqp.source_queues();
    // With partitions the single queue stays declared too.
    queues.extend([amqp.queue.clone(), topology::dead_letter_queue(&amqp.queue)]);
    for queue in queues {
        let _ = channel
            .queue_delete(
                ShortString::from(queue.as_str()),
                QueueDeleteOptions::default(),
            )
            .await;
    }
    for exchange in [
        topology::dead_letter_exchange(&amqp.queue),
        warren::amqp::settings::partition_exchange(&amqp.queue),
    ] {
        let _ = channel
            .exchange_delete(ShortString::from(exchange.as_str()), Default::default())
            .await;
    }
    let _ = connection.close(200, "done".into()).await;
}

/// Fills `amqp`'s queue with `messages` orders over `products` and lets the broker settle, then
/// drains it with one node of `binary` (memory store, `args`, `env`) and deletes the queue: the
/// node's rate in msg/s and its CPU per message in µs, from process start until every message
/// was acked.
pub async fn drain_with_one_node(
    binary: &std::path::Path,
    amqp: &AmqpSettings,
    messages: usize,
    products: usize,
    args: &[&str],
    env: &[(&str, &str)],
) -> (f64, f64) {
    fill_settled(amqp, messages, products).await;
    let start = Instant::now();
    let node = Node::launch(binary, amqp, "memory", args, env).await;
    let elapsed = node.until_acked(messages, start).await;
    let cpu = node.stop().await;
    delete(amqp).await;
    (
        messages as f64 / elapsed.as_secs_f64(),
        cpu * 1e6 / messages as f64,
    )
}

/// A `warren-consumer` process of the benchmark; killed when dropped.
pub struct Node {
    child: tokio::process::Child,
    /// `http://host:port` of its endpoint.
    pub base: String,
    /// A fresh folder for the node's embedded store (so every round starts empty); dropped
    /// after `child`, so it goes once the node is killed.
    _data_dir: Option<tempfile::TempDir>,
}

impl Node {
    /// The `warren-consumer` benchmarked: `BENCH_CONSUMER`, else the release build's.
    pub fn binary() -> std::path::PathBuf {
        if let Some(path) = std::env::var_os("BENCH_CONSUMER") {
            return path.into();
        }
        let exe = std::env::current_exe().expect("bench path");
        exe.parent()
            .and_then(|deps| deps.parent())
            .map(|dir| dir.join("warren-consumer"))
            .filter(|path| path.exists())
            .expect("target/release/warren-consumer: run `cargo build --release` first (scripts/bench does)")
    }

    /// Its process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Starts the consumer on `amqp`'s queue with `store` and extra flags.
    pub async fn start(amqp: &AmqpSettings, store: &str, args: &[&str]) -> Node {
        Self::start_with_env(amqp, store, args, &[]).await
    }

    /// Like [`Self::start`], with extra environment variables.
    pub async fn start_with_env(
        amqp: &AmqpSettings,
        store: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        Self::launch(&Self::binary(), amqp, store, args, env).await
    }

    /// Like [`Self::start_with_env`], running `binary` (another build, to compare with).
    pub async fn launch(
        binary: &std::path::Path,
        amqp: &AmqpSettings,
        store: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let data_dir = (store == "embedded").then(|| {
            tempfile::Builder::new()
                .prefix("warren-bench-data-")
                .tempdir()
                .expect("a data folder")
        });
        let mut child = tokio::process::Command::new(binary)
            .args(["--queue", &amqp.queue, "--metrics-addr", "127.0.0.1:0"])
            // Only when partitioned, so that BENCH_CONSUMER may be a build without the flag.
            .args(if amqp.partitions > 1 {
                vec!["--partitions".to_owned(), amqp.partitions.to_string()]
            } else {
                Vec::new()
            })
            .args(["--entity-store", store])
            .args(args)
            // Per-order INFO lines would measure the terminal, not the bridge.
            .env("RUST_LOG", "warn")
            .env("WARREN_CLUSTER__SECRET", "warren-bench-secret-0123456789")
            .envs(env.iter().copied())
            .envs(data_dir.as_ref().map(|dir| ("WARREN_DATA_DIR", dir.path())))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("warren-consumer starts");
        let stdout = child.stdout.take().expect("stdout");
        let line = BufReader::new(stdout)
            .lines()
            .next_line()
            .await
            .expect("stdout")
            .expect("address line");
        let base = line.rsplit(' ').next().expect("address").to_owned();
        Node {
            child,
            base,
            _data_dir: data_dir,
        }
    }

    /// A page of its endpoint, empty if it does not answer.
    pub async fn get(&self, path: &str) -> String {
        let response = reqwest::get(format!("{}{path}", self.base)).await;
        match response {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    /// The value of a series, summed over the label sets that carry `series`' labels (every
    /// partition's), 0 if absent.
    pub async fn metric(&self, series: &str) -> f64 {
        warren::metrics::sum_series(&self.get("/metrics").await, series).unwrap_or(0.0)
    }

    /// Deliveries acked so far.
    pub async fn acked(&self) -> usize {
        self.metric("warren_deliveries_total{outcome=\"acked\"}")
            .await as usize
    }

    /// Polls until `messages` are acked; returns the time since `start`.
    pub async fn until_acked(&self, messages: usize, start: Instant) -> Duration {
        loop {
            if self.acked().await >= messages {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The CPU the process spent so far; then SIGTERM and wait.
    pub async fn stop(mut self) -> f64 {
        let mut cpu = 0.0;
        if let Some(pid) = self.child.id() {
            cpu = cpu_seconds(pid);
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = self.child.wait().await;
        cpu
    }
}

/// The ceiling: consume `amqp`'s queue with `prefetch`, and after each batch of ready
/// deliveries ack the last with `multiple`. Returns the time and the CPU this process spent.
pub async fn bare_consumer(amqp: AmqpSettings, messages: usize, prefetch: u16) -> (Duration, f64) {
    let connection = amqp.connect("warren-bench-ceiling").await.expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .expect("qos");
    let start = Instant::now();
    let cpu_before = cpu_seconds(std::process::id());
    let mut consumer = channel
        .basic_consume(
            ShortString::from(amqp.queue.as_str()),
            ShortString::from("bench"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut received = 0;
    while received < messages {
        let mut last = consumer.next().await.expect("stream").expect("delivery");
        received += 1;
        while let Some(Some(Ok(delivery))) = consumer.next().now_or_never() {
            last = delivery;
            received += 1;
        }
        last.acker
            .ack(BasicAckOptions { multiple: true })
            .await
            .expect("ack");
    }
    let elapsed = start.elapsed();
    let cpu = cpu_seconds(std::process::id()) - cpu_before;
    let _ = connection.close(200, "done".into()).await;
    (elapsed, cpu)
}
