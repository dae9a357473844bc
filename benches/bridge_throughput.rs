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
//! It reports the broker's too (every `beam.smp` of the machine), and the rate the CPU of
//! consumer, broker and PostgreSQL together allows with every core busy (`cpu-bound`, as a
//! ratio to the ceiling): on a machine where they share few cores, no ratio can pass it.
//!
//! `BENCH_MESSAGES` (default 50000), `BENCH_ROUNDS` (default 7) and `BENCH_MAX_IN_FLIGHT`
//! (default 100; the prefetch, the ceiling's too, is twice it) tune it;
//! `BENCH_ENTITY_STORES` (default `memory`; `BENCH_ENTITY_STORE` is read too) is a
//! comma-separated list of the nodes' `--entity-store`s, each measured in every round next to
//! the same ceiling: e.g. `postgres://…,embedded` (embedded: each node in a fresh folder) to
//! include storing every applied order. With PostgreSQL each run also reports the CPU all
//! `postgres` processes of the machine spent per message. Three nodes run for every store but
//! `embedded` (three files of their own are no deployment: a product that moves starts empty).
//! `BENCH_CONSUMER` runs another `warren-consumer` binary (an older build, to compare commits).

mod support;

use std::time::{Duration, Instant};

use warren::amqp::AmqpSettings;

use support::{
    Node, bare_consumer, cpu_seconds_with_ended_children, delete, env_or, fill_settled, free_port,
    fresh_queue, median,
};

/// The nodes' in-flight bound unless `BENCH_MAX_IN_FLIGHT` names one; the prefetch (the
/// ceiling's too) is twice the bound, as the bridge's default.
const MAX_IN_FLIGHT: u16 = 100;
const PRODUCTS: usize = 100;

/// One measured configuration: a store and a cluster size, or the ceiling.
struct Series {
    name: String,
    store: Option<String>,
    nodes: usize,
    runs: Vec<Run>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let messages = env_or("BENCH_MESSAGES", 50_000);
    let rounds = env_or("BENCH_ROUNDS", 7);
    let bounds = Bounds::from_env();
    println!(
        "bridge throughput: {messages} persistent messages per run, prefetch {}, max in flight {}, {PRODUCTS} products, {rounds} rounds, classic queue on the local broker",
        bounds.prefetch, bounds.max_in_flight
    );
    let stores = std::env::var("BENCH_ENTITY_STORES")
        .or_else(|_| std::env::var("BENCH_ENTITY_STORE"))
        .unwrap_or_else(|_| "memory".to_owned());
    let mut series = vec![Series {
        name: "ceiling: bare lapin consumer".to_owned(),
        store: None,
        nodes: 0,
        runs: Vec::new(),
    }];
    for store in stores.split(',').filter(|s| !s.is_empty()) {
        let label = store_label(store);
        for nodes in [1, 3] {
            if nodes == 3 && store == "embedded" {
                continue;
            }
            let node_word = if nodes == 1 { "node" } else { "nodes" };
            series.push(Series {
                name: format!("{label}, {nodes} {node_word}"),
                store: Some(store.to_owned()),
                nodes,
                runs: Vec::new(),
            });
        }
    }
    for round in 1..=rounds {
        let mut line = format!("round {round}:");
        let mut ceiling = 0.0;
        for s in &mut series {
            let run = match &s.store {
                None => measure(messages, |amqp, n| bare_consumer(amqp, n, bounds.prefetch)).await,
                Some(store) if s.nodes == 1 => {
                    let store = store.clone();
                    measure(messages, |amqp, n| warren_consumer(amqp, n, store, bounds)).await
                }
                Some(store) => {
                    let store = store.clone();
                    measure(messages, |amqp, n| warren_cluster(amqp, n, store, bounds)).await
                }
            };
            if s.store.is_none() {
                ceiling = run.rate;
            }
            line.push_str(&format!(
                " | {} {:.0} msg/s {:.1} µs ({:.2})",
                s.name,
                run.rate,
                run.cpu_per_message,
                run.rate / ceiling
            ));
            line.push_str(&format!(" broker {:.1} µs", run.broker_cpu_per_message));
            if let Some(pg) = run.postgres_cpu_per_message {
                line.push_str(&format!(" pg {pg:.1} µs"));
            }
            s.runs.push(run);
        }
        println!("{line}");
    }
    println!(
        "median (msg/s, CPU of the consumer process(es) per message, ratio to the ceiling, the broker's and PostgreSQL's CPU per message, the rate all of that CPU allows on {} cores, as a ratio to the ceiling):",
        cores()
    );
    let values = |s: &Series, f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = s.runs.iter().map(f).collect();
        median(&mut v)
    };
    let ceiling = values(&series[0], |r| r.rate);
    for s in &series {
        let rate = values(s, |r| r.rate);
        let mut line = format!(
            "  {:<44} {rate:>7.0} msg/s {:>5.1} µs  {:.2}",
            s.name,
            values(s, |r| r.cpu_per_message),
            rate / ceiling
        );
        line.push_str(&format!(
            "  broker {:.1} µs",
            values(s, |r| r.broker_cpu_per_message)
        ));
        if s.runs.iter().all(|r| r.postgres_cpu_per_message.is_some()) && !s.runs.is_empty() {
            let pg = values(s, |r| r.postgres_cpu_per_message.unwrap_or(0.0));
            line.push_str(&format!("  pg {pg:.1} µs"));
        }
        line.push_str(&format!(
            "  cpu-bound {:.2}",
            values(s, Run::cpu_bound) / ceiling
        ));
        println!("{line}");
    }
    println!("targets: memory store 1 node >= 0.8 and 3 nodes >= 0.5; PostgreSQL >= 0.6");
}

/// A store's name for the table: a URL without its credentials.
fn store_label(store: &str) -> String {
    match store.split_once("://") {
        Some((scheme, _)) => scheme.to_owned(),
        None => store.to_owned(),
    }
}

/// CPU (user + system) all processes named `command` on this machine spent so far, in
/// seconds, with what their ended children spent: a node's connections to PostgreSQL end with
/// it, and their backend processes' time then counts in the postmaster's.
fn cpu_of(command: &str) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == command)
        })
        .map(cpu_seconds_with_ended_children)
        .sum()
}

/// One consumer run.
struct Run {
    rate: f64,
    cpu_per_message: f64,
    /// What PostgreSQL spent, when the run used it.
    postgres_cpu_per_message: Option<f64>,
    /// What the broker (every `beam.smp` of the machine) spent.
    broker_cpu_per_message: f64,
}

impl Run {
    /// The rate this run's CPU per message allows when every core of the machine is busy
    /// with it: consumer(s), broker and PostgreSQL together.
    fn cpu_bound(&self) -> f64 {
        let per_message = self.cpu_per_message
            + self.broker_cpu_per_message
            + self.postgres_cpu_per_message.unwrap_or(0.0);
        cores() as f64 * 1e6 / per_message
    }
}

/// The cores this machine gives its processes.
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Fills a fresh queue with `messages` orders and runs `consume` on it.
async fn measure<F, Fut>(messages: usize, consume: F) -> Run
where
    F: FnOnce(AmqpSettings, usize) -> Fut,
    Fut: std::future::Future<Output = (Duration, f64)>,
{
    let amqp = fresh_queue();
    fill_settled(&amqp, messages, PRODUCTS).await;
    let postgres_before = cpu_of("postgres");
    let broker_before = cpu_of("beam.smp");
    let (elapsed, cpu) = consume(amqp.clone(), messages).await;
    let postgres = cpu_of("postgres") - postgres_before;
    let broker = cpu_of("beam.smp") - broker_before;
    delete(&amqp).await;
    Run {
        rate: messages as f64 / elapsed.as_secs_f64(),
        cpu_per_message: cpu * 1e6 / messages as f64,
        // Any store but PostgreSQL leaves it idle: a few ticks of its background work.
        postgres_cpu_per_message: (postgres > 0.05 * elapsed.as_secs_f64())
            .then(|| postgres * 1e6 / messages as f64),
        broker_cpu_per_message: broker * 1e6 / messages as f64,
    }
}

/// The real binary alone, from process start until its metrics count every message acked.
/// Returns the time and the CPU the consumer process spent.
async fn warren_consumer(
    amqp: AmqpSettings,
    messages: usize,
    store: String,
    bounds: Bounds,
) -> (Duration, f64) {
    let start = Instant::now();
    let node = Node::start(&amqp, &store, &refs(&bounds.args(Vec::new()))).await;
    let elapsed = node.until_acked(messages, start).await;
    (elapsed, node.stop().await)
}

/// Three nodes: two shard hosts form the cluster first (untimed), then the consuming node
/// joins them; from its process start until it acked every message. Returns the time and the
/// CPU all three spent.
async fn warren_cluster(
    amqp: AmqpSettings,
    messages: usize,
    store: String,
    bounds: Bounds,
) -> (Duration, f64) {
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
    let first = Node::start(&amqp, &store, &refs(&bounds.args(args1))).await;
    let second = Node::start(&amqp, &store, &refs(&bounds.args(args2))).await;
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
    let consumer = Node::start(&amqp, &store, &refs(&bounds.args(args0))).await;
    let elapsed = consumer.until_acked(messages, start).await;
    let cpu = consumer.stop().await + first.stop().await + second.stop().await;
    (elapsed, cpu)
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// The in-flight bound and prefetch every node of this benchmark runs with.
#[derive(Clone, Copy)]
struct Bounds {
    max_in_flight: u16,
    prefetch: u16,
}

impl Bounds {
    fn from_env() -> Self {
        let max_in_flight = u16::try_from(env_or("BENCH_MAX_IN_FLIGHT", MAX_IN_FLIGHT.into()))
            .unwrap_or(MAX_IN_FLIGHT);
        Bounds {
            max_in_flight,
            prefetch: max_in_flight.saturating_mul(2),
        }
    }

    /// `args` and these bounds.
    fn args(self, mut args: Vec<String>) -> Vec<String> {
        args.extend([
            "--max-in-flight".to_owned(),
            self.max_in_flight.to_string(),
            "--prefetch".to_owned(),
            self.prefetch.to_string(),
        ]);
        args
    }
}
