//! A discrete-event simulation of one ProducerController and one ConsumerController on a
//! virtual clock, joined by a seeded faulty link: frames are dropped, duplicated and delayed
//! (delays reorder them), the producer and the consumer take random time, messages may be
//! chunked, and the durable queue may fail; when the producer controller gives up, it is
//! restarted from what the queue holds. Everything is drawn from one seed, so any run can be
//! replayed (Akka's ReliableDeliveryRandomSpec, docs/protocol.md, Test scenarios: RR-*). Once
//! the target is reached the run winds down: nothing new is produced, and what the controllers
//! hold should drain.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::delivery::codec::TextCodec;
use crate::delivery::durable::{DurableState, accept_confirmed, accept_message_sent};
use crate::delivery::durable::{StoreClient, StoreRequest};
use crate::delivery::{
    ConsumerController, ConsumerEvent, ConsumerFrame, ConsumerSettings, ProducerController,
    ProducerEvent, ProducerId, ProducerRef, ProducerSettings, SequencedMessage,
};

/// One run's parameters.
#[derive(Clone, Debug)]
pub struct RandomRun {
    /// Everything random comes from here.
    pub seed: u64,
    /// Messages `1..=messages` are produced.
    pub messages: u32,
    /// Frames lost, each way.
    pub drop: f64,
    /// Frames doubled, each way.
    pub duplicate: f64,
    /// Frames held back up to `max_delay` (and so reordered), each way.
    pub delay: f64,
    /// Longest hold-back of a frame.
    pub max_delay: Duration,
    /// Longest time the producer takes per message.
    pub producer_delay: Duration,
    /// Longest time the consumer takes per message.
    pub consumer_delay: Duration,
    /// Chunk size in bytes, if chunking.
    pub chunk_size: Option<u32>,
    /// Consumer in only-flow-control mode (lost messages are skipped).
    pub only_flow_control: bool,
    /// With a durable queue: the share of its calls that fail.
    pub store_failures: Option<f64>,
    /// Attempts per durable-queue call before the controller gives up (and is restarted).
    pub retry_attempts: u32,
}

impl RandomRun {
    /// Akka's random spec: drop, duplicate and delay rates each drawn from 10–30 %, producer
    /// and consumer delays up to 40 ms.
    pub fn from_seed(seed: u64, messages: u32) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
        RandomRun {
            seed,
            messages,
            drop: rng.random_range(0.1..=0.3),
            duplicate: rng.random_range(0.1..=0.3),
            delay: rng.random_range(0.1..=0.3),
            max_delay: Duration::from_millis(50),
            producer_delay: Duration::from_millis(rng.random_range(0..=40)),
            consumer_delay: Duration::from_millis(rng.random_range(0..=40)),
            chunk_size: None,
            only_flow_control: false,
            store_failures: None,
            retry_attempts: 10,
        }
    }
}

/// What a run saw.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Every message the consumer was handed, in order (as numbers).
    pub delivered: Vec<u32>,
    /// Every message the producer learned was confirmed (stored, with a durable queue).
    pub confirmed: Vec<u32>,
    /// Producer controllers restarted after a durable-queue failure.
    pub restarts: u32,
    /// The run finished before its virtual time limit.
    pub completed: bool,
    /// Virtual time the run took.
    pub elapsed: Duration,
    /// What the controllers still held at the end (after the wind-down, if it completed).
    pub leftover: Leftover,
    /// Messages the producer sent, numbered from 1 (in the last controller's run).
    pub produced: u32,
}

/// What the controllers hold in their buffers; a run that settled holds nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Leftover {
    /// Messages the producer keeps for resending, not confirmed yet.
    pub unconfirmed: usize,
    /// Replies the producer controller still owes for messages sent with confirmation.
    pub awaiting_confirmation: usize,
    /// Chunks of a message the producer has not sent yet.
    pub unsent_chunks: usize,
    /// Messages the consumer stashed behind its outstanding delivery.
    pub stashed: usize,
    /// Chunks the consumer holds toward a message not yet whole.
    pub reassembling: usize,
}

impl Leftover {
    /// Nothing left in any buffer.
    pub fn is_empty(&self) -> bool {
        *self == Leftover::default()
    }
}

#[derive(Debug)]
enum Event {
    ToConsumer(SequencedMessage<String>),
    ToProducer(ProducerRef, ConsumerFrame),
    Produce,
    Confirm,
    /// A store request of the producer controller with this incarnation.
    StoreAnswer(u64, StoreRequest<String>),
}

struct Sim {
    run: RandomRun,
    rng: SmallRng,
    now: Instant,
    events: BinaryHeap<Reverse<(Instant, u64)>>,
    payloads: std::collections::HashMap<u64, Event>,
    next_event: u64,
    producer: ProducerController<String, u32>,
    consumer: ConsumerController<String>,
    store: DurableState<String>,
    incarnation: u64,
    next_message: u32,
    /// The target was reached: nothing new is produced while the buffers drain.
    winding_down: bool,
    outcome: Outcome,
}

const TIME_LIMIT: Duration = Duration::from_secs(3600);
const EVENT_LIMIT: u64 = 5_000_000;
/// How long the buffers may take to drain once the target is reached: many times the longest
/// retry interval (2 s), so only a buffer that never drains is left over.
const WIND_DOWN: Duration = Duration::from_secs(60);

/// Runs one simulation to the end.
pub fn simulate(run: RandomRun) -> Outcome {
    let now = Instant::now();
    let consumer_settings = ConsumerSettings {
        flow_control_window: 20,
        resend_interval_min: Duration::from_millis(500),
        resend_interval_max: Duration::from_secs(2),
        only_flow_control: run.only_flow_control,
    };
    let mut consumer =
        ConsumerController::new(consumer_settings, now).with_codec(Arc::new(TextCodec));
    consumer.start(now);
    let mut sim = Sim {
        rng: SmallRng::seed_from_u64(run.seed),
        producer: new_producer(&run, 1),
        run,
        now,
        events: BinaryHeap::new(),
        payloads: std::collections::HashMap::new(),
        next_event: 0,
        consumer,
        store: DurableState::default(),
        incarnation: 1,
        next_message: 1,
        winding_down: false,
        outcome: Outcome::default(),
    };
    sim.producer.start(now);
    sim.producer.register_consumer(now);
    let start = now;
    while !sim.done() {
        sim.drain();
        if sim.next_event > EVENT_LIMIT || sim.now - start > TIME_LIMIT {
            break;
        }
        sim.advance();
    }
    sim.outcome.completed = sim.done();
    sim.outcome.elapsed = sim.now - start;
    if sim.outcome.completed {
        // Wind down: what is in flight is confirmed and every buffer should drain.
        sim.winding_down = true;
        let settle_by = sim.now + WIND_DOWN;
        loop {
            sim.drain();
            if sim.leftover().is_empty()
                || sim.next_event > EVENT_LIMIT
                || sim.now - start > TIME_LIMIT
                || sim.now > settle_by
            {
                break;
            }
            sim.advance();
        }
    }
    sim.outcome.leftover = sim.leftover();
    sim.outcome.produced = sim.next_message - 1;
    sim.outcome
}

fn new_producer(run: &RandomRun, incarnation: u64) -> ProducerController<String, u32> {
    let mut settings = ProducerSettings {
        chunk_large_messages: run.chunk_size,
        ..ProducerSettings::default()
    };
    settings.durable_queue.retry_attempts = run.retry_attempts;
    let producer = if run.store_failures.is_some() {
        ProducerController::with_durable_queue(ProducerId::new("sim"), incarnation, settings)
    } else {
        ProducerController::new(ProducerId::new("sim"), incarnation, settings)
    };
    producer.with_codec(Arc::new(TextCodec))
}

/// The message numbered `n`, long enough to be split when chunking.
fn message(n: u32) -> String {
    format!("message-{n:05}")
}

fn number(message: &str) -> u32 {
    message
        .strip_prefix("message-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

impl Sim {
    fn leftover(&self) -> Leftover {
        Leftover {
            unconfirmed: self.producer.unconfirmed_len(),
            awaiting_confirmation: self.producer.awaiting_confirmation_len(),
            unsent_chunks: self.producer.unsent_chunks_len(),
            stashed: self.consumer.stashed_len(),
            reassembling: self.consumer.reassembling_len(),
        }
    }

    fn done(&self) -> bool {
        let all = self.run.messages;
        if self.run.only_flow_control {
            // Lost messages stay lost; the flow must just keep going past the target.
            return self.outcome.delivered.last().is_some_and(|n| *n >= all);
        }
        if self.run.store_failures.is_some() {
            // Stored counts as confirmed; done once the consumer has seen every message.
            let mut seen = vec![false; all as usize + 1];
            for n in &self.outcome.delivered {
                if let Some(slot) = seen.get_mut(*n as usize) {
                    *slot = true;
                }
            }
            seen[1..].iter().all(|s| *s) && self.next_message > all
        } else {
            self.outcome.confirmed.len() as u32 >= all
        }
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        let id = self.next_event;
        self.next_event += 1;
        self.events.push(Reverse((self.now + after, id)));
        self.payloads.insert(id, event);
    }

    /// Puts a frame on the faulty link.
    fn transmit(&mut self, event: impl Fn() -> Event) {
        if self.rng.random_bool(self.run.drop) {
            return;
        }
        let copies = if self.rng.random_bool(self.run.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.rng.random_bool(self.run.delay) {
                self.run.max_delay.mul_f64(self.rng.random::<f64>())
            } else {
                Duration::from_micros(100)
            };
            self.schedule(delay, event());
        }
    }

    fn random_delay(&mut self, max: Duration) -> Duration {
        max.mul_f64(self.rng.random::<f64>())
    }

    /// Moves every output of both controllers.
    fn drain(&mut self) {
        while let Some(message) = self.producer.poll_transmit() {
            self.transmit(|| Event::ToConsumer(message.clone()));
        }
        while let Some(event) = self.producer.poll_event() {
            match event {
                ProducerEvent::RequestNext { .. } => {
                    let pause = self.random_delay(self.run.producer_delay);
                    self.schedule(pause, Event::Produce);
                }
                ProducerEvent::Confirmed { token, .. } => self.outcome.confirmed.push(token),
            }
        }
        while let Some(request) = self.producer.poll_store() {
            let incarnation = self.incarnation;
            self.schedule(
                Duration::from_millis(1),
                Event::StoreAnswer(incarnation, request),
            );
        }
        while let Some((to, frame)) = self.consumer.poll_transmit() {
            self.transmit(|| Event::ToProducer(to.clone(), frame));
        }
        while let Some(event) = self.consumer.poll_event() {
            if let ConsumerEvent::Deliver(delivery) = event {
                self.outcome.delivered.push(number(&delivery.message));
                let pause = self.random_delay(self.run.consumer_delay);
                self.schedule(pause, Event::Confirm);
            }
        }
        if self.producer.failure().is_some() {
            self.restart_producer();
        }
    }

    /// The durable queue gave out: a new controller resumes from what was stored.
    fn restart_producer(&mut self) {
        self.incarnation += 1;
        self.outcome.restarts += 1;
        self.producer = new_producer(&self.run, self.incarnation);
        self.producer.start(self.now);
        self.producer.register_consumer(self.now);
        // Stored but unanswered messages are resent by the controller; the producer resends
        // from the first one it has no storage confirmation for.
        let acknowledged = self.outcome.confirmed.iter().copied().max().unwrap_or(0);
        self.next_message = acknowledged + 1;
    }

    /// Jumps to the next event or timer and handles it.
    fn advance(&mut self) {
        let next_event = self.events.peek().map(|Reverse((at, _))| *at);
        let timers = [self.producer.poll_timeout(), self.consumer.poll_timeout()];
        let Some(at) = timers.into_iter().chain([next_event]).flatten().min() else {
            return;
        };
        self.now = self.now.max(at);
        if next_event == Some(at)
            && let Some(Reverse((_, id))) = self.events.pop()
            && let Some(event) = self.payloads.remove(&id)
        {
            self.handle(event);
        } else {
            self.producer.handle_timeout(self.now);
            self.consumer.handle_timeout(self.now);
        }
    }

    fn handle(&mut self, event: Event) {
        let now = self.now;
        match event {
            Event::ToConsumer(message) => self.consumer.handle_message(message, now),
            Event::ToProducer(to, frame) => {
                // Frames for an earlier controller go nowhere, as with the real driver.
                if &to == self.producer.producer_ref() {
                    let _ = self.producer.handle_frame(frame, now);
                }
            }
            Event::Produce => {
                // Without resending, the producer keeps producing (Akka's RR-04 runs until the
                // consumer passes the target), and stops there so its buffers can drain.
                let more = if self.run.only_flow_control {
                    !self.winding_down
                } else {
                    self.next_message <= self.run.messages
                };
                if more && self.producer.has_demand() {
                    let n = self.next_message;
                    self.next_message += 1;
                    let _ = self.producer.send_with_confirmation(message(n), n, now);
                }
            }
            Event::Confirm => {
                let _ = self.consumer.confirm(now);
            }
            // The queue's work dies with its controller; a late answer never ran.
            Event::StoreAnswer(incarnation, request) if incarnation == self.incarnation => {
                self.answer_store(request);
            }
            Event::StoreAnswer(..) => {}
        }
    }

    fn answer_store(&mut self, request: StoreRequest<String>) {
        let fails = self
            .run
            .store_failures
            .is_some_and(|rate| self.rng.random_bool(rate));
        let now = self.now;
        match request {
            StoreRequest::LoadState { attempt } => {
                if fails {
                    self.producer.handle_load_failed(attempt);
                } else {
                    // Stores persist this cleanup on load, so the sequence numbers are free.
                    self.store.cleanup_partial_chunked_messages();
                    self.producer.handle_state_loaded(self.store.clone(), now);
                }
            }
            StoreRequest::StoreMessageSent { sent, attempt } => {
                let seq_nr = sent.seq_nr;
                if fails || accept_message_sent(&mut self.store, sent).is_err() {
                    self.producer.handle_store_failed(seq_nr, attempt);
                } else {
                    self.producer.handle_message_stored(seq_nr, now);
                }
            }
            StoreRequest::StoreMessageConfirmed { seq_nr, qualifier } => {
                if !fails {
                    accept_confirmed(&mut self.store, seq_nr, &qualifier, 0);
                }
            }
        }
    }
}
