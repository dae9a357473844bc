//! Does partitioned consumption lift the cluster past one consumer? Three `warren-consumer`
//! nodes (every one a shard host with the bridge role) on one backlog: with one queue (one
//! bridge, on the oldest node) and with `--partitions 3` (one bridge per node), next to the
//! single-queue ceiling of a bare lapin consumer, in alternating rounds with medians. The
//! nodes' rate is taken over a steady window once every bridge is busy, so cluster formation
//! and shard allocation do not count; the ceiling runs from its first delivery to its last.
//! Run with `scripts/bench partitions` (release build, local broker).
//!
//! `BENCH_MESSAGES` (default 200000: enough backlog for the window), `BENCH_ROUNDS` (default
//! 5) and `BENCH_PARTITIONS` (default 3) tune it; `BENCH_CONSUMER` runs another build.

mod support;

use std::time::{Duration, Instant};

use warren::amqp::AmqpSettings;

use support::{
    Node, bare_consumer, delete, env_or, fill_settled, free_port, fresh_queue, machine_ticks,
    median,
};

const PRODUCTS: usize = 1000;
const PREFETCH: u16 = 1000;
/// From the first ack on, before the window opens: every bridge has started and filled up.
const WARM_UP: Duration = Duration::from_secs(2);
const WINDOW: Duration = Duration::from_secs(4);
const ACKED: &str = "warren_deliveries_total{outcome=\"acked\"}";

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let messages = env_or("BENCH_MESSAGES", 200_000);
    let rounds = env_or("BENCH_ROUNDS", 5);
    let partitions = env_or("BENCH_PARTITIONS", 3) as u16;
    println!(
        "partitioned consumption: {messages} persistent messages per run over {PRODUCTS} products, 3 nodes with memory state, {rounds} rounds, classic queues on the local broker"
    );
    let (mut ceiling, mut single, mut split) = (Vec::new(), Vec::new(), Vec::new());
    let (mut gains, mut busy_one, mut busy_many) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let c = {
            let amqp = fresh(1);
            fill_settled(&amqp, messages, PRODUCTS).await;
            let (elapsed, _) = bare_consumer(amqp.clone(), messages, PREFETCH).await;
            delete(&amqp).await;
            messages as f64 / elapsed.as_secs_f64()
        };
        let one = three_nodes(fresh(1), messages).await;
        let many = three_nodes(fresh(partitions), messages).await;
        println!(
            "round {round}: ceiling {c:>7.0} msg/s | 3 nodes, 1 queue {:>7.0} msg/s ({:.2}, CPU {:.0} % busy) | 3 nodes, {partitions} partitions {:>7.0} msg/s ({:.2}, CPU {:.0} % busy; {:.2}x one queue)",
            one.rate,
            one.rate / c,
            one.busy * 100.0,
            many.rate,
            many.rate / c,
            many.busy * 100.0,
            many.rate / one.rate,
        );
        ceiling.push(c);
        single.push(one.rate);
        split.push(many.rate);
        gains.push(many.rate / one.rate);
        busy_one.push(one.busy * 100.0);
        busy_many.push(many.busy * 100.0);
    }
    let (c, one, many) = (
        median(&mut ceiling),
        median(&mut single),
        median(&mut split),
    );
    println!("median (msg/s, ratio to the ceiling):");
    println!("  ceiling: bare lapin consumer, one queue  {c:>7.0}");
    println!(
        "  3 nodes, one queue                       {one:>7.0}  {:.2}  (machine CPU {:.0} % busy)",
        one / c,
        median(&mut busy_one)
    );
    println!(
        "  3 nodes, {partitions} partitions                   {many:>7.0}  {:.2}  (machine CPU {:.0} % busy)",
        many / c,
        median(&mut busy_many)
    );
    println!(
        "  partitions / one queue: {:.2}x (of the medians), {:.2}x (median of the rounds' ratios); goal > 1.3",
        many / one,
        median(&mut gains)
    );
}

/// A fresh queue name with `partitions` partitions.
fn fresh(partitions: u16) -> AmqpSettings {
    AmqpSettings {
        partitions,
        ..fresh_queue()
    }
}

/// Fills `amqp`'s queues, starts three nodes on them and measures the cluster's ack rate over
/// the window.
async fn three_nodes(amqp: AmqpSettings, messages: usize) -> Run {
    fill_settled(&amqp, messages, PRODUCTS).await;
    let ports: Vec<String> = (0..3)
        .map(|_| free_port([127, 0, 0, 1]).to_string())
        .collect();
    let prefetch = PREFETCH.to_string();
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let id = format!("node{i}");
        let mut args = vec!["--node-id", &id, "--listen", port, "--prefetch", &prefetch];
        if i > 0 {
            args.extend(["--seeds", &ports[0]]);
        }
        nodes.push(Node::start(&amqp, "memory", &args).await);
    }
    while acked(&nodes).await == 0.0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(WARM_UP).await;
    let (start, before, ticks) = (Instant::now(), acked(&nodes).await, machine_ticks());
    tokio::time::sleep(WINDOW).await;
    let (elapsed, after, ticks_after) = (start.elapsed(), acked(&nodes).await, machine_ticks());
    let busy = (ticks_after.0 - ticks.0) as f64 / (ticks_after.1 - ticks.1).max(1) as f64;
    if after >= messages as f64 {
        println!("  (the backlog ran out inside the window: raise BENCH_MESSAGES)");
    }
    for node in nodes {
        node.stop().await;
    }
    delete(&amqp).await;
    Run {
        rate: (after - before) / elapsed.as_secs_f64(),
        busy,
    }
}

/// The cluster's rate over the window, and the share of the machine's CPU that was busy.
struct Run {
    rate: f64,
    busy: f64,
}

/// Deliveries the nodes acked so far.
async fn acked(nodes: &[Node]) -> f64 {
    let mut sum = 0.0;
    for node in nodes {
        sum += node.metric(ACKED).await;
    }
    sum
}
