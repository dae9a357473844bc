//! The default entity store (embedded) on a real single node: SIGKILLed mid-run and started
//! again in the same working directory, with no flag naming a store and no database server,
//! every product ends with exactly the orders published for it, the ones applied before the
//! kill included, and the orders the broker redelivered are recognised instead of applied
//! twice; the same with products that snapshot every few orders and keep few order ids, so
//! that they recover from snapshots and recognise older redeliveries through the store. A
//! second node in the same folder is refused instead of sharing the file. Idle products go
//! dormant and take their next orders from the state they kept, without loading it again.

mod support;

use std::time::Duration;

use support::{Consumer, Orders, TestQueue, binary, eventually, message_count};

const DRAIN: Duration = Duration::from_secs(180);
const ACKED: &str = "warren_deliveries_total{outcome=\"acked\"}";
/// Entity tasks running (dormant products have none).
const ACTIVE: &str = "warren_entities_active";
/// Claims of a product by a new incarnation.
const CLAIMS: &str = "warren_entity_store_seconds_count{operation=\"claim\"}";

/// A fresh working directory for a node, removed when dropped.
fn work_dir(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("warren-test-{test}-"))
        .tempdir()
        .expect("a working directory")
}

/// A `warren.toml` holding `toml` in `dir`; its path, for `--config`.
fn config_file(dir: &tempfile::TempDir, toml: &str) -> String {
    let config = dir.path().join("warren.toml");
    std::fs::write(&config, toml).expect("a config file");
    config.to_string_lossy().into_owned()
}

#[tokio::test]
async fn a_single_node_sigkilled_mid_run_keeps_every_products_state_and_deduplication() {
    let dir = work_dir("embedded-kill");
    // No store flag: the default.
    let flags = ["--processing-delay-ms", "100"];
    killed_mid_run_and_started_again("embedded-kill", &dir, &flags).await;
    let file = dir.path().join("warren-data").join("entities-product.redb");
    assert!(
        file.is_file(),
        "{} is where the default keeps products",
        file.display()
    );
}

/// With a snapshot every 7 orders and 3 order ids kept, the node started again recovers each
/// product from its snapshot and the few orders after it, and the orders the broker redelivers
/// are mostly older than the 3 ids: the store recognises them.
#[tokio::test]
async fn products_recover_from_snapshots_and_the_store_recognises_older_redeliveries() {
    let dir = work_dir("embedded-snapshots");
    let config = config_file(&dir, "[product]\nsnapshot_every = 7\nrecent_orders = 3\n");
    let flags = ["--processing-delay-ms", "100", "--config", &config];
    let (first, second) =
        killed_mid_run_and_started_again("embedded-snapshots", &dir, &flags).await;
    assert!(first > 0.0, "no snapshot saved before the kill");
    assert!(second > 0.0, "no snapshot saved after the restart");
}

/// Runs 5,000 orders over 100 products at 100 ms each on a node in `dir` with `flags`,
/// SIGKILLs it after 1,000 acks, starts it again in the same folder, and asserts that each
/// order was applied exactly once, in order. Answers how many snapshots each run saved.
async fn killed_mid_run_and_started_again(
    test: &str,
    dir: &tempfile::TempDir,
    flags: &[&str],
) -> (f64, f64) {
    let saved = "warren_entity_store_seconds_count{operation=\"save_snapshot\"}";
    let queue = TestQueue::new(test);
    queue.declare().await;
    // 100 products at 100 ms an order: at most 1,000 orders a second, so the kill after 1,000
    // acks leaves seconds of the 5,000 to go.
    let first = Consumer::start_in(dir.path(), &queue, flags).await;
    let mut orders = Orders::new(&queue, 100);
    orders.publish(5_000).await;
    eventually("1,000 acks before the kill", DRAIN, || async {
        (first.metric(ACKED).await >= 1_000.0).then_some(())
    })
    .await;
    let applied_before = first.metric("warren_orders_applied_total").await;
    let saved_before = first.metric(saved).await;
    assert!(applied_before < 5_000.0, "the kill must come mid-run");
    first.kill().await;

    let second = Consumer::start_in(dir.path(), &queue, flags).await;
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
    (saved_before, second.metric(saved).await)
}

/// Two nodes on one data folder would share products' records without sharing their claims:
/// the second is refused at start, naming the setting, and the first keeps consuming.
#[tokio::test]
async fn a_second_node_on_the_same_data_dir_is_refused_naming_it() {
    let dir = work_dir("embedded-shared");
    let queue = TestQueue::new("embedded-shared");
    queue.declare().await;
    let first = Consumer::start_in(dir.path(), &queue, &[]).await;
    let second = tokio::process::Command::new(binary("warren-consumer"))
        .current_dir(dir.path())
        .args(["--uri", &queue.amqp().uri, "--queue", &queue.name])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), second)
        .await
        .expect("the second node exits by itself")
        .expect("warren-consumer runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the second node ran: {stderr}");
    assert!(
        stderr.contains("in use by another process") && stderr.contains("data_dir"),
        "the refusal names the folder's setting: {stderr}"
    );
    let mut orders = Orders::new(&queue, 5);
    orders.publish(50).await;
    queue.wait_drained(DRAIN).await;
    orders.assert_applied_exactly_once_in_order(&first).await;
    drop(first);
    drop(dir);
}

/// Products quiet for 300 ms go dormant (no task left); their next orders start them from the
/// state they kept: no new claim or load, and every order applied once on top of the earlier.
#[tokio::test]
async fn idle_products_go_dormant_and_go_on_from_their_state_without_loading_it() {
    const LOADS: &str = "warren_entity_store_seconds_count{operation=\"load\"}";
    let dir = work_dir("embedded-dormant");
    let config = config_file(&dir, "[cluster.region]\nhibernate_after = \"300ms\"\n");
    let queue = TestQueue::new("embedded-dormant");
    queue.declare().await;
    let node = Consumer::start_in(dir.path(), &queue, &["--config", &config]).await;
    let mut orders = Orders::new(&queue, 20);
    let dormant = || async { (node.metric(ACTIVE).await == 0.0).then_some(()) };
    orders.publish(200).await;
    queue.wait_drained(DRAIN).await;
    eventually("every product dormant", DRAIN, dormant).await;
    let (claims, loads) = (node.metric(CLAIMS).await, node.metric(LOADS).await);
    assert_eq!(claims, 20.0, "one claim per product");

    orders.publish(200).await;
    queue.wait_drained(DRAIN).await;
    eventually("every product dormant again", DRAIN, dormant).await;
    assert_eq!(
        node.metric(CLAIMS).await,
        claims,
        "a dormant product claimed again"
    );
    assert_eq!(
        node.metric(LOADS).await,
        loads,
        "a dormant product loaded again"
    );
    assert_eq!(message_count(&queue.dlq()).await, 0, "dead letters");
    orders.assert_applied_exactly_once_in_order(&node).await;
    assert_eq!(node.metric("warren_orders_applied_total").await, 400.0);
}

/// A dormant product the region passivates is stopped at once, and the region hears it: it
/// stops counting the product, and the product's next order starts it anew from the store.
#[tokio::test]
async fn dormant_products_are_passivated_and_start_again_from_the_store() {
    let dir = work_dir("embedded-dormant-passivated");
    let config = config_file(
        &dir,
        "[cluster.region]\nhibernate_after = \"200ms\"\npassivate_after = \"5s\"\n",
    );
    let queue = TestQueue::new("embedded-dormant-passivated");
    queue.declare().await;
    let node = Consumer::start_in(dir.path(), &queue, &["--config", &config]).await;
    let mut orders = Orders::new(&queue, 20);
    let hosted = || async { node.get("/cluster").await?["entities_here"].as_u64() };
    orders.publish(200).await;
    queue.wait_drained(DRAIN).await;
    // Dormant well before it is passivated: no task runs, the region still hosts all 20.
    eventually("every product dormant", DRAIN, || async {
        let dormant = node.metric(ACTIVE).await == 0.0;
        (dormant && hosted().await? == 20).then_some(())
    })
    .await;
    eventually("every product passivated", DRAIN, || async {
        (hosted().await? == 0).then_some(())
    })
    .await;
    assert_eq!(node.metric(CLAIMS).await, 20.0, "one claim per product");

    orders.publish(200).await;
    queue.wait_drained(DRAIN).await;
    assert_eq!(
        node.metric(CLAIMS).await,
        40.0,
        "a passivated product starts with a claim of its own"
    );
    assert_eq!(message_count(&queue.dlq()).await, 0, "dead letters");
    orders.assert_applied_exactly_once_in_order(&node).await;
    assert_eq!(node.metric("warren_orders_applied_total").await, 400.0);
}
