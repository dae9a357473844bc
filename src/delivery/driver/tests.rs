//! The drivers end to end on paused time: docs/protocol.md, Test scenarios: RD-*, ESRD-*, and a
//! faulty link under the real tasks.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::*;
use crate::delivery::durable::memory::InMemoryQueue;
use crate::delivery::protocol::{ProducerId, SeqNr};
use crate::delivery::settings::{ConsumerSettings, ProducerSettings};

fn consumer_settings() -> ConsumerSettings {
    ConsumerSettings {
        flow_control_window: 20,
        resend_interval_min: Duration::from_millis(500),
        resend_interval_max: Duration::from_secs(2),
        only_flow_control: false,
    }
}

/// Consumes with an optional processing delay; reports `(seq_nr, message)` of every delivery.
fn consume<M: Clone + Send + Sync + 'static>(
    mut consumer: ConsumerHandle<M>,
    delay: Duration,
) -> (
    mpsc::UnboundedReceiver<(u64, M)>,
    JoinHandle<ConsumerHandle<M>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Some(delivery) = consumer.next().await {
            tokio::time::sleep(delay).await;
            if tx.send((delivery.seq_nr.0, delivery.message)).is_err() {
                break;
            }
            consumer.confirm();
        }
        consumer
    });
    (rx, task)
}

/// Takes and confirms `n` deliveries right here (the handle stays with the test).
async fn take(consumer: &mut ConsumerHandle<u32>, n: usize) -> Vec<u32> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let delivery = consumer.next().await.expect("consumer still running");
        got.push(delivery.message);
        consumer.confirm();
    }
    got
}

async fn receive<M>(rx: &mut mpsc::UnboundedReceiver<(u64, M)>, n: usize) -> Vec<M> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let (_, message) = rx.recv().await.expect("consumer still running");
        got.push(message);
    }
    got
}

/// A producer that waits for consumer registration, and a consumer that registers to it
/// (Akka's `RegisterToProducerController`).
fn registered_pair(
    producer_settings: ProducerSettings,
) -> (ProducerHandle<u32>, ConsumerHandle<u32>) {
    let (to_producer, producer_inbox) = channel_link(LINK_CAPACITY);
    let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
    let producer = ProducerBuilder::new(ProducerId::new("p"))
        .settings(producer_settings)
        .spawn(producer_inbox);
    let mut consumer = ConsumerBuilder::default()
        .settings(consumer_settings())
        .start(consumer_inbox, to_consumer);
    consumer.register_to_producer(producer.producer_ref().clone(), Arc::new(to_producer));
    (producer, consumer)
}

async fn produce(
    producer: &ProducerHandle<u32>,
    range: std::ops::RangeInclusive<u32>,
    delay: Duration,
) {
    for n in range {
        tokio::time::sleep(delay).await;
        producer.send(n).await.unwrap();
    }
}

// RD-01 (and NET-05, Akka.NET's point-to-point doc sample)
#[tokio::test(start_paused = true)]
async fn point_to_point_delivers_every_message_once_in_order() {
    let (producer, consumer) = registered_pair(ProducerSettings::default());
    let (mut rx, _task) = consume(consumer, Duration::ZERO);
    produce(&producer, 1..=42, Duration::ZERO).await;
    assert_eq!(receive(&mut rx, 42).await, (1..=42).collect::<Vec<_>>());
}

// RD-02
#[tokio::test(start_paused = true)]
async fn asking_returns_each_seq_nr_once_confirmed() {
    let (producer, consumer) = registered_pair(ProducerSettings::default());
    let (mut rx, _task) = consume(consumer, Duration::ZERO);
    let mut confirmed = Vec::new();
    for n in 1..=42 {
        confirmed.push(producer.ask(n).await.unwrap().0);
    }
    assert_eq!(confirmed, (1..=42).collect::<Vec<u64>>());
    assert_eq!(receive(&mut rx, 42).await, (1..=42).collect::<Vec<_>>());
}

// RD-03, RD-04, RD-05
#[tokio::test(start_paused = true)]
async fn slow_and_fast_producers_and_consumers_all_complete() {
    let slow = Duration::from_millis(30);
    for (producer_delay, consumer_delay) in [
        (slow, Duration::ZERO),
        (Duration::ZERO, slow),
        (Duration::ZERO, Duration::ZERO),
    ] {
        let (producer, consumer) = registered_pair(ProducerSettings::default());
        let (mut rx, _task) = consume(consumer, consumer_delay);
        produce(&producer, 1..=42, producer_delay).await;
        assert_eq!(receive(&mut rx, 42).await, (1..=42).collect::<Vec<_>>());
    }
}

// RD-06
#[tokio::test(start_paused = true)]
async fn a_replaced_consumer_takes_over_the_same_producer() {
    let (to_producer, producer_inbox) = channel_link(LINK_CAPACITY);
    let producer = ProducerBuilder::new(ProducerId::new("p")).spawn(producer_inbox);
    let to_producer: ProducerLink<u32> = Arc::new(to_producer);

    let (to_first, first_inbox) = channel_link(LINK_CAPACITY);
    let mut first = ConsumerBuilder::default()
        .settings(consumer_settings())
        .start(first_inbox, to_first);
    first.register_to_producer(producer.producer_ref().clone(), Arc::clone(&to_producer));
    let asking = async {
        for n in 1..=42 {
            producer.ask(n).await.unwrap();
        }
    };
    let (_, got) = tokio::join!(asking, take(&mut first, 42));
    assert_eq!(got, (1..=42).collect::<Vec<_>>());
    first.deliver_then_stop();
    assert!(first.next().await.is_none(), "the first consumer stops");
    assert_eq!(first.failure(), None, "cleanly");

    let (to_second, second_inbox) = channel_link(LINK_CAPACITY);
    let mut second = ConsumerBuilder::default()
        .settings(consumer_settings())
        .start(second_inbox, to_second);
    second.register_to_producer(producer.producer_ref().clone(), to_producer);
    let (mut rx, _task) = consume(second, Duration::ZERO);
    produce(&producer, 43..=84, Duration::ZERO).await;
    assert_eq!(receive(&mut rx, 42).await, (43..=84).collect::<Vec<_>>());
}

// RD-07
#[tokio::test(start_paused = true)]
async fn a_replaced_producer_starts_a_new_session_with_the_same_consumer() {
    let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
    let (to_producer, first_inbox) = channel_link(LINK_CAPACITY);
    let consumer = ConsumerBuilder::default()
        .settings(consumer_settings())
        .producer(Arc::new(to_producer))
        .start(consumer_inbox, to_consumer.clone());
    let (mut rx, _task) = consume(consumer, Duration::ZERO);
    let first = ProducerBuilder::new(ProducerId::new("p"))
        .consumer(Arc::new(to_consumer.clone()))
        .spawn(first_inbox);
    for n in 1..=2 {
        first.ask(n).await.unwrap();
    }
    drop(first);

    // The consumer's frames now go to the old controller's inbox; the new one is told about
    // the consumer by its handle (Akka: RegisterConsumer from the producer side).
    let (_to_second, second_inbox) = channel_link::<FromConsumer<u32>>(LINK_CAPACITY);
    let second = ProducerBuilder::new(ProducerId::new("p")).spawn(second_inbox);
    second
        .register_consumer(Arc::new(to_consumer))
        .await
        .unwrap();
    second.send(3).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(rx.recv().await.expect("consumer still running"));
    }
    assert_eq!(
        got,
        vec![(1, 1), (2, 2), (1, 3)],
        "the new session starts at seq nr 1, first"
    );
}

// The real tasks over a faulty link, both ways.
#[tokio::test(start_paused = true)]
async fn a_faulty_link_between_the_tasks_still_delivers_everything_in_order() {
    for seed in 0..20 {
        let faults = Faults {
            drop: 0.2,
            duplicate: 0.1,
            delay: 0.2,
            max_delay: Duration::from_millis(50),
        };
        let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
        let (to_producer, producer_inbox) = channel_link(LINK_CAPACITY);
        let faulty_to_consumer = Arc::new(FaultyLink::new(to_consumer.clone(), faults, seed));
        let faulty_to_producer = Arc::new(FaultyLink::new(to_producer, faults, seed + 1000));
        let producer = ProducerBuilder::new(ProducerId::new("p"))
            .consumer(faulty_to_consumer)
            .spawn(producer_inbox);
        let consumer = ConsumerBuilder::default()
            .settings(consumer_settings())
            .producer(faulty_to_producer)
            .start(consumer_inbox, to_consumer);
        let (mut rx, _task) = consume(consumer, Duration::ZERO);
        for n in 1..=100 {
            producer.send(n).await.unwrap();
        }
        let got = tokio::time::timeout(Duration::from_secs(600), receive(&mut rx, 100))
            .await
            .unwrap_or_else(|_| panic!("seed {seed} stalled"));
        assert_eq!(got, (1..=100).collect::<Vec<_>>(), "seed {seed}");
    }
}

fn durable_producer(
    queue: &InMemoryQueue<u32>,
    to_consumer: &ChannelLink<crate::delivery::SequencedMessage<u32>>,
) -> (ProducerHandle<u32>, ChannelLink<FromConsumer<u32>>) {
    let (to_producer, producer_inbox) = channel_link(LINK_CAPACITY);
    let producer = ProducerBuilder::new(ProducerId::new("p"))
        .consumer(Arc::new(to_consumer.clone()))
        .spawn_durable(producer_inbox, queue.clone());
    (producer, to_producer)
}

// ESRD-01 (and NET-07: with a durable queue the ask is answered after storage, before the
// consumer confirms, so asks 1..3 complete while the consumer holds message 1)
#[tokio::test(start_paused = true)]
async fn after_a_full_restart_unconfirmed_messages_are_delivered_again() {
    let queue = InMemoryQueue::default();
    let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
    let (producer, to_producer) = durable_producer(&queue, &to_consumer);
    let mut consumer = ConsumerBuilder::default()
        .settings(consumer_settings())
        .producer(Arc::new(to_producer))
        .start(consumer_inbox, to_consumer);
    // The consumer polls while the producer asks: its first Request opens the window.
    let asking = async {
        for n in [1, 2, 3] {
            producer.ask(n).await.unwrap();
        }
    };
    let (_, a) = tokio::join!(asking, consumer.next());
    assert_eq!(a.unwrap().message, 1);
    // Neither confirms nor continues: both sides stop.
    drop(producer);
    drop(consumer);

    let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
    let (producer, to_producer) = durable_producer(&queue, &to_consumer);
    let consumer = ConsumerBuilder::default()
        .settings(consumer_settings())
        .producer(Arc::new(to_producer))
        .start(consumer_inbox, to_consumer);
    let (mut rx, _task) = consume(consumer, Duration::ZERO);
    assert_eq!(receive(&mut rx, 3).await, vec![1, 2, 3]);
    assert_eq!(producer.ask(4).await.unwrap(), SeqNr(4));
    assert_eq!(receive(&mut rx, 1).await, vec![4]);
}

// ESRD-02
#[tokio::test(start_paused = true)]
async fn after_a_producer_restart_the_same_consumer_gets_the_rest_again() {
    let queue = InMemoryQueue::default();
    let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
    let (producer, to_producer) = durable_producer(&queue, &to_consumer);
    let mut consumer = ConsumerBuilder::default()
        .settings(consumer_settings())
        .producer(Arc::new(to_producer))
        .start(consumer_inbox, to_consumer.clone());
    // The consumer polls while the producer asks: its first Request opens the window.
    let asking = async {
        for n in [1, 2, 3] {
            producer.ask(n).await.unwrap();
        }
    };
    let (_, a) = tokio::join!(asking, consumer.next());
    assert_eq!(a.unwrap().message, 1);
    drop(producer);

    let (producer, to_producer) = durable_producer(&queue, &to_consumer);
    consumer.register_to_producer(producer.producer_ref().clone(), Arc::new(to_producer));
    // The old message 1 is confirmed late, to the old controller.
    consumer.confirm();
    let (mut rx, _task) = consume(consumer, Duration::ZERO);
    assert_eq!(producer.ask(4).await.unwrap(), SeqNr(4));
    producer.send(5).await.unwrap();
    let got = receive(&mut rx, 5).await;
    assert_eq!(
        got,
        vec![1, 2, 3, 4, 5],
        "1 again (at-least-once), then the rest in order"
    );
}

// ESRD-03 (pekko)
#[tokio::test(start_paused = true)]
async fn after_a_restart_with_everything_confirmed_numbering_continues() {
    let queue = InMemoryQueue::default();
    let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
    let (producer, to_producer) = durable_producer(&queue, &to_consumer);
    let mut consumer = ConsumerBuilder::default()
        .settings(consumer_settings())
        .producer(Arc::new(to_producer))
        .start(consumer_inbox, to_consumer);
    let (confirmed, got) = tokio::join!(producer.ask(1), take(&mut consumer, 1));
    confirmed.unwrap();
    assert_eq!(got, vec![1]);
    // Wait (with a deadline) until the write-behind confirmation is stored.
    let stored = async {
        while queue.snapshot().highest_confirmed_seq_nr < SeqNr(1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), stored)
        .await
        .expect("confirmation stored");
    drop(producer);
    drop(consumer);

    let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
    let (producer, to_producer) = durable_producer(&queue, &to_consumer);
    let consumer = ConsumerBuilder::default()
        .settings(consumer_settings())
        .producer(Arc::new(to_producer))
        .start(consumer_inbox, to_consumer);
    let (mut rx, _task) = consume(consumer, Duration::ZERO);
    assert_eq!(
        producer.ask(2).await.unwrap(),
        SeqNr(2),
        "no crash, numbering continues"
    );
    assert_eq!(receive(&mut rx, 1).await, vec![2]);
}

/// Consumes as a worker; reports `(worker, message)`.
fn work(
    name: &'static str,
    mut worker: ConsumerHandle<u32>,
    seen: mpsc::UnboundedSender<(&'static str, u32)>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(delivery) = worker.next().await {
            if seen.send((name, delivery.message)).is_err() {
                break;
            }
            worker.confirm();
        }
    })
}

// WP-01 with the real tasks
#[tokio::test(start_paused = true)]
async fn work_pulling_spreads_messages_over_worker_tasks() {
    let registry = LocalWorkerRegistry::default();
    let (to_producer, inbox) = channel_link(LINK_CAPACITY);
    let mut producer = WorkPullingBuilder::new(ProducerId::new("wp"))
        .spawn(inbox, &registry)
        .unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (w1, r1) = registry.spawn_worker(to_producer.clone(), ConsumerBuilder::default());
    let (w2, r2) = registry.spawn_worker(to_producer.clone(), ConsumerBuilder::default());
    producer.wait_for_workers(2).await.unwrap();
    let _t1 = work("w1", w1, seen_tx.clone());
    let _t2 = work("w2", w2, seen_tx);
    for n in 1..=84 {
        producer.ask(n).await.unwrap();
    }
    let mut by_worker: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut all = Vec::new();
    while all.len() < 84 {
        let (worker, message) = seen.recv().await.unwrap();
        *by_worker.entry(worker).or_default() += 1;
        all.push(message);
    }
    all.sort();
    assert_eq!(all, (1..=84).collect::<Vec<_>>());
    assert_eq!(by_worker.len(), 2, "both workers got work: {by_worker:?}");
    drop((r1, r2));
    producer.wait_for_workers(0).await.unwrap();
}

// WP-02 with the real tasks: a departed worker's unconfirmed messages finish elsewhere.
#[tokio::test(start_paused = true)]
async fn a_departed_workers_messages_are_processed_by_another_worker_task() {
    let registry = LocalWorkerRegistry::default();
    let (to_producer, inbox) = channel_link(LINK_CAPACITY);
    let mut producer = WorkPullingBuilder::new(ProducerId::new("wp"))
        .spawn(inbox, &registry)
        .unwrap();
    let (mut stuck, stuck_registration) =
        registry.spawn_worker(to_producer.clone(), ConsumerBuilder::default());
    producer.wait_for_workers(1).await.unwrap();
    producer.send(1).await.unwrap();
    // The first worker takes message 1 and never confirms it; its Request lets 2 follow.
    let (sent, first) = tokio::join!(producer.send(2), stuck.next());
    sent.unwrap();
    assert_eq!(first.unwrap().message, 1);
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (w2, _r2) = registry.spawn_worker(to_producer, ConsumerBuilder::default());
    producer.wait_for_workers(2).await.unwrap();
    let _t2 = work("w2", w2, seen_tx);
    drop(stuck_registration);
    producer.wait_for_workers(1).await.unwrap();
    let mut got = vec![seen.recv().await.unwrap().1, seen.recv().await.unwrap().1];
    got.sort();
    assert_eq!(got, vec![1, 2]);
}

fn one_byte_chunks() -> ProducerSettings {
    ProducerSettings {
        chunk_large_messages: Some(1),
        ..ProducerSettings::default()
    }
}

// RD-01 and RD-02, chunked (ReliableDeliveryChunkedSpec, 1-byte chunks)
#[tokio::test(start_paused = true)]
async fn one_byte_chunks_deliver_every_message_once_in_order() {
    let codec = Arc::new(crate::delivery::codec::JsonCodec);
    let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
    let (to_producer, producer_inbox) = channel_link(LINK_CAPACITY);
    let producer = ProducerBuilder::new(ProducerId::new("p"))
        .settings(one_byte_chunks())
        .codec(codec.clone())
        .consumer(Arc::new(to_consumer.clone()))
        .spawn(producer_inbox);
    let consumer = ConsumerBuilder::default()
        .settings(consumer_settings())
        .codec(codec)
        .producer(Arc::new(to_producer))
        .start(consumer_inbox, to_consumer);
    let (mut rx, _task) = consume(consumer, Duration::ZERO);
    let mut replies = Vec::new();
    for n in 1..=42u32 {
        replies.push(producer.ask(n * 1000).await.unwrap());
    }
    assert!(
        replies.windows(2).all(|w| w[0] < w[1]),
        "replies in order: {replies:?}"
    );
    assert!(
        replies.last().is_some_and(|s| s.0 > 42),
        "more seq nrs than messages"
    );
    let expected: Vec<u32> = (1..=42).map(|n| n * 1000).collect();
    assert_eq!(receive(&mut rx, 42).await, expected);
}

// NET-06: Akka.NET's point-to-point doc sample with 10-byte chunks; the strings span one, two
// and three chunks, the last one short.
#[tokio::test(start_paused = true)]
async fn ten_byte_chunks_carry_strings_of_any_length() {
    let codec = Arc::new(crate::delivery::codec::JsonCodec);
    let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
    let (to_producer, producer_inbox) = channel_link(LINK_CAPACITY);
    let producer = ProducerBuilder::new(ProducerId::new("p"))
        .settings(ProducerSettings {
            chunk_large_messages: Some(10),
            ..ProducerSettings::default()
        })
        .codec(codec.clone())
        .consumer(Arc::new(to_consumer.clone()))
        .spawn(producer_inbox);
    let consumer = ConsumerBuilder::default()
        .settings(consumer_settings())
        .codec(codec)
        .producer(Arc::new(to_producer))
        .start(consumer_inbox, to_consumer);
    let (mut rx, _task) = consume(consumer, Duration::ZERO);
    let sent = vec!["a".to_string(), "b".repeat(17), "c".repeat(28)];
    let mut replies = Vec::new();
    for message in &sent {
        replies.push(producer.ask(message.clone()).await.unwrap().0);
    }
    // JSON adds two quote bytes: 3, 19 and 30 bytes make 1, 2 and 3 chunks.
    assert_eq!(replies, vec![1, 3, 6]);
    assert_eq!(receive(&mut rx, 3).await, sent);
}

// ESRD-01, chunked
#[tokio::test(start_paused = true)]
async fn chunked_messages_survive_a_full_restart() {
    let codec: Arc<crate::delivery::codec::JsonCodec> = Arc::new(crate::delivery::codec::JsonCodec);
    let queue = InMemoryQueue::default();
    let spawn = |queue: &InMemoryQueue<u32>| {
        let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
        let (to_producer, producer_inbox) = channel_link(LINK_CAPACITY);
        let producer = ProducerBuilder::new(ProducerId::new("p"))
            .settings(one_byte_chunks())
            .codec(codec.clone())
            .consumer(Arc::new(to_consumer.clone()))
            .spawn_durable(producer_inbox, queue.clone());
        let consumer = ConsumerBuilder::default()
            .settings(consumer_settings())
            .codec(codec.clone())
            .producer(Arc::new(to_producer))
            .start(consumer_inbox, to_consumer);
        (producer, consumer)
    };
    let (producer, mut consumer) = spawn(&queue);
    let asking = async {
        for n in [101, 102, 103] {
            producer.ask(n).await.unwrap();
        }
    };
    let (_, first) = tokio::join!(asking, consumer.next());
    assert_eq!(first.unwrap().message, 101);
    drop((producer, consumer));

    let (producer, consumer) = spawn(&queue);
    let (mut rx, _task) = consume(consumer, Duration::ZERO);
    assert_eq!(receive(&mut rx, 3).await, vec![101, 102, 103]);
    producer.ask(104).await.unwrap();
    assert_eq!(receive(&mut rx, 1).await, vec![104]);
}

// ESRD-01 with the embedded redb store and a real file: real time, because redb runs on the
// blocking pool and paused time would skip past the store's request timeout meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redb_store_carries_unconfirmed_messages_across_a_full_restart() {
    use crate::delivery::codec::JsonCodec;
    use crate::delivery::durable::redb_store::RedbQueue;

    let dir = std::env::temp_dir().join("warren-redb-tests");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("restart-{}.redb", uuid::Uuid::new_v4()));
    let spawn = |queue: RedbQueue<u32>| {
        let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
        let (to_producer, producer_inbox) = channel_link(LINK_CAPACITY);
        let producer = ProducerBuilder::new(ProducerId::new("p"))
            .consumer(Arc::new(to_consumer.clone()))
            .spawn_durable(producer_inbox, queue);
        let consumer = ConsumerBuilder::default()
            .settings(consumer_settings())
            .producer(Arc::new(to_producer))
            .start(consumer_inbox, to_consumer);
        (producer, consumer)
    };
    let queue = RedbQueue::open(&path, Arc::new(JsonCodec), 100).unwrap();
    let (producer, mut consumer) = spawn(queue);
    let asking = async {
        for n in [1, 2, 3] {
            producer.ask(n).await.unwrap();
        }
    };
    let (_, first) = tokio::join!(asking, consumer.next());
    assert_eq!(first.unwrap().message, 1);
    drop((producer, consumer));

    // The file is released once the old producer task has flushed and stopped.
    let reopened = async {
        loop {
            match RedbQueue::open(&path, Arc::new(JsonCodec), 100) {
                Ok(queue) => break queue,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    };
    let queue = tokio::time::timeout(Duration::from_secs(10), reopened)
        .await
        .expect("store reopened");
    let (producer, consumer) = spawn(queue);
    let (mut rx, _task) = consume(consumer, Duration::ZERO);
    let got = tokio::time::timeout(Duration::from_secs(10), receive(&mut rx, 3))
        .await
        .expect("redelivered");
    assert_eq!(got, vec![1, 2, 3]);
    assert_eq!(producer.ask(4).await.unwrap(), SeqNr(4));
    drop(producer);
    let _ = std::fs::remove_file(&path);
}

// `close` answers only once the consumer confirmed everything sent: a slow consumer has
// received all of it by then, and no clone can send any more.
#[tokio::test(start_paused = true)]
async fn close_returns_once_everything_sent_is_confirmed() {
    let (producer, consumer) = registered_pair(ProducerSettings::default());
    let (mut rx, _task) = consume(consumer, Duration::from_millis(50));
    produce(&producer, 1..=10, Duration::ZERO).await;
    let other = producer.clone();
    producer.close().await.unwrap();
    let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv().ok().map(|(_, m)| m)).collect();
    assert_eq!(got, (1..=10).collect::<Vec<_>>());
    assert!(matches!(other.send(11).await, Err(DeliveryError::Stopped)));
}

// The same for work pulling: `close` waits for the workers' confirmations.
#[tokio::test(start_paused = true)]
async fn work_pulling_close_returns_once_workers_confirmed_everything() {
    let registry = LocalWorkerRegistry::default();
    let (to_producer, inbox) = channel_link(LINK_CAPACITY);
    let mut producer = WorkPullingBuilder::new(ProducerId::new("wp"))
        .spawn(inbox, &registry)
        .unwrap();
    let (mut worker, _registration) =
        registry.spawn_worker(to_producer, ConsumerBuilder::default());
    producer.wait_for_workers(1).await.unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let _worker = tokio::spawn(async move {
        while let Some(delivery) = worker.next().await {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if seen_tx.send(delivery.message).is_err() {
                break;
            }
            worker.confirm();
        }
    });
    for n in 1..=10 {
        producer.send(n).await.unwrap();
    }
    producer.close().await.unwrap();
    let mut got: Vec<u32> = std::iter::from_fn(|| seen.try_recv().ok()).collect();
    got.sort();
    assert_eq!(got, (1..=10).collect::<Vec<_>>());
}

// Durable work pulling keeps one confirmation record per worker incarnation; the periodic
// cleanup forgets those of departed workers (real time: records carry wall-clock stamps).
#[tokio::test]
async fn durable_work_pulling_forgets_departed_workers_confirmation_records() {
    let registry = LocalWorkerRegistry::default();
    let queue = InMemoryQueue::default();
    let (to_producer, inbox) = channel_link(LINK_CAPACITY);
    let mut settings = ProducerSettings::default();
    settings.durable_queue.cleanup_unused_after = Duration::from_secs(1);
    let mut producer = WorkPullingBuilder::new(ProducerId::new("wp"))
        .settings(settings)
        .spawn_durable(inbox, &registry, queue.clone())
        .unwrap();
    for n in 1..=3 {
        let (worker, registration) =
            registry.spawn_worker(to_producer.clone(), ConsumerBuilder::default());
        producer.wait_for_workers(1).await.unwrap();
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let task = work("w", worker, seen_tx);
        producer.send(n).await.unwrap();
        assert_eq!(seen.recv().await.map(|(_, m)| m), Some(n));
        drop(registration);
        producer.wait_for_workers(0).await.unwrap();
        task.abort();
    }
    let recorded = async {
        while queue.snapshot().confirmed.len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), recorded)
        .await
        .expect("one confirmation record per worker");
    let forgotten = async {
        while !queue.snapshot().confirmed.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), forgotten)
        .await
        .expect("confirmation records cleaned up");
    assert!(queue.snapshot().unconfirmed.is_empty());
}
