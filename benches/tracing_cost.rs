//! What exporting traces costs: one `warren-consumer` node draining the same prefilled queue
//! with traces off and with every message traced (sampling 1.0, exported over OTLP/HTTP to a
//! receiver in this process that decodes nothing and answers 200). Rounds alternate; medians
//! and their ratio are printed, with the CPU the consumer spent per message. The queue's
//! messages carry no `traceparent`, so every delivery starts a trace of its own: with a
//! parent-based sampler that is what 100 % sampling costs. Run with
//! `scripts/bench tracing_cost` (release build, local broker).
//!
//! `BENCH_MESSAGES` (default 50000) and `BENCH_ROUNDS` (default 5) tune it. `BENCH_BASELINE`
//! names a `warren-consumer` built without tracing (an earlier commit) to run alongside, which
//! shows what the tracing code costs while it is off.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;

use support::{Node, drain_with_one_node, env_or, fresh_queue, median};

const PRODUCTS: usize = 100;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let messages = env_or("BENCH_MESSAGES", 50_000);
    let rounds = env_or("BENCH_ROUNDS", 5);
    let received = Arc::new(AtomicU64::new(0));
    let endpoint = otlp_sink(received.clone()).await;
    println!(
        "tracing cost: {messages} persistent messages per run, {PRODUCTS} products, {rounds} rounds, one node, memory store"
    );
    let baseline = std::env::var_os("BENCH_BASELINE").map(std::path::PathBuf::from);
    let (mut off, mut on, mut off_cpu, mut on_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut before, mut before_cpu) = (Vec::new(), Vec::new());
    let current = Node::binary();
    for round in 1..=rounds {
        if let Some(binary) = &baseline {
            let (rate, cpu) = measure(binary, messages, &[]).await;
            println!("round {round}: without tracing code {rate:>7.0} msg/s {cpu:>5.1} µs");
            before.push(rate);
            before_cpu.push(cpu);
        }
        let quiet = measure(&current, messages, &[]).await;
        let sent = received.load(Ordering::Relaxed);
        let traced = measure(
            &current,
            messages,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
                ("WARREN_TRACING__SAMPLE_RATIO", "1.0"),
            ],
        )
        .await;
        let exported = received.load(Ordering::Relaxed) - sent;
        println!(
            "round {round}: off {:>7.0} msg/s {:>5.1} µs | traced {:>7.0} msg/s {:>5.1} µs ({:.2}), {:.1} KB exported per 1000 messages",
            quiet.0,
            quiet.1,
            traced.0,
            traced.1,
            traced.0 / quiet.0,
            exported as f64 / messages as f64,
        );
        off.push(quiet.0);
        on.push(traced.0);
        off_cpu.push(quiet.1);
        on_cpu.push(traced.1);
    }
    let (a, b) = (median(&mut off), median(&mut on));
    let (ac, bc) = (median(&mut off_cpu), median(&mut on_cpu));
    println!("median (msg/s, consumer CPU per message):");
    if !before.is_empty() {
        let (r, c) = (median(&mut before), median(&mut before_cpu));
        println!(
            "  without tracing code {r:>7.0} msg/s {c:>5.1} µs  (off is {:.2} of it)",
            a / r
        );
    }
    println!("  traces off           {a:>7.0} msg/s {ac:>5.1} µs");
    println!(
        "  every message traced {b:>7.0} msg/s {bc:>5.1} µs  {:.2} of off",
        b / a
    );
}

/// One drain of a fresh queue by a node of `binary` run with `env`: rate and CPU per message
/// (export may lag behind the last ack).
async fn measure(binary: &std::path::Path, messages: usize, env: &[(&str, &str)]) -> (f64, f64) {
    drain_with_one_node(binary, &fresh_queue(), messages, PRODUCTS, &[], env).await
}

/// An OTLP/HTTP endpoint that counts the bytes posted to it; returns its base URL.
async fn otlp_sink(received: Arc<AtomicU64>) -> String {
    async fn take(State(received): State<Arc<AtomicU64>>, body: Bytes) -> &'static str {
        received.fetch_add(body.len() as u64, Ordering::Relaxed);
        ""
    }
    let app = Router::new()
        .route("/v1/traces", post(take))
        .with_state(received);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a port for the OTLP sink");
    let base = format!("http://{}", listener.local_addr().expect("its address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}
