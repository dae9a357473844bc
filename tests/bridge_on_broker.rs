//! The walking skeleton on a real broker: the real `warren-consumer` binary, real persistent
//! messages with publisher confirms, and broker-side counts read live from `rabbitmqctl`.
//! Each test uses its own queue and deletes it afterwards.

mod support;

use std::time::Duration;

use support::{
    Consumer, Orders, TestQueue, close_connection, eventually, message_count, queue_description,
};

const DRAIN: Duration = Duration::from_secs(180);

#[tokio::test]
async fn a_message_stays_unacked_until_its_entity_confirms_and_survives_a_sigkill() {
    let queue = TestQueue::new("ack-after-confirm");
    queue.declare().await;
    let slow = Consumer::start(
        &queue,
        &[
            "--processing-delay-ms",
            "600000",
            "--processing-deadline",
            "20m",
        ],
    )
    .await;
    let mut orders = Orders::new(&queue, 1);
    orders.publish(1).await;

    // The entity is still working: the broker holds the message as unacked, nothing is ready.
    eventually("the message to be unacked at the broker", DRAIN, || async {
        let counts = queue.counts().await;
        (counts.unacked == 1 && counts.ready == 0).then_some(())
    })
    .await;
    assert_eq!(
        slow.metric("warren_deliveries_total{outcome=\"acked\"}")
            .await,
        0.0
    );
    slow.kill().await;

    // SIGKILL before the confirm: the broker has the message back and a new consumer applies it.
    let fresh = Consumer::start(&queue, &[]).await;
    queue.wait_drained(DRAIN).await;
    orders.assert_applied_exactly_once_in_order(&fresh).await;
    assert_eq!(fresh.metric("warren_redelivered_total").await, 1.0);
    assert_eq!(
        fresh
            .metric("warren_deliveries_total{outcome=\"acked\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_backlog_waits_in_the_broker_not_in_consumer_memory() {
    const PREFETCH: u64 = 40;
    let queue = TestQueue::new("backpressure");
    queue.declare().await;
    let mut orders = Orders::new(&queue, 10);
    // 4 KiB of padding each: if the backlog were pulled into the consumer it would add ~20 MiB.
    orders.publish_padded(5_000, 4096).await;
    assert_eq!(queue.counts().await.ready, 5_000);

    let consumer = Consumer::start(
        &queue,
        &[
            "--processing-delay-ms",
            "15",
            "--max-in-flight",
            "20",
            "--prefetch",
            &PREFETCH.to_string(),
        ],
    )
    .await;
    let baseline_rss = consumer.rss_kib();
    let mut samples = 0;
    let mut max_unacked = 0;
    let mut max_rss = baseline_rss;
    let mut saw_backlog_waiting = false;
    let mut max_in_flight: f64 = 0.0;
    loop {
        let counts = queue.counts().await;
        max_unacked = max_unacked.max(counts.unacked);
        max_in_flight = max_in_flight.max(consumer.metric("warren_in_flight").await);
        max_rss = max_rss.max(consumer.rss_kib());
        saw_backlog_waiting |= counts.ready > 1_000 && counts.unacked > 0;
        samples += 1;
        if counts.ready == 0 && counts.unacked == 0 {
            break;
        }
        assert!(samples < 1_000, "the queue did not drain");
    }
    let growth_mib = (max_rss - baseline_rss) as f64 / 1024.0;
    eprintln!(
        "backpressure: {samples} samples, max unacked {max_unacked}, rss {baseline_rss} KiB → max {max_rss} KiB (+{growth_mib:.1} MiB)"
    );
    assert!(
        saw_backlog_waiting,
        "the backlog should wait as ready in the broker"
    );
    assert!(
        max_unacked <= PREFETCH,
        "broker unacked {max_unacked} exceeded the prefetch {PREFETCH}"
    );
    assert!(
        growth_mib < 8.0,
        "consumer memory grew by {growth_mib:.1} MiB while a 20 MiB backlog waited"
    );
    // Sampled while the backlog drained: the bridge's own bound, not the broker's prefetch.
    assert!(
        max_in_flight > 0.0 && max_in_flight <= 20.0,
        "in flight peaked at {max_in_flight}"
    );
    orders.assert_applied_exactly_once_in_order(&consumer).await;
}

/// An orchestrator's probes on the node that consumes: live, and ready because it is Up and
/// connected to the broker it consumes from.
#[tokio::test]
async fn the_consuming_node_is_live_and_ready() {
    let queue = TestQueue::new("probes");
    queue.declare().await;
    let consumer = Consumer::start(&queue, &[]).await;
    let live = consumer.get("/livez").await.expect("/livez answers 200");
    assert_eq!(live["status"], "live", "{live}");
    let ready = consumer.get("/readyz").await.expect("/readyz answers 200");
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["consuming_here"], true, "{ready}");
    assert_eq!(ready["amqp_connected"], true, "{ready}");
}

#[tokio::test]
async fn twenty_thousand_orders_drain_with_an_exactly_once_effect() {
    let queue = TestQueue::new("drain");
    queue.declare().await;
    let consumer = Consumer::start(&queue, &[]).await;
    let mut orders = Orders::new(&queue, 100);
    orders.publish(20_000).await;
    queue.wait_drained(DRAIN).await;
    assert_eq!(
        message_count(&queue.dlq()).await,
        0,
        "nothing dead-lettered"
    );
    orders.assert_applied_exactly_once_in_order(&consumer).await;
    assert_eq!(
        consumer
            .metric("warren_deliveries_total{outcome=\"acked\"}")
            .await,
        20_000.0
    );
    assert_eq!(
        consumer.metric("warren_orders_applied_total").await,
        20_000.0
    );
    // Per-order lines are DEBUG: at the default level 20,000 orders leave a short log.
    let log = std::fs::read_to_string(&consumer.log).expect("consumer log");
    let lines = log.lines().count();
    assert!(lines < 100, "{lines} log lines for 20,000 orders");
}

#[tokio::test]
async fn transient_failures_are_retried_in_place_so_each_product_keeps_publish_order() {
    let queue = TestQueue::new("failures");
    queue.declare().await;
    let consumer =
        Consumer::start(&queue, &["--failure-rate", "0.3", "--max-attempts", "40"]).await;
    let mut orders = Orders::new(&queue, 20);
    orders.publish(3_000).await;
    queue.wait_drained(DRAIN).await;
    assert_eq!(
        message_count(&queue.dlq()).await,
        0,
        "no message ran out of attempts"
    );
    orders.assert_applied_exactly_once_in_order(&consumer).await;
    let retries = consumer.metric("warren_entity_retries_total").await;
    assert!(
        retries > 500.0,
        "failures were simulated and retried ({retries})"
    );
}

#[tokio::test]
async fn bad_input_is_dead_lettered_with_a_reason_and_the_good_messages_around_it_flow() {
    let queue = TestQueue::new("bad-input");
    queue.declare().await;
    let consumer = Consumer::start(&queue, &["--max-message-bytes", "1024"]).await;
    let mut orders = Orders::new(&queue, 3);
    let id = uuid::Uuid::new_v4();
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"order_id\": oops".to_vec(), "malformed message"),
        (
            format!(
                r#"{{"order_id":"{id}","customer_id":"c","product_id":"p0","quantity":1,"padding":"{}"}}"#,
                "x".repeat(2048)
            )
            .into_bytes(),
            "exceeds max_message_bytes (1024)",
        ),
        (
            format!(r#"{{"order_id":"{id}","customer_id":"c","quantity":1}}"#).into_bytes(),
            "missing product_id",
        ),
        (
            format!(r#"{{"order_id":"{id}","customer_id":"c","product_id":"","quantity":1}}"#)
                .into_bytes(),
            "missing product_id",
        ),
        (
            br#"{"order_id":"","customer_id":"c","product_id":"p0","quantity":1}"#.to_vec(),
            "order_id is empty",
        ),
    ];
    for (body, _) in &bad {
        orders.publish(10).await;
        orders.raw(body.clone()).await;
    }
    // Most producers' order ids are not UUIDs; such an order flows like any other.
    orders
        .raw(
            br#"{"OrderId":"ORD-1001","CustomerId":"c","ProductId":"text-ids","Quantity":4}"#
                .to_vec(),
        )
        .await;
    orders.publish(10).await;
    queue.wait_drained(DRAIN).await;
    orders.assert_applied_exactly_once_in_order(&consumer).await;
    let product = consumer
        .get("/products/text-ids")
        .await
        .expect("the product answers");
    assert_eq!(
        product["recent_orders"],
        serde_json::json!(["ORD-1001"]),
        "{product}"
    );
    assert_eq!(product["total_quantity"], 4, "{product}");

    let mut letters = queue.take_dead_letters().await;
    assert_eq!(
        letters.len(),
        bad.len(),
        "each bad message dead-lettered once"
    );
    letters.sort();
    let mut expected = bad.clone();
    expected.sort();
    for ((body, reason), (expected_body, expected_reason)) in letters.iter().zip(&expected) {
        assert_eq!(body, expected_body, "the original body is kept");
        assert!(
            reason.contains(expected_reason),
            "reason {reason:?} should contain {expected_reason:?}"
        );
    }
    assert_eq!(
        consumer
            .metric("warren_deliveries_total{outcome=\"dead_lettered\"}")
            .await,
        bad.len() as f64
    );
}

#[tokio::test]
async fn a_message_that_keeps_failing_is_dead_lettered_with_the_entity_error() {
    let queue = TestQueue::new("give-up");
    queue.declare().await;
    let consumer = Consumer::start(&queue, &["--failure-rate", "1", "--max-attempts", "3"]).await;
    let mut orders = Orders::new(&queue, 2);
    orders.publish(6).await;
    queue.wait_drained(DRAIN).await;
    let letters = queue.take_dead_letters().await;
    assert_eq!(letters.len(), 6);
    for (_, reason) in &letters {
        assert_eq!(
            reason,
            "processing failed after 3 attempts: simulated transient failure"
        );
    }
    assert_eq!(consumer.metric("warren_entity_retries_total").await, 12.0);
    assert_eq!(consumer.metric("warren_orders_applied_total").await, 0.0);
}

#[tokio::test]
async fn a_delivery_past_its_processing_deadline_is_requeued_and_applied_once() {
    let queue = TestQueue::new("deadline");
    queue.declare().await;
    let consumer = Consumer::start(
        &queue,
        &[
            "--processing-delay-ms",
            "1500",
            "--processing-deadline",
            "1s",
        ],
    )
    .await;
    let mut orders = Orders::new(&queue, 1);
    orders.publish(1).await;
    // The first attempt outlives its deadline: nacked with requeue, redelivered, and the copy
    // is recognised as a duplicate once the original is applied.
    eventually("the redelivered copy to be ignored", DRAIN, || async {
        (consumer.metric("warren_entity_duplicates_total").await >= 1.0).then_some(())
    })
    .await;
    assert!(
        consumer
            .metric("warren_deliveries_total{outcome=\"requeued\"}")
            .await
            >= 1.0
    );
    assert!(consumer.metric("warren_redelivered_total").await >= 1.0);
    orders.assert_applied_exactly_once_in_order(&consumer).await;
}

#[tokio::test]
async fn a_force_closed_connection_is_rebuilt_and_nothing_is_lost() {
    let queue = TestQueue::new("connection-loss");
    queue.declare().await;
    let mut orders = Orders::new(&queue, 20);
    orders.publish(10_000).await;
    let consumer = Consumer::start(&queue, &["--processing-delay-ms", "5"]).await;
    let acked_before = eventually("some orders to be acked", DRAIN, || async {
        let acked = consumer
            .metric("warren_deliveries_total{outcome=\"acked\"}")
            .await;
        (acked >= 1_000.0).then_some(acked)
    })
    .await;
    close_connection(&consumer.connection_name).await;
    assert!(
        acked_before < 9_000.0,
        "the connection must be closed mid-run ({acked_before} acked before)"
    );
    eventually("the consumer to reconnect", DRAIN, || async {
        (consumer.metric("warren_amqp_reconnects_total").await >= 1.0).then_some(())
    })
    .await;
    queue.wait_drained(DRAIN).await;
    assert_eq!(message_count(&queue.dlq()).await, 0);
    orders.assert_applied_exactly_once(&consumer).await;
    let status = consumer.terminate().await;
    assert!(status.success(), "graceful stop exits 0, got {status:?}");
}

#[tokio::test]
async fn a_quorum_queue_gets_a_delivery_limit_and_flows_the_same() {
    let queue = TestQueue::quorum("quorum");
    let consumer = Consumer::start(&queue, &[]).await;
    let description = queue_description(&queue.name).await;
    assert!(description.contains("quorum"), "{description}");
    assert!(description.contains("x-delivery-limit"), "{description}");
    assert!(
        description.contains("x-single-active-consumer"),
        "{description}"
    );

    let mut orders = Orders::new(&queue, 5);
    orders.publish(200).await;
    orders.raw(b"not json".to_vec()).await;
    orders.publish(200).await;
    // A quorum queue's counts reach `rabbitmqctl` on the broker's tick (every 5 s), so right
    // after publishing they may still read the empty queue: wait for the consumer's own count
    // of settled deliveries first.
    eventually("400 acked and 1 dead-lettered", DRAIN, || async {
        let acked = consumer
            .metric("warren_deliveries_total{outcome=\"acked\"}")
            .await;
        let dead = consumer
            .metric("warren_deliveries_total{outcome=\"dead_lettered\"}")
            .await;
        (acked == 400.0 && dead == 1.0).then_some(())
    })
    .await;
    queue.wait_drained(DRAIN).await;
    orders.assert_applied_exactly_once_in_order(&consumer).await;
    let letters = queue.take_dead_letters().await;
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].1.starts_with("malformed message"),
        "{:?}",
        letters[0].1
    );
}

#[tokio::test]
async fn sigterm_lets_in_flight_work_finish_and_be_acked_before_exiting() {
    let queue = TestQueue::new("graceful");
    queue.declare().await;
    let consumer = Consumer::start(&queue, &["--processing-delay-ms", "1500"]).await;
    let mut orders = Orders::new(&queue, 20);
    orders.publish(20).await;
    eventually("every order to be in processing", DRAIN, || async {
        (consumer.metric("warren_in_flight").await == 20.0).then_some(())
    })
    .await;
    let stopping = tokio::time::Instant::now();
    let log = consumer.log.clone();
    let status = consumer.terminate().await;
    assert!(status.success(), "exit {status:?}");
    let log = std::fs::read_to_string(log).unwrap_or_default();
    assert!(log.contains("in-flight work finished"), "{log}");
    assert_eq!(
        queue.counts().await,
        support::QueueCounts {
            ready: 0,
            unacked: 0,
            consumers: 0
        }
    );
    // Nothing ready (none requeued) and nothing dead-lettered: each of the 20 left the queue
    // by an ack. (The management API's ack count is no witness: its per-channel statistics
    // are lost when the channel closes before the next collection, so it may never show.)
    assert_eq!(message_count(&queue.dlq()).await, 0, "dead letters");
    eprintln!("drained and exited {:?} after SIGTERM", stopping.elapsed());
}

#[tokio::test]
async fn sigterm_with_a_stuck_entity_returns_its_message_at_the_shutdown_timeout() {
    let queue = TestQueue::new("stuck-stop");
    queue.declare().await;
    let consumer = Consumer::start(
        &queue,
        &[
            "--processing-delay-ms",
            "600000",
            "--processing-deadline",
            "20m",
            "--shutdown-timeout",
            "1s",
        ],
    )
    .await;
    let mut orders = Orders::new(&queue, 1);
    orders.publish(1).await;
    eventually("the message to be unacked", DRAIN, || async {
        (queue.counts().await.unacked == 1).then_some(())
    })
    .await;
    let stopping = tokio::time::Instant::now();
    let status = consumer.terminate().await;
    assert!(status.success(), "exit {status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(15),
        "stopped after {:?}",
        stopping.elapsed()
    );
    let counts = queue.counts().await;
    assert_eq!(
        (counts.ready, counts.unacked),
        (1, 0),
        "the message is back"
    );
}

/// A connection asks for 32 KiB frames (lapin keeps 32 frames of buffer each way, so RabbitMQ's
/// 128 KiB would hold 8 MiB per connection) unless its URI names a size.
#[tokio::test]
async fn connections_ask_for_small_frames_unless_the_uri_names_a_size() {
    let queue = TestQueue::new("frame-max");
    let amqp = queue.amqp();
    let connection = amqp.connect("warren-test-frames").await.unwrap();
    assert_eq!(connection.configuration().frame_max(), 32 * 1024);
    let _ = connection.close(200, "done".into()).await;
    let separator = if amqp.uri.contains('?') { '&' } else { '?' };
    let named = warren::amqp::AmqpSettings {
        uri: format!("{}{separator}frame_max=65536", amqp.uri),
        ..amqp
    };
    let connection = named.connect("warren-test-frames").await.unwrap();
    assert_eq!(connection.configuration().frame_max(), 65536);
    let _ = connection.close(200, "done".into()).await;
}
