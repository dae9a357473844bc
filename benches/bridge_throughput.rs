//! End-to-end throughput of `warren-consumer` next to the ceiling measured in the same run: a
//! bare lapin consumer with the same prefetch that acks every message as it arrives, batching
//! acks the way the bridge does (one `multiple` ack per batch of ready deliveries). Measured
//! twice: one node (every product local), and three nodes on loopback (the consuming node
//! joins two shard hosts, so about two thirds of the orders cross a TCP link and back). Rounds
//! alternate so drift on a noisy machine hits all alike; medians and their ratios are printed.
//! Run with `scripts/bench` (release build, local broker).
//!
//! The broker's own speed drifts between rounds on a small machine, so each run also reports
//! the CPU time each consumer spent per message: a steadier figure for the bridge's own cost.
//!
//! `BENCH_MESSAGES` (default 50000) and `BENCH_ROUNDS` (default 7) tune it;
//! `BENCH_ENTITY_STORE` (default `memory`) is the nodes' `--entity-store`, e.g. a
//! `postgres://` URL to include storing every applied order; `BENCH_CONSUMER` runs another
//! `warren-consumer` binary (an older build, to compare commits).

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

const PREFETCH: u16 = 200;
const MAX_IN_FLIGHT: u16 = PREFETCH / 2;
const PRODUCTS: usize = 100;
const SETTLE: Duration = Duration::from_secs(3);

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let messages = env_or("BENCH_MESSAGES", 50_000);
    let rounds = env_or("BENCH_ROUNDS", 7);
    println!(
        "bridge throughput: {messages} persistent messages per run, prefetch {PREFETCH}, max in flight {MAX_IN_FLIGHT}, {PRODUCTS} products, {rounds} rounds, classic queue on the local broker"
    );
    let store = std::env::var("BENCH_ENTITY_STORE").unwrap_or_else(|_| "memory".to_owned());
    println!("entity store: {store}");
    let (mut ceiling, mut one, mut three) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ceiling_cpu, mut one_cpu, mut three_cpu) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let c = measure(messages, bare_consumer).await;
        let w = measure(messages, |amqp, n| warren_consumer(amqp, n, store.clone())).await;
        let k = measure(messages, |amqp, n| warren_cluster(amqp, n, store.clone())).await;
        println!(
            "round {round}: ceiling {:>7.0} msg/s {:>5.1} µs | 1 node {:>7.0} msg/s {:>5.1} µs ({:.2}) | 3 nodes {:>7.0} msg/s {:>5.1} µs ({:.2})",
            c.rate,
            c.cpu_per_message,
            w.rate,
            w.cpu_per_message,
            w.rate / c.rate,
            k.rate,
            k.cpu_per_message,
            k.rate / c.rate,
        );
        ceiling.push(c.rate);
        one.push(w.rate);
        three.push(k.rate);
        ceiling_cpu.push(c.cpu_per_message);
        one_cpu.push(w.cpu_per_message);
        three_cpu.push(k.cpu_per_message);
    }
    let (c, w, k) = (median(&mut ceiling), median(&mut one), median(&mut three));
    let (cc, wc, kc) = (
        median(&mut ceiling_cpu),
        median(&mut one_cpu),
        median(&mut three_cpu),
    );
    println!("median (msg/s, consumer CPU per message, ratio to the ceiling):");
    println!("  ceiling: bare lapin consumer  {c:>7.0} msg/s {cc:>5.1} µs");
    println!(
        "  warren-consumer, 1 node       {w:>7.0} msg/s {wc:>5.1} µs  {:.2} (target >= 0.8)",
        w / c
    );
    println!(
        "  warren-consumer, 3 nodes      {k:>7.0} msg/s {kc:>5.1} µs  {:.2} (target >= 0.5; CPU of all three)",
        k / c
    );
}

/// One consumer run.
struct Run {
    rate: f64,
    cpu_per_message: f64,
}

/// Consumer CPU (user + system) in seconds of process `pid`, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let after_name = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<f64>().ok()))
        .sum();
    // USER_HZ is 100 on Linux.
    ticks / 100.0
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Fills a fresh queue with `messages` orders and runs `consume` on it.
async fn measure<F, Fut>(messages: usize, consume: F) -> Run
where
    F: FnOnce(AmqpSettings, usize) -> Fut,
    Fut: std::future::Future<Output = (Duration, f64)>,
{
    let amqp = AmqpSettings {
        queue: format!("warren-bench-{}", &Uuid::new_v4().simple().to_string()[..8]),
        ..AmqpSettings::default()
    };
    fill(&amqp, messages).await;
    // The broker keeps writing a fresh persistent backlog to disk for a while; measuring
    // during that would charge its background work to whichever consumer runs first.
    tokio::time::sleep(SETTLE).await;
    let (elapsed, cpu) = consume(amqp.clone(), messages).await;
    delete(&amqp).await;
    Run {
        rate: messages as f64 / elapsed.as_secs_f64(),
        cpu_per_message: cpu * 1e6 / messages as f64,
    }
}

async fn fill(amqp: &AmqpSettings, messages: usize) {
    let mut publisher = ConfirmedPublisher::new(PublisherSettings {
        amqp: amqp.clone(),
        max_outstanding: 2000,
        connection_name: "warren-bench-fill".into(),
    });
    for i in 0..messages {
        let order = CreateOrder {
            order_id: Uuid::new_v4(),
            customer_id: (i % 10_000).to_string(),
            product_id: (i % PRODUCTS).to_string(),
            quantity: (i % 9) as u32 + 1,
        };
        let body = serde_json::to_vec(&order).expect("order encodes");
        publisher
            .publish(OutgoingMessage {
                body,
                message_id: None,
            })
            .await;
    }
    publisher.flush().await;
    assert_eq!(publisher.stats().confirmed as usize, messages);
    publisher.close().await;
}

async fn delete(amqp: &AmqpSettings) {
    let connection = amqp.connect("warren-bench-cleanup").await.expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    for queue in [amqp.queue.clone(), topology::dead_letter_queue(&amqp.queue)] {
        let _ = channel
            .queue_delete(
                ShortString::from(queue.as_str()),
                QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = channel
        .exchange_delete(
            ShortString::from(topology::dead_letter_exchange(&amqp.queue).as_str()),
            Default::default(),
        )
        .await;
    let _ = connection.close(200, "done".into()).await;
}

/// The ceiling: consume, and after each batch of ready deliveries ack the last with `multiple`.
/// Returns the time and the CPU this process spent.
async fn bare_consumer(amqp: AmqpSettings, messages: usize) -> (Duration, f64) {
    let connection = amqp.connect("warren-bench-ceiling").await.expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .basic_qos(PREFETCH, BasicQosOptions { global: false })
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

/// A `warren-consumer` process of the benchmark; killed when dropped.
struct Node {
    child: tokio::process::Child,
    base: String,
}

impl Node {
    fn binary() -> std::path::PathBuf {
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

    async fn start(amqp: &AmqpSettings, store: &str, args: &[&str]) -> Node {
        let mut child = tokio::process::Command::new(Self::binary())
            .args(["--queue", &amqp.queue, "--metrics-addr", "127.0.0.1:0"])
            .args(["--max-in-flight", &MAX_IN_FLIGHT.to_string()])
            .args(["--prefetch", &PREFETCH.to_string()])
            .args(["--entity-store", store])
            .args(args)
            // Per-order INFO lines would measure the terminal, not the bridge.
            .env("RUST_LOG", "warn")
            .env("WARREN_CLUSTER__SECRET", "warren-bench-secret-0123456789")
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
        Node { child, base }
    }

    async fn get(&self, path: &str) -> String {
        let response = reqwest::get(format!("{}{path}", self.base)).await;
        match response {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }

    async fn acked(&self) -> usize {
        let acked = "warren_deliveries_total{outcome=\"acked\"} ";
        self.get("/metrics")
            .await
            .lines()
            .find_map(|l| l.strip_prefix(acked))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as usize
    }

    /// Polls until `messages` are acked; returns the time since `start`.
    async fn until_acked(&self, messages: usize, start: Instant) -> Duration {
        loop {
            if self.acked().await >= messages {
                return start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The CPU the process spent so far; then SIGTERM and wait.
    async fn stop(mut self) -> f64 {
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

/// The real binary alone, from process start until its metrics count every message acked.
/// Returns the time and the CPU the consumer process spent.
async fn warren_consumer(amqp: AmqpSettings, messages: usize, store: String) -> (Duration, f64) {
    let start = Instant::now();
    let node = Node::start(&amqp, &store, &[]).await;
    let elapsed = node.until_acked(messages, start).await;
    (elapsed, node.stop().await)
}

/// Three nodes: two shard hosts form the cluster first (untimed), then the consuming node
/// joins them; from its process start until it acked every message. Returns the time and the
/// CPU all three spent.
async fn warren_cluster(amqp: AmqpSettings, messages: usize, store: String) -> (Duration, f64) {
    let ports: Vec<String> = (0..3).map(|_| free_port().to_string()).collect();
    let host = |i: usize, seeds: &str| {
        let id = format!("host{i}");
        let mut args = vec![
            "--node-id".to_owned(),
            id,
            "--listen".to_owned(),
            ports[i].clone(),
        ];
        args.extend(["--roles".to_owned(), "shard-host".to_owned()]);
        if !seeds.is_empty() {
            args.extend(["--seeds".to_owned(), seeds.to_owned()]);
        }
        args
    };
    let args1 = host(1, "");
    let args2 = host(2, &ports[1]);
    let first = Node::start(&amqp, &store, &refs(&args1)).await;
    let second = Node::start(&amqp, &store, &refs(&args2)).await;
    while first
        .get("/cluster")
        .await
        .matches("\"status\":\"up\"")
        .count()
        < 2
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seeds = format!("{},{}", ports[1], ports[2]);
    let args0 = [
        "--node-id",
        "consumer",
        "--listen",
        &ports[0],
        "--seeds",
        &seeds,
        "--roles",
        "shard-host,bridge",
    ];
    let start = Instant::now();
    let consumer = Node::start(&amqp, &store, &args0).await;
    let elapsed = consumer.until_acked(messages, start).await;
    let cpu = consumer.stop().await + first.stop().await + second.stop().await;
    (elapsed, cpu)
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// A port free for both TCP and UDP (a cluster port carries both).
fn free_port() -> std::net::SocketAddr {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = tcp.local_addr().expect("address");
        if std::net::UdpSocket::bind(addr).is_ok() {
            return addr;
        }
    }
}
