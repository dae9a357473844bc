//! Reliable-delivery throughput in one process, next to a baseline measured in the same run: a
//! bounded tokio mpsc pipeline (capacity W) whose consumer acks every message back on a second
//! channel. Measured: point-to-point (ProducerController → ConsumerController tasks, W = 50),
//! work pulling with 1, 2, 4 and 10 workers, and the memory an idle controller pair keeps
//! (sharding keeps one per entity). Everything runs on one thread, like the consumer binary.
//! Rounds alternate and medians are printed with their ratio to the baseline.
//!
//! `BENCH_MESSAGES` (default 1000000) and `BENCH_ROUNDS` (default 3) tune it. Run with
//! `cargo bench --bench delivery_throughput`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use warren::delivery::driver::{
    ConsumerBuilder, LINK_CAPACITY, LocalWorkerRegistry, ProducerBuilder, WorkPullingBuilder,
    channel_link, connect_in_process,
};
use warren::delivery::{
    ConsumerController, ConsumerSettings, ProducerController, ProducerId, ProducerSettings,
};

/// Counts live heap bytes, to measure what idle controllers keep.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const WINDOW: u32 = 50;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn consumer_settings() -> ConsumerSettings {
    ConsumerSettings {
        flow_control_window: WINDOW,
        ..ConsumerSettings::default()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let messages = env_or("BENCH_MESSAGES", 1_000_000);
    let rounds = env_or("BENCH_ROUNDS", 3);
    println!(
        "delivery throughput: {messages} messages per run, W = {WINDOW}, one thread, {rounds} rounds"
    );
    let names = [
        "baseline: mpsc pipeline, acks back",
        "point-to-point",
        "work pulling, 1 worker",
        "work pulling, 2 workers",
        "work pulling, 4 workers",
        "work pulling, 10 workers",
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..rounds {
        results[0].push(rate(messages, baseline(messages).await));
        results[1].push(rate(messages, point_to_point(messages).await));
        for (i, workers) in [1, 2, 4, 10].into_iter().enumerate() {
            results[2 + i].push(rate(messages, work_pulling(messages, workers).await));
        }
    }
    let medians: Vec<f64> = results.iter_mut().map(|r| median(r)).collect();
    for (name, value) in names.iter().zip(&medians) {
        println!(
            "{name:<36} {value:>12.0} msg/s   ratio to baseline {:.2}",
            value / medians[0]
        );
    }
    idle_pair_memory();
}

fn rate(messages: usize, elapsed: Duration) -> f64 {
    messages as f64 / elapsed.as_secs_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn baseline(messages: usize) -> Duration {
    let (tx, mut rx) = mpsc::channel::<u64>(WINDOW as usize);
    let (ack_tx, mut ack_rx) = mpsc::channel::<u64>(WINDOW as usize);
    let start = Instant::now();
    tokio::spawn(async move {
        for n in 0..messages as u64 {
            if tx.send(n).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(n) = rx.recv().await {
            if ack_tx.send(n).await.is_err() {
                return;
            }
        }
    });
    for _ in 0..messages {
        ack_rx.recv().await.expect("ack");
    }
    start.elapsed()
}

async fn point_to_point(messages: usize) -> Duration {
    let (producer, mut consumer) = connect_in_process(
        ProducerBuilder::<u64>::new(ProducerId::new("bench")),
        ConsumerBuilder::default().settings(consumer_settings()),
    );
    let start = Instant::now();
    tokio::spawn(async move {
        for n in 0..messages as u64 {
            if producer.send(n).await.is_err() {
                return;
            }
        }
    });
    for _ in 0..messages {
        consumer.next().await.expect("delivery");
        consumer.confirm();
    }
    start.elapsed()
}

async fn work_pulling(messages: usize, workers: usize) -> Duration {
    let registry = LocalWorkerRegistry::<u64>::default();
    let (to_producer, inbox) = channel_link(LINK_CAPACITY);
    let mut producer = WorkPullingBuilder::new(ProducerId::new("bench"))
        .spawn(inbox, &registry)
        .expect("work pulling starts");
    let (done_tx, mut done) = mpsc::unbounded_channel();
    let mut registrations = Vec::new();
    for _ in 0..workers {
        let (mut worker, registration) = registry.spawn_worker(
            to_producer.clone(),
            ConsumerBuilder::default().settings(consumer_settings()),
        );
        registrations.push(registration);
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            while worker.next().await.is_some() {
                worker.confirm();
                if done_tx.send(()).is_err() {
                    return;
                }
            }
        });
    }
    producer
        .wait_for_workers(workers)
        .await
        .expect("workers registered");
    let start = Instant::now();
    tokio::spawn(async move {
        for n in 0..messages as u64 {
            if producer.send(n).await.is_err() {
                return;
            }
        }
    });
    for _ in 0..messages {
        done.recv().await.expect("delivery");
    }
    let elapsed = start.elapsed();
    drop(registrations);
    elapsed
}

/// What one ProducerController + ConsumerController pair keeps once idle: its own size plus
/// heap, averaged over many pairs that each exchanged messages and then went quiet.
fn idle_pair_memory() {
    const PAIRS: usize = 1000;
    let producer_id = ProducerId::new("entity-producer");
    let now = tokio::time::Instant::now();
    let before = LIVE.load(Ordering::Relaxed);
    let mut pairs: Vec<(ProducerController<u64, ()>, ConsumerController<u64>)> =
        Vec::with_capacity(PAIRS);
    for i in 0..PAIRS {
        let mut producer =
            ProducerController::new(producer_id.clone(), i as u64, ProducerSettings::default());
        let mut consumer = ConsumerController::new(consumer_settings(), now);
        producer.start(now);
        producer.register_consumer(now);
        consumer.start(now);
        for n in 0..10u64 {
            while producer.poll_event().is_some() {}
            let _ = producer.send_with_confirmation(n, (), now);
            while let Some(message) = producer.poll_transmit() {
                consumer.handle_message(message, now);
            }
            while consumer.poll_event().is_some() {
                let _ = consumer.confirm(now);
            }
            while let Some((_, frame)) = consumer.poll_transmit() {
                let _ = producer.handle_frame(frame, now);
            }
        }
        while producer.poll_event().is_some() {}
        producer.shrink_buffers();
        consumer.shrink_buffers();
        pairs.push((producer, consumer));
    }
    let after = LIVE.load(Ordering::Relaxed);
    let per_pair = (after - before) as f64 / PAIRS as f64;
    println!(
        "idle ProducerController + ConsumerController pair: {per_pair:.0} bytes ({} + {} inline, the rest heap; target <= 2048)",
        std::mem::size_of::<ProducerController<u64, ()>>(),
        std::mem::size_of::<ConsumerController<u64>>()
    );
    drop(Arc::new(pairs));
}
