//! The sharding producer's driver with entities played in process (one
//! ShardingConsumerController each), on paused time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::delivery::durable::memory::InMemoryQueue;
use crate::delivery::protocol::Payload;
use crate::delivery::protocol::ProducerId;
use crate::delivery::settings::{ConsumerSettings, ProducerSettings, ShardingProducerSettings};
use crate::delivery::sharding::ShardingConsumerController;
use crate::timer::sleep_until;

type Wire = mpsc::UnboundedReceiver<(EntityId, SequencedMessage<u32>)>;

/// Entities' side of the wire: everything sent arrives, in order, without waiting.
struct WireSender(mpsc::UnboundedSender<(EntityId, SequencedMessage<u32>)>);

impl ToEntities<u32> for WireSender {
    async fn deliver(&self, entity: EntityId, message: SequencedMessage<u32>) {
        let _ = self.0.send((entity, message));
    }
}

/// A producer task whose messages land on the returned wire.
fn producer(
    queue: InMemoryQueue<u32>,
    incarnation: u64,
    shutdown: CancellationToken,
) -> (ShardingProducerHandle<u32>, Wire, mpsc::Sender<ToProducer>) {
    producer_with_buffer(queue, incarnation, 100, shutdown)
}

fn producer_with_buffer(
    queue: InMemoryQueue<u32>,
    incarnation: u64,
    buffer_size: usize,
    shutdown: CancellationToken,
) -> (ShardingProducerHandle<u32>, Wire, mpsc::Sender<ToProducer>) {
    let sharding = ShardingProducerSettings {
        buffer_size,
        ..ShardingProducerSettings::default()
    };
    let core = ShardingProducerController::with_durable_queue(
        ProducerId::new("p"),
        ProducerSettings::default(),
        sharding,
        incarnation,
    )
    .unwrap();
    let (wire_tx, wire) = mpsc::unbounded_channel();
    let to_entity = WireSender(wire_tx);
    let (answers_tx, answers) = mpsc::channel(1024);
    let resends = IntCounter::new("resends", "test").unwrap();
    let handle = spawn_durable_sharding_producer(
        core,
        Some(queue),
        buffer_size,
        to_entity,
        answers,
        resends,
        shutdown,
    );
    (handle, wire, answers_tx)
}

/// Entities that process (record) and confirm everything they get.
fn entities(mut wire: Wire, answers: mpsc::Sender<ToProducer>) -> Arc<Mutex<Vec<u32>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&got);
    tokio::spawn(async move {
        let mut consumers: HashMap<EntityId, ShardingConsumerController<u32>> = HashMap::new();
        loop {
            let now = Instant::now();
            let mut moved = true;
            while moved {
                moved = false;
                for (entity, consumer) in consumers.iter_mut() {
                    while let Some((to, frame)) = consumer.poll_transmit() {
                        let answer = ToProducer {
                            entity: entity.clone(),
                            to,
                            frame,
                            rejected: Vec::new(),
                        };
                        let _ = answers.send(answer).await;
                    }
                    while let Some(delivery) = consumer.poll_event() {
                        record.lock().unwrap().push(delivery.message);
                        consumer.confirm(&delivery.producer_id, now).unwrap();
                        moved = true;
                    }
                }
            }
            let wake_at = consumers.values().filter_map(|c| c.poll_timeout()).min();
            tokio::select! {
                message = wire.recv() => match message {
                    Some((entity, message)) => consumers
                        .entry(entity)
                        .or_insert_with(|| ShardingConsumerController::new(ConsumerSettings::default()))
                        .handle_message(message, Instant::now()),
                    None => return,
                },
                _ = sleep_until(wake_at) => {
                    for consumer in consumers.values_mut() {
                        consumer.handle_timeout(Instant::now());
                    }
                }
            }
        }
    });
    got
}

#[tokio::test(start_paused = true)]
async fn a_restarted_durable_sharding_producer_resends_what_was_not_confirmed() {
    let queue = InMemoryQueue::default();
    // 1. Three messages are stored and routed, and no entity ever confirms them.
    let first_run = CancellationToken::new();
    let (handle, mut wire, _answers) = producer(queue.clone(), 1, first_run.clone());
    for n in 1..=3 {
        handle.send(EntityId::new("e"), n).await.unwrap();
    }
    // Stored; only the first goes out (no entity grants demand) and no entity confirms it.
    tokio::time::timeout(Duration::from_secs(5), async {
        while queue.snapshot().unconfirmed.len() < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("all three stored");
    let (_, first) = wire.recv().await.unwrap();
    assert_eq!(first.payload, Payload::Message(1));
    first_run.cancel();

    // 2. A new run loads them and delivers them first, then what is sent now.
    let (handle, wire, answers) = producer(queue.clone(), 100, CancellationToken::new());
    let got = entities(wire, answers);
    let outcome = tokio::time::timeout(Duration::from_secs(30), handle.ask(EntityId::new("e"), 4))
        .await
        .expect("confirmed in time")
        .unwrap();
    assert_eq!(outcome, AskOutcome::Confirmed);
    assert_eq!(*got.lock().unwrap(), vec![1, 2, 3, 4]);
    tokio::time::timeout(Duration::from_secs(5), async {
        while !queue.snapshot().unconfirmed.is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every confirmation is written to the queue");
}

/// Many messages submitted at once, more than the buffer holds and all waiting for storage,
/// and then every handle dropped: the producer waits instead of failing, and finishes.
#[tokio::test(start_paused = true)]
async fn submitting_more_than_the_buffer_holds_waits_and_dropped_handles_still_finish() {
    let queue = InMemoryQueue::default();
    let (handle, wire, answers) =
        producer_with_buffer(queue.clone(), 1, 10, CancellationToken::new());
    let got = entities(wire, answers);
    let mut outcomes = Vec::new();
    for n in 0..200 {
        let entity = EntityId::new(format!("e{}", n % 4));
        let submitted = tokio::time::timeout(Duration::from_secs(30), handle.submit(entity, n))
            .await
            .expect("room again in time")
            .unwrap();
        outcomes.push(submitted);
    }
    drop(handle);
    for outcome in outcomes {
        let outcome = tokio::time::timeout(Duration::from_secs(30), outcome)
            .await
            .expect("answered in time")
            .expect("the controller kept running");
        assert_eq!(outcome, AskOutcome::Confirmed);
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        while got.lock().unwrap().len() < 200 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("every message delivered after the handles are gone");
}
