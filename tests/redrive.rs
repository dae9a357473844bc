//! The dead-letter redrive on a real broker and database: `warren-consumer dlq inspect` lists
//! what the bridge dead-lettered with each reason, and `dlq replay` brings back the orders that
//! failed while refusing the ones that would only be dead-lettered again (unless forced, and
//! then once per walk).

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::{Consumer, Orders, TestDb, TestQueue, binary, eventually};

const DRAIN: Duration = Duration::from_secs(120);

/// Runs `warren-consumer dlq …` on `queue` and returns its stdout; panics unless it succeeded.
async fn dlq(queue: &TestQueue, args: &[&str]) -> String {
    let output = tokio::process::Command::new(binary("warren-consumer"))
        .arg("dlq")
        .args(args)
        .args(["--uri", &queue.amqp().uri, "--queue", &queue.name])
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("warren-consumer runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "dlq {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test]
async fn failed_orders_are_replayed_once_and_undecodable_ones_stay_dead_lettered() {
    let queue = TestQueue::new("redrive");
    queue.declare().await;
    let db = TestDb::create("redrive").await;
    let store = db.url();
    // Every attempt fails and one attempt is all there is: every good order is dead-lettered
    // by its product, every bad one by the bridge.
    let failing = Consumer::start(
        &queue,
        &[
            "--entity-store",
            &store,
            "--failure-rate",
            "1",
            "--max-attempts",
            "1",
        ],
    )
    .await;
    let mut orders = Orders::new(&queue, 10);
    orders.publish(50).await;
    let bad: BTreeSet<Vec<u8>> = (0..50)
        .map(|i| format!("not an order {i}").into_bytes())
        .collect();
    for body in &bad {
        orders.raw(body.clone()).await;
    }
    orders.flush().await;
    eventually("100 dead letters", DRAIN, || async {
        (queue.dlq_counts().await.ready == 100).then_some(())
    })
    .await;
    queue.wait_drained(DRAIN).await;
    assert!(failing.terminate().await.success());

    let listing = dlq(&queue, &["inspect"]).await;
    assert!(listing.contains("100 dead letters listed"), "{listing}");
    assert!(listing.contains("     50  malformed message"), "{listing}");
    assert!(
        listing.contains("     50  processing failed after 1 attempts"),
        "{listing}"
    );
    assert_eq!(queue.dlq_counts().await.ready, 100, "inspecting keeps them");

    let consumer = Consumer::start(&queue, &["--entity-store", &store]).await;
    let some = dlq(
        &queue,
        &["replay", "--reason", "processing failed", "--count", "20"],
    )
    .await;
    assert!(some.starts_with("replayed 20,"), "{some}");
    let rest = dlq(&queue, &["replay", "--all"]).await;
    assert!(
        rest.contains("replayed 30, kept 50 refused and 0 not selected"),
        "{rest}"
    );
    assert_eq!(rest.matches("would be dead-lettered again").count(), 50);

    queue.wait_drained(DRAIN).await;
    orders.assert_applied_exactly_once(&consumer).await;

    // Forced, the undecodable ones go back to the queue and are dead-lettered again at once,
    // while the walk is still going: it replays each once, not again from the DLQ's tail.
    let forced = dlq(&queue, &["replay", "--all", "--force"]).await;
    assert!(
        forced.starts_with("replayed 50, kept 0 refused"),
        "{forced}"
    );
    eventually("the forced ones dead-lettered again", DRAIN, || async {
        (queue.dlq_counts().await.ready == 50).then_some(())
    })
    .await;
    let listing = dlq(&queue, &["inspect"]).await;
    assert_eq!(listing.matches("replayed 1 times").count(), 50, "{listing}");
    let letters = queue.take_dead_letters().await;
    let left: BTreeSet<Vec<u8>> = letters.iter().map(|(body, _)| body.clone()).collect();
    assert_eq!(left, bad, "exactly the undecodable ones stay");
    assert!(
        letters
            .iter()
            .all(|(_, reason)| reason.starts_with("malformed message")),
        "{letters:?}"
    );
}
