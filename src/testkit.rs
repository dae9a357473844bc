//! Test support: a virtual-clock harness that runs a ProducerController and a
//! ConsumerController against each other over a seeded, fault-injecting link. Compiled for
//! tests and behind the `testkit` feature; nothing here runs in production.

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::delivery::{
    ConsumerController, ConsumerEvent, ConsumerFrame, ConsumerSettings, ProducerController,
    ProducerEvent, ProducerId, ProducerSettings, SequencedMessage,
};

/// `Request(confirmed, up_to)` with resending supported and not via timeout: the frame most
/// protocol tests exchange.
pub fn request(confirmed: u64, up_to: u64) -> ConsumerFrame {
    ConsumerFrame::Request {
        confirmed: crate::delivery::SeqNr(confirmed),
        request_up_to: crate::delivery::SeqNr(up_to),
        support_resend: true,
        via_timeout: false,
    }
}

/// How often the link misbehaves, per frame and per direction.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkFaults {
    /// Probability that a frame is lost.
    pub drop: f64,
    /// Probability that a frame arrives twice.
    pub duplicate: f64,
    /// Probability that a frame overtakes the one queued before it.
    pub reorder: f64,
}

/// One direction of the link: frames wait here until the harness delivers them.
#[derive(Debug)]
struct Lane<F> {
    frames: VecDeque<F>,
}

impl<F: Clone> Lane<F> {
    fn push(&mut self, frame: F, faults: &LinkFaults, rng: &mut SmallRng) {
        if rng.random_bool(faults.drop) {
            return;
        }
        if rng.random_bool(faults.duplicate) {
            self.frames.push_back(frame.clone());
        }
        self.frames.push_back(frame);
        let len = self.frames.len();
        if len >= 2 && rng.random_bool(faults.reorder) {
            self.frames.swap(len - 1, len - 2);
        }
    }
}

/// A producer that sends `total` numbered messages (with confirmation) as fast as demand allows,
/// and a consumer that confirms each delivery at once, joined by a faulty link.
pub struct PairHarness {
    /// The producer side under test.
    pub producer: ProducerController<u64, u64>,
    /// The consumer side under test.
    pub consumer: ConsumerController<u64>,
    /// The virtual clock.
    pub now: Instant,
    to_consumer: Lane<SequencedMessage<u64>>,
    to_producer: Lane<ConsumerFrame>,
    faults: LinkFaults,
    rng: SmallRng,
    total: u64,
    next_message: u64,
    demand: bool,
    /// Every message the consumer was handed, in order.
    pub delivered: Vec<u64>,
    /// Every confirmation token the producer reported, in order.
    pub confirmed: Vec<u64>,
}

impl PairHarness {
    /// A connected pair that will send messages `1..=total`.
    pub fn new(
        total: u64,
        seed: u64,
        faults: LinkFaults,
        producer_settings: ProducerSettings,
        consumer_settings: ConsumerSettings,
    ) -> Self {
        let now = Instant::now();
        let mut producer =
            ProducerController::new(ProducerId::new("harness"), seed, producer_settings);
        let mut consumer = ConsumerController::new(consumer_settings, now);
        producer.start(now);
        producer.register_consumer(now);
        consumer.start(now);
        PairHarness {
            producer,
            consumer,
            now,
            to_consumer: Lane {
                frames: VecDeque::new(),
            },
            to_producer: Lane {
                frames: VecDeque::new(),
            },
            faults,
            rng: SmallRng::seed_from_u64(seed),
            total,
            next_message: 1,
            demand: false,
            delivered: Vec::new(),
            confirmed: Vec::new(),
        }
    }

    /// Runs until every message is confirmed or `limit` of virtual time has passed; returns
    /// whether everything was confirmed. Time only jumps when nothing else can happen.
    pub fn run(&mut self, limit: Duration) -> bool {
        let deadline = self.now + limit;
        while !self.is_done() {
            if self.step() {
                continue;
            }
            let next = [self.producer.poll_timeout(), self.consumer.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            match next {
                Some(at) if at <= deadline => {
                    self.now = self.now.max(at);
                    self.producer.handle_timeout(self.now);
                    self.consumer.handle_timeout(self.now);
                }
                _ => return false,
            }
        }
        true
    }

    /// True when every message was confirmed to the producer.
    pub fn is_done(&self) -> bool {
        self.confirmed.len() as u64 == self.total
    }

    /// Moves everything that can move without time passing; returns whether anything did.
    fn step(&mut self) -> bool {
        let mut moved = false;
        while let Some(event) = self.producer.poll_event() {
            moved = true;
            match event {
                ProducerEvent::RequestNext { .. } => self.demand = true,
                ProducerEvent::Confirmed { token, .. } => self.confirmed.push(token),
            }
        }
        if self.demand && self.next_message <= self.total {
            self.demand = false;
            let n = self.next_message;
            self.next_message += 1;
            // A send without demand would be a harness bug; the test then fails on the count.
            let _ = self.producer.send_with_confirmation(n, n, self.now);
            moved = true;
        }
        while let Some(frame) = self.producer.poll_transmit() {
            self.to_consumer.push(frame, &self.faults, &mut self.rng);
        }
        if let Some(frame) = self.to_consumer.frames.pop_front() {
            self.consumer.handle_message(frame, self.now);
            moved = true;
        }
        while let Some(event) = self.consumer.poll_event() {
            if let ConsumerEvent::Deliver(delivery) = event {
                self.delivered.push(delivery.message);
                let _ = self.consumer.confirm(self.now);
                moved = true;
            }
        }
        while let Some((_, frame)) = self.consumer.poll_transmit() {
            self.to_producer.push(frame, &self.faults, &mut self.rng);
        }
        if let Some(frame) = self.to_producer.frames.pop_front() {
            let _ = self.producer.handle_frame(frame, self.now);
            moved = true;
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(window: u32) -> (ProducerSettings, ConsumerSettings) {
        (
            ProducerSettings::default(),
            ConsumerSettings {
                flow_control_window: window,
                resend_interval_min: Duration::from_millis(500),
                resend_interval_max: Duration::from_secs(2),
                only_flow_control: false,
            },
        )
    }

    #[test]
    fn a_perfect_link_delivers_everything_in_order_without_timers() {
        let (p, c) = settings(20);
        let mut pair = PairHarness::new(1000, 1, LinkFaults::default(), p, c);
        let start = pair.now;
        assert!(pair.run(Duration::from_secs(1)));
        assert_eq!(pair.delivered, (1..=1000).collect::<Vec<_>>());
        assert_eq!(pair.confirmed, (1..=1000).collect::<Vec<_>>());
        assert_eq!(pair.now, start, "no timer was needed");
        assert_eq!(pair.producer.unconfirmed_len(), 0);
    }

    #[test]
    fn a_lossy_duplicating_reordering_link_still_delivers_each_message_once_in_order() {
        let faults = LinkFaults {
            drop: 0.2,
            duplicate: 0.1,
            reorder: 0.1,
        };
        for seed in 0..50 {
            let (p, c) = settings(20);
            let mut pair = PairHarness::new(300, seed, faults, p, c);
            assert!(
                pair.run(Duration::from_secs(3600)),
                "seed {seed} stalled after {} deliveries",
                pair.delivered.len()
            );
            assert_eq!(
                pair.delivered,
                (1..=300).collect::<Vec<_>>(),
                "seed {seed} delivered out of order or twice"
            );
            assert_eq!(pair.confirmed, (1..=300).collect::<Vec<_>>(), "seed {seed}");
            assert_eq!(pair.producer.unconfirmed_len(), 0, "seed {seed}");
        }
    }
}
