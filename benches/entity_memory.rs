//! What entities cost in memory on one real node with the default (embedded) store. Each row
//! fills a fresh queue with `BENCH_MESSAGES` orders (default 100,000), starts a node, and
//! reads its resident memory (`VmRSS`) once it serves, once every order is acked and, in all rows
//! but `limit`, again 30 s after no entity task runs:
//!
//! - `100 products`: the orders over 100 products, what they cost without new entities;
//! - `distinct`: each order for a product of its own, so every order starts an entity (those of
//!   the last 5 s still running at the end). Memory is read again 30 s after every entity went
//!   dormant (`cluster.region.hibernate_after`, default 5 s) and the consuming side dropped its
//!   controllers for them (`cleanup_unused_after` 3 s here): (that − the first row's, read the
//!   same way) / entities is what an idle entity costs on its host;
//! - `distinct, limit`: the same with `cluster.region.max_active_entities` and the consuming
//!   side's `delivery.sharding.producer_controller.max_entity_controllers` at `BENCH_LIMIT`
//!   (default 10,000): memory bounded by the limit, and what the passivations cost in rate;
//! - `distinct, passivated`: entities and their controllers stopped after 3 s idle; memory
//!   read again 30 s after none runs: does it go back to the system? (The allocator purges
//!   freed pages on a background thread over about 20 s.)
//!
//! Rows alternate over `BENCH_ROUNDS` rounds (default 1); medians. `BENCH_ROWS` picks some
//! (`products,distinct,limit,passivated`, the default). Each row also reads RSS once a tenth
//! of the orders is acked, past the start-up growth (connection buffers, caches): from there
//! to the end is what the rest of the orders cost. Run after `cargo build --release --workspace`:
//! `cargo bench --bench entity_memory`.

mod support;

use std::time::{Duration, Instant};

use support::process::rss_kib;
use support::{Node, delete, env_or, fill_with, fresh_queue, median};

const ACTIVE: &str = "warren_entities_active";
/// Longer than any drain here: a stuck row fails instead of hanging.
const DEADLINE: Duration = Duration::from_secs(600);

#[derive(Clone, Copy, PartialEq)]
enum Row {
    HundredProducts,
    Distinct,
    Limited,
    Passivated,
}

impl Row {
    const ALL: [Row; 4] = [
        Row::HundredProducts,
        Row::Distinct,
        Row::Limited,
        Row::Passivated,
    ];

    /// Its name in `BENCH_ROWS`.
    fn key(self) -> &'static str {
        match self {
            Row::HundredProducts => "products",
            Row::Distinct => "distinct",
            Row::Limited => "limit",
            Row::Passivated => "passivated",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Row::HundredProducts => "100 products",
            Row::Distinct => "distinct",
            Row::Limited => "distinct, limit",
            Row::Passivated => "distinct, passivated",
        }
    }
}

/// One row's readings.
#[derive(Default)]
struct Reading {
    start_mib: f64,
    tenth_mib: f64,
    end_mib: f64,
    idle_mib: f64,
    active: f64,
    rate: f64,
}

/// `pid`'s resident memory in MiB (0 once it is gone).
fn rss_mib(pid: u32) -> f64 {
    rss_kib(pid).unwrap_or(0) as f64 / 1024.0
}

async fn measure(row: Row, messages: usize, limit: usize) -> Reading {
    let amqp = fresh_queue();
    match row {
        Row::HundredProducts => fill_with(&amqp, messages, |i| i % 100).await,
        _ => fill_with(&amqp, messages, |i| i).await,
    }
    let limit = limit.to_string();
    let mut env = vec![];
    match row {
        Row::Limited => {
            env.push((
                "WARREN_CLUSTER__REGION__MAX_ACTIVE_ENTITIES",
                limit.as_str(),
            ));
            env.push((
                "WARREN_DELIVERY__SHARDING__PRODUCER_CONTROLLER__MAX_ENTITY_CONTROLLERS",
                limit.as_str(),
            ));
        }
        Row::Passivated => {
            env.push(("WARREN_CLUSTER__REGION__PASSIVATE_AFTER", "3s"));
            env.push((
                "WARREN_DELIVERY__SHARDING__PRODUCER_CONTROLLER__CLEANUP_UNUSED_AFTER",
                "3s",
            ));
        }
        Row::HundredProducts | Row::Distinct => {
            // Every entity stays in memory, dormant, until the idle reading.
            env.push(("WARREN_CLUSTER__REGION__PASSIVATE_AFTER", "1h"));
            env.push((
                "WARREN_DELIVERY__SHARDING__PRODUCER_CONTROLLER__CLEANUP_UNUSED_AFTER",
                "3s",
            ));
        }
    }
    let node = Node::start_with_env(&amqp, "embedded", &[], &env).await;
    let pid = node.pid().expect("running");
    let start_mib = rss_mib(pid);
    let started = Instant::now();
    node.until_acked(messages / 10, started).await;
    let tenth_mib = rss_mib(pid);
    let elapsed = node.until_acked(messages, started).await;
    let mut reading = Reading {
        start_mib,
        tenth_mib,
        end_mib: rss_mib(pid),
        active: node.metric(ACTIVE).await,
        rate: messages as f64 / elapsed.as_secs_f64(),
        ..Reading::default()
    };
    if row != Row::Limited {
        // No entity task left: each passivated, or dormant.
        while node.metric(ACTIVE).await > 0.0 {
            assert!(started.elapsed() < DEADLINE, "entities never went idle");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // The producer side's controllers go after their idle time, and the allocator gives
        // freed pages back over its decay time.
        tokio::time::sleep(Duration::from_secs(30)).await;
        reading.idle_mib = rss_mib(pid);
    }
    node.stop().await;
    delete(&amqp).await;
    reading
}

#[tokio::main]
async fn main() {
    let messages = env_or("BENCH_MESSAGES", 100_000);
    let limit = env_or("BENCH_LIMIT", 10_000);
    let rounds = env_or("BENCH_ROUNDS", 1);
    let picked = std::env::var("BENCH_ROWS").unwrap_or_default();
    let runs = |row: &Row| picked.is_empty() || picked.split(',').any(|key| key == row.key());
    let mut readings: Vec<Vec<Reading>> = Row::ALL.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, row) in Row::ALL.iter().enumerate().filter(|(_, row)| runs(row)) {
            let reading = measure(*row, messages, limit).await;
            println!(
                "round {round} {:>22}: RSS {:.1} -> {:.1} (a tenth acked) -> {:.1} MiB (idle {:.1}), {:.0} entities running, {:.0} msg/s",
                row.name(),
                reading.start_mib,
                reading.tenth_mib,
                reading.end_mib,
                reading.idle_mib,
                reading.active,
                reading.rate
            );
            readings[i].push(reading);
        }
    }
    let med = |i: usize, f: fn(&Reading) -> f64| {
        let mut values: Vec<f64> = readings[i].iter().map(f).collect();
        median(&mut values)
    };
    let growth = |i: usize| med(i, |r| r.end_mib - r.start_mib);
    println!("\n{messages} orders, limit {limit}, medians of {rounds} round(s):");
    for (i, row) in Row::ALL.iter().enumerate().filter(|(_, row)| runs(row)) {
        println!(
            "{:>22}: grows {:.1} MiB ({:.1} after a tenth), {:.0} entities running at the end, {:.0} msg/s",
            row.name(),
            growth(i),
            med(i, |r| r.end_mib - r.tenth_mib),
            med(i, |r| r.active),
            med(i, |r| r.rate),
        );
    }
    if runs(&Row::Passivated) {
        println!(
            "passivated: {:.1} MiB at the end, {:.1} MiB 30 s after none runs (started at {:.1})",
            med(3, |r| r.end_mib),
            med(3, |r| r.idle_mib),
            med(3, |r| r.start_mib)
        );
    }
    if !(runs(&Row::HundredProducts) && runs(&Row::Distinct)) {
        return;
    }
    let idle_growth = |i: usize| med(i, |r| r.idle_mib - r.start_mib);
    let dormant = messages as f64 - 100.0;
    println!(
        "per idle entity on its host: {:.0} bytes ((distinct − 100 products, both idle) / {dormant:.0}); 100 products idle {:.1} MiB, distinct idle {:.1} MiB",
        (idle_growth(1) - idle_growth(0)) * 1024.0 * 1024.0 / dormant,
        med(0, |r| r.idle_mib),
        med(1, |r| r.idle_mib),
    );
}
