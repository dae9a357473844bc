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
//! `postgres://` URL or `embedded` (each node in a fresh folder) to include storing every
//! applied order; `BENCH_CONSUMER` runs another
//! `warren-consumer` binary (an older build, to compare commits).

mod support;

use std::time::{Duration, Instant};

use warren::amqp::AmqpSettings;

use support::{Node, bare_consumer, delete, env_or, fill_settled, free_port, fresh_queue, median};

const PREFETCH: u16 = 200;
const MAX_IN_FLIGHT: u16 = PREFETCH / 2;
const PRODUCTS: usize = 100;

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
        let c = measure(messages, |amqp, n| bare_consumer(amqp, n, PREFETCH)).await;
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

/// Fills a fresh queue with `messages` orders and runs `consume` on it.
async fn measure<F, Fut>(messages: usize, consume: F) -> Run
where
    F: FnOnce(AmqpSettings, usize) -> Fut,
    Fut: std::future::Future<Output = (Duration, f64)>,
{
    let amqp = fresh_queue();
    fill_settled(&amqp, messages, PRODUCTS).await;
    let (elapsed, cpu) = consume(amqp.clone(), messages).await;
    delete(&amqp).await;
    Run {
        rate: messages as f64 / elapsed.as_secs_f64(),
        cpu_per_message: cpu * 1e6 / messages as f64,
    }
}

/// The real binary alone, from process start until its metrics count every message acked.
/// Returns the time and the CPU the consumer process spent.
async fn warren_consumer(amqp: AmqpSettings, messages: usize, store: String) -> (Duration, f64) {
    let start = Instant::now();
    let node = Node::start(&amqp, &store, &refs(&with_bounds(Vec::new()))).await;
    let elapsed = node.until_acked(messages, start).await;
    (elapsed, node.stop().await)
}

/// Three nodes: two shard hosts form the cluster first (untimed), then the consuming node
/// joins them; from its process start until it acked every message. Returns the time and the
/// CPU all three spent.
async fn warren_cluster(amqp: AmqpSettings, messages: usize, store: String) -> (Duration, f64) {
    let ports: Vec<String> = (0..3)
        .map(|_| free_port([127, 0, 0, 1]).to_string())
        .collect();
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
    let first = Node::start(&amqp, &store, &refs(&with_bounds(args1))).await;
    let second = Node::start(&amqp, &store, &refs(&with_bounds(args2))).await;
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
    ]
    .map(str::to_owned)
    .to_vec();
    let start = Instant::now();
    let consumer = Node::start(&amqp, &store, &refs(&with_bounds(args0))).await;
    let elapsed = consumer.until_acked(messages, start).await;
    let cpu = consumer.stop().await + first.stop().await + second.stop().await;
    (elapsed, cpu)
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// `args` and the in-flight bound and prefetch every node of this benchmark runs with.
fn with_bounds(mut args: Vec<String>) -> Vec<String> {
    args.extend([
        "--max-in-flight".to_owned(),
        MAX_IN_FLIGHT.to_string(),
        "--prefetch".to_owned(),
        PREFETCH.to_string(),
    ]);
    args
}
