//! The bridge on a real cluster: three `warren-consumer` processes on loopback, one RabbitMQ
//! queue, products stored in a real PostgreSQL database. The oldest node consumes the queue (a
//! singleton) and routes every order to its product on whichever node hosts its shard. These
//! tests kill and stop nodes mid-run and then check, through the broker and through every
//! node, that nothing was lost and nothing applied twice.

mod support;

use std::time::Duration;

use tokio::time::Instant;

use support::cluster::*;
use support::{Consumer, Orders, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_singleton_holder_sigkilled_mid_run_loses_nothing_and_applies_nothing_twice() {
    // Slow products keep the 10,000 orders going for seconds, so the kill lands mid-run.
    let cluster = Cluster::start(
        "kill-singleton",
        &["--processing-delay-ms", MID_RUN_DELAY_MS],
    )
    .await;
    sigkill_the_singleton_holder_mid_run(cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_host_sigkilled_mid_run_loses_nothing_and_applies_nothing_twice() {
    // Slow products keep the 10,000 orders going for seconds, so the kill lands mid-run.
    let mut cluster =
        Cluster::start("kill-host", &["--processing-delay-ms", MID_RUN_DELAY_MS]).await;
    assert_eq!(cluster.bridge_holder().await, 0);
    let mut orders = Orders::new(&cluster.queue, 100);
    orders.publish(10_000).await;
    // n3 holds some products' shards and is working on them when it dies.
    eventually("n3 to host products and apply orders", DRAIN, || async {
        let status = cluster.node(2).get("/cluster").await?;
        let applied = cluster.node(2).metric(APPLIED).await;
        (status["entities_here"].as_u64()? > 0 && applied > 0.0).then_some(())
    })
    .await;
    cluster.acked_at_least(0, 2_000.0).await;
    let resent_before = cluster.node(0).metric(RESENDS).await;
    cluster.kill(2).await;
    assert!(
        cluster.node(0).metric(ACKED).await < 10_000.0,
        "the kill must come mid-run"
    );
    let publishing = publish_in_background(orders, 20_000);
    // What n3 held unconfirmed is sent again, to the products' new homes, before n3 is back.
    cluster.converged(&NODES[..2]).await;
    let resent = eventually("n1 to resend what n3 held", DRAIN, || async {
        let resent = cluster.node(0).metric(RESENDS).await;
        (resent > resent_before).then_some(resent)
    })
    .await;
    eprintln!(
        "after the SIGKILL of n3: {} orders resent",
        resent - resent_before
    );
    let orders = publishing.await.expect("publishing finished");
    cluster.nodes[2] = Some(cluster.launch(2).await);
    cluster.converged(&NODES).await;
    cluster.assert_everything_applied_once(&orders).await;
    // The products' new homes had loaded what n3 stored: at most what was in flight came
    // twice.
    cluster.assert_duplicates_at_most(max_in_flight()).await;
    let acked = cluster.assert_only_n1_acked().await;
    assert_eq!(acked["n1"], 30_000.0, "{acked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_of_the_singleton_holder_hands_over_without_a_second_redelivery() {
    // A SIGTERM stops the bridge only once the node has announced it is leaving (about a
    // second): 20 ms products and 20,000 orders keep work in the queue past that (1 and 5 ms
    // products finished everything in between once settled deliveries stopped holding
    // in-flight slots).
    let mut cluster = Cluster::start("stop-singleton", &["--processing-delay-ms", "20"]).await;
    assert_eq!(cluster.bridge_holder().await, 0);
    let mut orders = Orders::new(&cluster.queue, 100);
    orders.publish(20_000).await;
    cluster.acked_at_least(0, 1_000.0).await;
    assert!(
        cluster.node(0).metric(ACKED).await < 20_000.0,
        "the stop must come mid-run"
    );

    let holder = cluster.nodes[0].take().expect("n1 runs");
    let stopped = Instant::now();
    let status = holder.terminate().await;
    eprintln!(
        "graceful stop of the singleton holder took {:?}",
        stopped.elapsed()
    );
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    let new_holder = cluster.bridge_holder().await;
    assert_ne!(new_holder, 0);
    cluster.assert_everything_applied_once(&orders).await;
    // n1 stopped with work left: the new holder took over the rest of the queue.
    let taken_over = cluster.node(new_holder).metric(ACKED).await;
    assert!(taken_over > 0.0, "the new holder acked nothing");

    // Only deliveries the broker had pushed and the bridge had not taken went back, once,
    // when n1 closed its channel: what it had taken was finished and acked first, so no
    // order reached a product twice.
    let redelivered = cluster.metric("warren_redelivered_total").await;
    let duplicates = cluster.metric("warren_entity_duplicates_total").await;
    eprintln!(
        "after the handover: {taken_over} acked by the new holder, {redelivered} redelivered, \
         {duplicates} duplicates"
    );
    assert!(
        redelivered <= prefetch(),
        "{redelivered} redelivered, more than one prefetch"
    );
    assert_eq!(duplicates, 0.0, "an order reached its product twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_waits_in_the_broker_while_slow_products_on_three_nodes_work() {
    // 50 ms per order and 25 in flight: at most 500 orders a second leave the backlog, whatever
    // the machine's load (in-flight work is what is with the products). Publishing the 20,000
    // runs at 1,000-3,000 a second here, so 10,000 or more stay ready after it, for 10 s of
    // sampling at 500 a second (a sample takes about a second: rabbitmqctl), and they drain in
    // 40 s or more. (At 50 in flight a CI run published slower than the bridge drained.)
    const IN_FLIGHT: &str = "25";
    const PREFETCH: u64 = 100;
    let cluster = Cluster::start(
        "cluster-backpressure",
        &[
            "--processing-delay-ms",
            "50",
            "--max-in-flight",
            IN_FLIGHT,
            "--prefetch",
            &PREFETCH.to_string(),
        ],
    )
    .await;
    let mut orders = Orders::new(&cluster.queue, 100);
    // Warmed up before the backlog arrives (waiting for it with the backlog already there let
    // a fast bridge drain it first): every product has run and every node hosts some.
    orders.publish(300).await;
    cluster.acked_at_least(0, 300.0).await;
    for (name, node) in NODES.iter().zip(cluster.running()) {
        eventually(&format!("{name} to host products"), DRAIN, || async {
            let status = node.get("/cluster").await?;
            (status["entities_here"].as_u64()? > 0).then_some(())
        })
        .await;
    }
    // 3 KiB of padding each: pulled into the nodes, 20,000 would add ~60 MiB.
    orders.publish_padded(20_000, 3 * 1024).await;
    let baseline: Vec<u64> = cluster.running().map(Consumer::rss_kib).collect();
    let mut peak = baseline.clone();
    let mut max_unacked = 0;
    let until = Instant::now() + Duration::from_secs(10);
    let mut samples = 0;
    // A sample every half second: each asks rabbitmqctl, which costs a core for a moment.
    // Sampled while the backlog lasts, for 10 s at most.
    let mut every = tokio::time::interval(Duration::from_millis(500));
    while Instant::now() < until {
        every.tick().await;
        let counts = cluster.queue.counts().await;
        max_unacked = max_unacked.max(counts.unacked);
        if counts.ready < 5_000 {
            break;
        }
        for (peak, node) in peak.iter_mut().zip(cluster.running()) {
            *peak = (*peak).max(node.rss_kib());
        }
        samples += 1;
    }
    let acked = cluster.metric(ACKED).await;
    eprintln!(
        "backpressure on 3 nodes: {samples} samples, max unacked {max_unacked}, {acked} acked, rss KiB {baseline:?} → peak {peak:?}"
    );
    assert!(
        samples >= 5,
        "the backlog must wait in the broker while sampled"
    );
    assert!(
        max_unacked <= PREFETCH,
        "broker unacked {max_unacked} exceeded the prefetch {PREFETCH}"
    );
    for ((node, before), after) in NODES.iter().zip(&baseline).zip(&peak) {
        let growth_mib = (*after as f64 - *before as f64) / 1024.0;
        assert!(
            growth_mib < 16.0,
            "{node} grew by {growth_mib:.1} MiB while a 60 MiB backlog waited"
        );
    }
    // The backlog drains, each order applied once, by the products wherever they live.
    cluster.assert_everything_applied_once(&orders).await;
    let acked = cluster.assert_only_n1_acked().await;
    assert_eq!(acked["n1"], 20_300.0, "{acked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_closed_broker_connection_on_the_cluster_resumes_and_loses_nothing() {
    // 20 ms per order and 20 in flight: about 1,000 orders a second at best, so the 20,000
    // outlast publishing them and the seconds rabbitmqctl takes to find and close the
    // connection (at 100 in flight a CI run drained them first).
    const PREFETCH: f64 = 80.0;
    let cluster = Cluster::start(
        "cluster-connection-loss",
        &[
            "--processing-delay-ms",
            "20",
            "--max-in-flight",
            "20",
            "--prefetch",
            "80",
        ],
    )
    .await;
    let mut orders = Orders::new(&cluster.queue, 100);
    orders.publish(20_000).await;
    cluster.acked_at_least(0, 1_000.0).await;
    support::close_connection(&cluster.node(0).connection_name).await;
    assert!(
        cluster.node(0).metric(ACKED).await < 19_000.0,
        "closed mid-run"
    );
    eventually("n1 to reconnect", DRAIN, || async {
        (cluster.node(0).metric("warren_amqp_reconnects_total").await >= 1.0).then_some(())
    })
    .await;
    cluster.assert_everything_applied_once(&orders).await;
    cluster.assert_duplicates_at_most(PREFETCH).await;
    cluster.assert_only_n1_acked().await;
}
