//! How busy `warren-consumer` keeps slow entities, next to the best any bridge could do. With F
//! deliveries in flight spread at random over P products (the backlog names products at
//! random) that each handle one order at a time in D, a product has work with probability
//! F/(F+P−1) (a closed queueing network of identical servers), so no bridge can beat
//! P·F/(F+P−1)/D (exact, not random, handle times allow a little more). D is the products' handle time as the node
//! itself measures it (`warren_entity_handle_seconds`: the simulated delay plus the timer's
//! granularity plus storing), in the same window as the rate.
//!
//! Each row fills a queue, starts one node (memory store), lets it warm up, then reads
//! `warren_deliveries_total{outcome="acked"}` and the handle-time histogram over a steady-state
//! window while the backlog lasts, and the node's CPU share (1.0 = its one runtime thread
//! saturated). Rounds alternate the rows; medians are printed with their ratio to the bound.
//! `BENCH_ROUNDS` (default 3) and `BENCH_PREFETCH_FACTOR` (prefetch as a multiple of the
//! in-flight bound; unset leaves the consumer's own default) tune it; `BENCH_CONSUMER` runs another `warren-consumer` binary (an older build, to compare
//! commits). Run after `cargo build --release --workspace`: `cargo bench --bench slow_entities`.

mod support;

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use support::{Node, cpu_seconds, delete, fill_with, fresh_queue, median};

/// Steady state is reached well within this.
const WARM_UP: Duration = Duration::from_secs(2);
/// The window the rate is read over.
const WINDOW: Duration = Duration::from_secs(4);

/// One configuration: in-flight bound, products, simulated handle time.
#[derive(Clone, Copy)]
struct Row {
    in_flight: usize,
    products: usize,
    delay_ms: u64,
}

impl Row {
    /// The bound for handle time `d` (seconds), in messages per second.
    fn bound(self, d: f64) -> f64 {
        let (f, p) = (self.in_flight as f64, self.products as f64);
        p * f / (f + p - 1.0) / d
    }
}

/// What one run of a row measured.
struct Measured {
    rate: f64,
    handle: f64,
    cpu: f64,
    /// Averages over the window: deliveries with the entities, entities the bridge has work
    /// out to, entities handling a message.
    in_flight: f64,
    with_work: f64,
    processing: f64,
}

const ROWS: [Row; 4] = [
    Row {
        in_flight: 100,
        products: 100,
        delay_ms: 5,
    },
    Row {
        in_flight: 400,
        products: 100,
        delay_ms: 5,
    },
    Row {
        in_flight: 100,
        products: 1000,
        delay_ms: 5,
    },
    Row {
        in_flight: 100,
        products: 100,
        delay_ms: 20,
    },
];

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let prefetch = prefetch_factor().map_or("the consumer's default".to_owned(), |factor| {
        format!("{factor} × in flight")
    });
    println!(
        "slow entities: one node, memory store, prefetch {prefetch}, {rounds} rounds, warm-up {WARM_UP:?}, window {WINDOW:?}"
    );
    let mut results: Vec<Vec<Measured>> = ROWS.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        for (row, runs) in ROWS.iter().zip(results.iter_mut()) {
            let measured = measure(*row).await;
            println!(
                "round {round}: F {:>3} P {:>4} D {:>2} ms: {:>6.0} msg/s, handle {:.2} ms, bound {:>6.0}, ratio {:.2}, node CPU {:.2}; in flight {:.0}, entities with work {:.0}, processing {:.0}",
                row.in_flight,
                row.products,
                row.delay_ms,
                measured.rate,
                measured.handle * 1e3,
                row.bound(measured.handle),
                measured.rate / row.bound(measured.handle),
                measured.cpu,
                measured.in_flight,
                measured.with_work,
                measured.processing,
            );
            runs.push(measured);
        }
    }
    println!("median | in flight | products | delay | msg/s | handle | bound | ratio | node CPU");
    for (row, runs) in ROWS.iter().zip(results.iter_mut()) {
        let mut rates: Vec<f64> = runs.iter().map(|m| m.rate).collect();
        let mut handles: Vec<f64> = runs.iter().map(|m| m.handle).collect();
        let mut ratios: Vec<f64> = runs.iter().map(|m| m.rate / row.bound(m.handle)).collect();
        let mut cpus: Vec<f64> = runs.iter().map(|m| m.cpu).collect();
        let handle = median(&mut handles);
        println!(
            "       | {:>9} | {:>8} | {:>3} ms | {:>5.0} | {:.2} ms | {:>5.0} | {:.2} | {:.2}",
            row.in_flight,
            row.products,
            row.delay_ms,
            median(&mut rates),
            handle * 1e3,
            row.bound(handle),
            median(&mut ratios),
            median(&mut cpus),
        );
    }
}

/// One run of `row`: a backlog that outlasts the warm-up and the window at the bound's rate.
async fn measure(row: Row) -> Measured {
    let amqp = fresh_queue();
    // Enough for the fastest the products could go, every one of them always busy.
    let busiest = row.in_flight.min(row.products) as f64 / (row.delay_ms as f64 / 1e3);
    let messages = (busiest * (WARM_UP + WINDOW).as_secs_f64() * 1.3) as usize;
    let mut rng = SmallRng::seed_from_u64(row.products as u64 * 1000 + row.in_flight as u64);
    fill_with(&amqp, messages, |_| rng.random_range(0..row.products)).await;
    let in_flight = row.in_flight.to_string();
    let prefetch = prefetch_factor().map(|factor| (row.in_flight * factor).to_string());
    let delay = row.delay_ms.to_string();
    let mut args = vec![
        "--max-in-flight",
        in_flight.as_str(),
        "--processing-delay-ms",
        delay.as_str(),
    ];
    if let Some(prefetch) = &prefetch {
        args.extend(["--prefetch", prefetch.as_str()]);
    }
    let node = Node::start(&amqp, "memory", &args).await;
    tokio::time::sleep(WARM_UP).await;
    let pid = node.pid().unwrap_or_default();
    let (before, cpu_before) = (Sample::take(&node).await, cpu_seconds(pid));
    let mut gauges = [0.0; 3];
    let mut samples = 0.0;
    let window_ends = std::time::Instant::now() + WINDOW;
    while std::time::Instant::now() < window_ends {
        let page = node.get("/metrics").await;
        for (sum, name) in gauges.iter_mut().zip([
            "warren_in_flight",
            "warren_entities_with_work",
            "warren_entities_processing",
        ]) {
            *sum += warren::metrics::sum_series(&page, name).unwrap_or(0.0);
        }
        samples += 1.0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (after, cpu_after) = (Sample::take(&node).await, cpu_seconds(pid));
    let left = messages.saturating_sub(node.acked().await);
    node.stop().await;
    delete(&amqp).await;
    assert!(
        left > 0,
        "the backlog ran out inside the window: make it longer"
    );
    let seconds = (after.at - before.at).as_secs_f64();
    let handled = after.handled - before.handled;
    // A build from before the handle-time histogram: its nominal delay, a lower bound.
    let handle = if handled > 0.0 {
        (after.handle_sum - before.handle_sum) / handled
    } else {
        println!("  (no warren_entity_handle_seconds: the bound uses the nominal delay)");
        row.delay_ms as f64 / 1e3
    };
    Measured {
        rate: (after.acked - before.acked) / seconds,
        handle,
        cpu: (cpu_after - cpu_before) / seconds,
        in_flight: gauges[0] / samples,
        with_work: gauges[1] / samples,
        processing: gauges[2] / samples,
    }
}

/// Prefetch as a multiple of the in-flight bound, from `BENCH_PREFETCH_FACTOR`; `None` leaves
/// the consumer's default (so an older build runs with its own).
fn prefetch_factor() -> Option<usize> {
    std::env::var("BENCH_PREFETCH_FACTOR")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// The counters read at one moment.
struct Sample {
    at: std::time::Instant,
    acked: f64,
    handle_sum: f64,
    handled: f64,
}

impl Sample {
    async fn take(node: &Node) -> Sample {
        Sample {
            at: std::time::Instant::now(),
            acked: node
                .metric("warren_deliveries_total{outcome=\"acked\"}")
                .await,
            handle_sum: node.metric("warren_entity_handle_seconds_sum").await,
            handled: node.metric("warren_entity_handle_seconds_count").await,
        }
    }
}
