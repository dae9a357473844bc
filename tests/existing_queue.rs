//! `amqp.declare = "passive"`: Warren attaches to a queue that operations manage, like the one
//! the original .NET sample declares (durable, classic, no arguments), takes it as it is, and
//! still dead-letters what it cannot use, to a queue of its own.

mod support;

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{FieldTable, ShortString};
use support::{Consumer, Orders, TestQueue, binary, eventually, queue_description};
use warren::amqp::DeclareMode;

const WAIT: Duration = Duration::from_secs(60);

/// A queue of this test's, set to be attached to rather than declared.
fn existing(test: &str) -> TestQueue {
    let mut queue = TestQueue::new(test);
    queue.declare = DeclareMode::Passive;
    queue
}

/// Declares `queue` as the original sample does: durable, not exclusive, no arguments.
async fn declare_like_the_sample(queue: &TestQueue) {
    let connection = queue.amqp().connect("warren-test-sample").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            ShortString::from(queue.name.as_str()),
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap();
    connection.close(200, "declared".into()).await.unwrap();
}

#[tokio::test]
async fn a_queue_declared_elsewhere_without_arguments_is_consumed_as_it_is() {
    let queue = existing("passive");
    declare_like_the_sample(&queue).await;
    let before = queue_description(&queue.name).await;
    let consumer = Consumer::start(&queue, &[]).await;
    let mut orders = Orders::new(&queue, 10);
    orders.publish(300).await;
    orders.raw(b"not json".to_vec()).await;
    queue.wait_drained(WAIT).await;
    orders.assert_applied_exactly_once(&consumer).await;

    // What Warren could not use went to the dead-letter queue it declared, with the reason.
    let letters = eventually("the dead letter", WAIT, || async {
        let letters = queue.take_dead_letters().await;
        (!letters.is_empty()).then_some(letters)
    })
    .await;
    assert_eq!(letters.len(), 1);
    assert!(letters[0].1.starts_with("malformed message"), "{letters:?}");
    // The queue is as operations declared it: no argument imposed, nothing redeclared.
    assert_eq!(queue_description(&queue.name).await, before);
    assert!(!before.contains("x-"), "{before}");
    // And the node said what it cannot count on.
    let log = std::fs::read_to_string(&consumer.log).unwrap();
    assert!(
        log.contains("the bridge singleton is the only fence"),
        "{}",
        consumer.log_tail()
    );
}

#[tokio::test]
async fn a_missing_queue_is_refused_clearly_and_consumed_once_it_exists() {
    let queue = existing("passive-missing");
    // The producer cannot publish into a queue that is not there: it stops and says why.
    let producer = tokio::process::Command::new(binary("warren-producer"))
        .args(["--uri", &queue.amqp().uri, "--queue", &queue.name])
        .args(["--declare", "passive", "--count", "1"])
        .output()
        .await
        .expect("warren-producer runs");
    let stderr = String::from_utf8_lossy(&producer.stderr);
    assert!(!producer.status.success(), "{stderr}");
    assert!(stderr.contains("does not exist in this vhost"), "{stderr}");

    // The consumer keeps waiting for it, saying why, and creates nothing meanwhile.
    let consumer = Consumer::launch(&queue, &[], &[]).await;
    eventually("the consumer to report the missing queue", WAIT, || async {
        let log = std::fs::read_to_string(&consumer.log).unwrap_or_default();
        log.contains("does not exist in this vhost").then_some(())
    })
    .await;
    assert_eq!(queue_description(&queue.name).await, "");

    declare_like_the_sample(&queue).await;
    eventually("the consumer to consume the queue", WAIT, || async {
        (queue.counts().await.consumers == 1).then_some(())
    })
    .await;
}
