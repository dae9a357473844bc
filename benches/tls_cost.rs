//! What TLS on the broker link costs: one `warren-consumer` node draining the same prefilled
//! queue over `amqp://` and over `amqps://`, from one private RabbitMQ node that listens on both
//! (its certificate made here by a CA of the run's own, which the consumer is given). Rounds
//! alternate; medians, their ratio and the consumer's CPU per message are printed. Run with
//! `scripts/bench tls_cost` (release build). TLS between nodes is measured by
//! `scripts/cluster-bench`.
//!
//! `BENCH_MESSAGES` (default 50000) and `BENCH_ROUNDS` (default 5) tune it.

mod support;

use support::certs::TestCa;
use support::private_rabbitmq::{BrokerTls, PrivateRabbitMq};
use support::{Node, drain_with_one_node, env_or, fresh_queue, median, path};

const PRODUCTS: usize = 100;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let messages = env_or("BENCH_MESSAGES", 50_000);
    let rounds = env_or("BENCH_ROUNDS", 5);
    let ca = TestCa::new("bench");
    let server = ca.server("broker", &["127.0.0.1"]);
    let broker = PrivateRabbitMq::start_tls(BrokerTls {
        server: &server,
        client_ca: &ca.cert,
        plain_too: true,
    });
    let plain = broker
        .plain_uri()
        .expect("the broker listens without TLS too");
    let tls = broker.uri();
    println!(
        "broker TLS cost: {messages} persistent messages per run, {PRODUCTS} products, {rounds} rounds, one node, memory store, private broker"
    );
    let (mut clear, mut secured, mut clear_cpu, mut secured_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let a = measure(&plain, &plain, messages, &[]).await;
        let b = measure(&plain, &tls, messages, &["--amqp-ca-file", path(&ca.cert)]).await;
        println!(
            "round {round}: amqp:// {:>7.0} msg/s {:>5.1} µs | amqps:// {:>7.0} msg/s {:>5.1} µs ({:.2})",
            a.0,
            a.1,
            b.0,
            b.1,
            b.0 / a.0
        );
        clear.push(a.0);
        clear_cpu.push(a.1);
        secured.push(b.0);
        secured_cpu.push(b.1);
    }
    let (a, b) = (median(&mut clear), median(&mut secured));
    let (ac, bc) = (median(&mut clear_cpu), median(&mut secured_cpu));
    println!("median (msg/s, consumer CPU per message):");
    println!("  amqp://  {a:>7.0} msg/s {ac:>5.1} µs");
    println!(
        "  amqps:// {b:>7.0} msg/s {bc:>5.1} µs  {:.2} of amqp://",
        b / a
    );
}

/// One drain of a fresh queue filled through `fill_uri` by a node connected to `consume_uri`
/// (with `args`): rate and CPU per message.
async fn measure(fill_uri: &str, consume_uri: &str, messages: usize, args: &[&str]) -> (f64, f64) {
    let mut amqp = fresh_queue();
    amqp.uri = fill_uri.to_owned();
    let mut flags = vec!["--uri", consume_uri];
    flags.extend_from_slice(args);
    drain_with_one_node(&Node::binary(), &amqp, messages, PRODUCTS, &flags, &[]).await
}
