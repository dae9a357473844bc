//! The embedded entity store on a real single node: SIGKILLed mid-run and started again on the
//! same data directory, with no database server, every product ends with exactly the orders
//! published for it, the ones applied before the kill included, and the orders the broker
//! redelivered are recognised instead of applied twice.

mod support;

use std::time::Duration;

use support::{Consumer, Orders, TestQueue, eventually, message_count, path};

const DRAIN: Duration = Duration::from_secs(180);
const ACKED: &str = "warren_deliveries_total{outcome=\"acked\"}";

#[tokio::test]
async fn a_single_node_sigkilled_mid_run_keeps_every_products_state_and_deduplication() {
    let data = std::env::temp_dir().join(format!(
        "warren-test-embedded-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let queue = TestQueue::new("embedded-kill");
    queue.declare().await;
    // 100 products at 100 ms an order: at most 1,000 orders a second, so the kill after 1,000
    // acks leaves seconds of the 5,000 to go.
    let flags = [
        "--entity-store",
        "embedded",
        "--data-dir",
        path(&data),
        "--processing-delay-ms",
        "100",
    ];
    let first = Consumer::start(&queue, &flags).await;
    let mut orders = Orders::new(&queue, 100);
    orders.publish(5_000).await;
    eventually("1,000 acks before the kill", DRAIN, || async {
        (first.metric(ACKED).await >= 1_000.0).then_some(())
    })
    .await;
    let applied_before = first.metric("warren_orders_applied_total").await;
    assert!(applied_before < 5_000.0, "the kill must come mid-run");
    first.kill().await;

    let second = Consumer::start(&queue, &flags).await;
    queue.wait_drained(DRAIN).await;
    assert_eq!(message_count(&queue.dlq()).await, 0, "dead letters");
    // Totals and order lists hold what was applied before the kill too: loaded from the file.
    orders.assert_applied_exactly_once_in_order(&second).await;
    let applied_after = second.metric("warren_orders_applied_total").await;
    // Each order applied once over both runs: what the first run applied after the metric
    // was read only lowers what is left for the second.
    assert!(
        applied_after <= 5_000.0 - applied_before,
        "the second run applied {applied_after} after {applied_before}: some twice"
    );
    std::fs::remove_dir_all(&data).expect("data directory removed");
}
