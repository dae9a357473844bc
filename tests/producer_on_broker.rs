//! The producer side on a real broker: the `warren-producer` binary end to end, and the
//! confirmed publisher's at-least-once promise across a broker-forced connection close.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use lapin::options::BasicGetOptions;
use lapin::types::ShortString;
use support::{Orders, TestQueue, binary, close_connection, eventually};
use warren::order::CreateOrder;

#[tokio::test]
async fn the_producer_binary_publishes_exactly_the_requested_count_and_reports_it() {
    let queue = TestQueue::new("producer-binary");
    let output = tokio::process::Command::new(binary("warren-producer"))
        .args([
            "--queue",
            &queue.name,
            "--count",
            "500",
            "--rate",
            "0",
            "--products",
            "a,b",
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "exit {:?}: {stdout}",
        output.status
    );
    assert!(
        stdout.contains("published 500 orders: 500 confirmed, 0 returned"),
        "summary line: {stdout}"
    );
    let counts = queue.counts().await;
    assert_eq!(counts.ready, 500);
}

#[tokio::test]
async fn unconfirmed_messages_are_republished_after_a_forced_close() {
    let queue = TestQueue::new("republish");
    queue.declare().await;
    let total = 40_000;
    let mut orders = Orders::new(&queue, 10);
    let publishing = tokio::spawn(async move {
        orders.publish(total).await;
        orders
    });
    eventually(
        "publishing to be under way",
        Duration::from_secs(60),
        || async { (queue.counts().await.ready >= 2_000).then_some(()) },
    )
    .await;
    close_connection(&format!("{}-publisher", queue.name)).await;
    let orders = publishing.await.unwrap();
    let stats = orders.stats();
    assert_eq!(
        stats.reconnects, 1,
        "the close happened while publishing: {stats:?}"
    );
    eprintln!("republish: {stats:?}");

    // Every accepted order is in the queue at least once (duplicates are allowed).
    let connection = queue.amqp().connect("warren-test-drain").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut seen = HashSet::new();
    let mut messages = 0;
    while let Some(message) = channel
        .basic_get(
            ShortString::from(queue.name.as_str()),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        messages += 1;
        let order: CreateOrder = serde_json::from_slice(&message.delivery.data).unwrap();
        seen.insert(order.order_id);
    }
    let published: HashSet<warren::order::OrderId> = orders
        .published
        .values()
        .flatten()
        .map(|(id, _)| (*id).into())
        .collect();
    assert_eq!(published.len(), total);
    assert!(
        published.is_subset(&seen),
        "{} accepted orders missing from the queue",
        published.difference(&seen).count()
    );
    assert!(messages >= total);
}
