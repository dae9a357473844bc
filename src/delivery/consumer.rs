//! The ConsumerController core: accepts sequenced messages from a ProducerController, delivers
//! them to its consumer one at a time and in order, detects gaps and asks for resends, grants
//! the producer a flow-control window, and retries its requests with back-off while idle
//! (Akka's `ConsumerControllerImpl`, reference §2.2).
//!
//! Sans-IO: the owner feeds inputs with `now` and drains [`ConsumerController::poll_transmit`],
//! [`ConsumerController::poll_event`] and [`ConsumerController::poll_timeout`] after every
//! input. Chunk reassembly is not here yet.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::delivery::protocol::{ConsumerFrame, ProducerId, ProducerRef, SeqNr, SequencedMessage};
use crate::delivery::settings::ConsumerSettings;

/// A message handed to the consumer, which must call [`ConsumerController::confirm`] once it is
/// processed. Only one delivery is outstanding at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery<M> {
    /// The application message.
    pub message: M,
    /// The producer stream it belongs to.
    pub producer_id: ProducerId,
    /// Its position in that stream.
    pub seq_nr: SeqNr,
}

/// What the ConsumerController tells its consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsumerEvent<M> {
    /// Process this message, then confirm it.
    Deliver(Delivery<M>),
    /// The controller stopped (DeliverThenStop completed, or its consumer went away); it ignores
    /// every further input.
    Stopped,
}

/// A consumer-side mistake; the controller's state is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConsumerError {
    /// `confirm` was called while no delivery was outstanding.
    #[error("confirmation while no delivery is outstanding")]
    NothingToConfirm,
}

#[derive(Clone, Debug)]
enum Phase<M> {
    /// Until the consumer's Start; sequenced messages are stashed.
    WaitingForStart,
    /// Expecting the next sequenced message.
    Active,
    /// A gap was found; only the missing message is accepted. `from` is what the Resend asked
    /// for and `producer` where it went, so the retry timer can repeat it.
    Resending {
        producer: ProducerRef,
        from: SeqNr,
    },
    /// A delivery is with the consumer; newer messages are stashed.
    WaitingForConfirmation(SequencedMessage<M>),
    Stopped,
}

/// Akka's RetryTimer: fixed-delay ticks whose interval grows ×1.5 per idle retry, up to a
/// maximum, and snaps back to the minimum on traffic.
#[derive(Clone, Debug)]
struct RetryTimer {
    min: Duration,
    max: Duration,
    interval: Duration,
    deadline: Instant,
}

impl RetryTimer {
    fn new(min: Duration, max: Duration, now: Instant) -> Self {
        RetryTimer {
            min,
            max,
            interval: min,
            deadline: now + min,
        }
    }

    fn start(&mut self, now: Instant) {
        self.interval = self.min;
        self.deadline = now + self.interval;
    }

    /// After a tick: the next one, one back-off step later.
    fn schedule_next(&mut self, now: Instant) {
        self.interval = self.interval.mul_f64(1.5).min(self.max);
        self.deadline = now + self.interval;
    }

    /// After a tick that does not back off.
    fn repeat(&mut self, now: Instant) {
        self.deadline = now + self.interval;
    }

    fn reset(&mut self, now: Instant) {
        if self.interval != self.min {
            self.start(now);
        }
    }
}

/// Sans-IO ConsumerController for message type `M` (cloned once per delivery: make it cheap).
///
/// Inputs: [`Self::start`], [`Self::handle_message`], [`Self::confirm`],
/// [`Self::register_to_producer`], [`Self::deliver_then_stop`], [`Self::stop`],
/// [`Self::handle_timeout`]. Outputs, to drain after every input: [`Self::poll_transmit`]
/// (frames, each addressed to a producer), [`Self::poll_event`] (deliveries, in order) and
/// [`Self::poll_timeout`].
///
/// Guarantees: within one producer session the consumer gets each sequence number at most once
/// and in order; with resending enabled, without gaps.
#[derive(Debug)]
pub struct ConsumerController<M> {
    settings: ConsumerSettings,
    window: u64,
    phase: Phase<M>,
    producer: Option<ProducerRef>,
    received: SeqNr,
    confirmed: SeqNr,
    requested: SeqNr,
    registering: Option<ProducerRef>,
    stopping: bool,
    /// Messages that arrived while waiting for Start or for a confirmation; capacity W.
    stash: VecDeque<SequencedMessage<M>>,
    retry: RetryTimer,
    transmits: VecDeque<(ProducerRef, ConsumerFrame)>,
    events: VecDeque<ConsumerEvent<M>>,
}

impl<M: Clone> ConsumerController<M> {
    /// A controller waiting for its consumer's Start; its retry timer runs from `now`.
    pub fn new(settings: ConsumerSettings, now: Instant) -> Self {
        let retry = RetryTimer::new(
            settings.resend_interval_min,
            settings.resend_interval_max,
            now,
        );
        ConsumerController {
            window: u64::from(settings.flow_control_window.max(1)),
            settings,
            phase: Phase::WaitingForStart,
            producer: None,
            received: SeqNr::ZERO,
            confirmed: SeqNr::ZERO,
            requested: SeqNr::ZERO,
            registering: None,
            stopping: false,
            stash: VecDeque::new(),
            retry,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// True once the controller has stopped for good.
    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    /// The producer this controller is connected to, if any.
    pub fn producer(&self) -> Option<&ProducerRef> {
        self.producer.as_ref()
    }

    /// Highest sequence number the consumer confirmed.
    pub fn confirmed_seq_nr(&self) -> SeqNr {
        self.confirmed
    }

    /// The consumer is ready (Akka's `Start`). A consumer that starts again (it was replaced)
    /// gets the outstanding delivery again.
    pub fn start(&mut self, now: Instant) {
        match &self.phase {
            Phase::WaitingForStart => {
                self.retry.start(now);
                self.phase = Phase::Active;
                self.drain_stash(now);
            }
            Phase::WaitingForConfirmation(current) => {
                let redelivery = self.delivery_of(current);
                self.events.push_back(ConsumerEvent::Deliver(redelivery));
            }
            Phase::Active | Phase::Resending { .. } | Phase::Stopped => {}
        }
    }

    /// A sequenced message from a producer.
    pub fn handle_message(&mut self, message: SequencedMessage<M>, now: Instant) {
        match &self.phase {
            Phase::Stopped => {}
            Phase::WaitingForStart => self.stash_if_room(message),
            Phase::WaitingForConfirmation(current) => {
                let expected = current.seq_nr.plus(self.stash.len() as u64 + 1);
                let is_duplicate =
                    message.seq_nr < expected && message.producer == current.producer;
                if !is_duplicate {
                    // A full stash drops the message; the producer resends it.
                    self.stash_if_room(message);
                }
            }
            Phase::Active => {
                self.receive_active(message, now);
                self.drain_stash(now);
            }
            Phase::Resending { .. } => {
                self.receive_resending(message, now);
                self.drain_stash(now);
            }
        }
    }

    /// The consumer processed the outstanding delivery (Akka's `Confirmed`).
    pub fn confirm(&mut self, now: Instant) -> Result<(), ConsumerError> {
        let Phase::WaitingForConfirmation(current) = &self.phase else {
            return Err(ConsumerError::NothingToConfirm);
        };
        let seq_nr = current.seq_nr;
        let (first, ack) = (current.first, current.ack);
        let producer = current.producer.clone();
        let half = self.window / 2;
        let new_requested = if first {
            // Confirm the first message at once so the producer stops resending it.
            let up_to = seq_nr.minus(1).plus(self.window);
            self.transmit_request(&producer, seq_nr, up_to, false);
            up_to
        } else if self.requested.distance_from(seq_nr) == Some(half) {
            let up_to = self.requested.plus(half);
            self.transmit_request(&producer, seq_nr, up_to, false);
            self.retry.start(now);
            up_to
        } else {
            if ack {
                self.transmits
                    .push_back((producer.clone(), ConsumerFrame::Ack { confirmed: seq_nr }));
            }
            self.requested
        };
        self.confirmed = seq_nr;
        self.requested = new_requested;
        if self.stopping && self.stash.is_empty() {
            // Akka also sends Ack(previous confirmed) from PostStop; this one supersedes it.
            self.transmits
                .push_back((producer, ConsumerFrame::Ack { confirmed: seq_nr }));
            self.become_stopped();
        } else {
            self.phase = Phase::Active;
            self.drain_stash(now);
        }
        Ok(())
    }

    /// Connect to `producer` (Akka's `RegisterToProducerController`): RegisterConsumer is sent
    /// and retried until that producer's first message arrives; messages from the old producer
    /// are discarded meanwhile.
    pub fn register_to_producer(&mut self, producer: ProducerRef, now: Instant) {
        match &self.phase {
            Phase::Stopped => {}
            Phase::WaitingForStart => {
                self.transmits
                    .push_back((producer.clone(), ConsumerFrame::RegisterConsumer));
                self.registering = Some(producer);
            }
            Phase::Active | Phase::Resending { .. } | Phase::WaitingForConfirmation(_) => {
                if self.producer.as_ref() == Some(&producer) {
                    return;
                }
                self.retry.start(now);
                self.transmits
                    .push_back((producer.clone(), ConsumerFrame::RegisterConsumer));
                self.registering = Some(producer);
                if matches!(self.phase, Phase::Resending { .. }) {
                    self.phase = Phase::Active;
                }
            }
        }
    }

    /// Stop once everything received so far is delivered and confirmed (Akka's
    /// `DeliverThenStop`).
    pub fn deliver_then_stop(&mut self) {
        match &self.phase {
            Phase::Stopped => {}
            Phase::WaitingForStart => {
                if self.stash.is_empty() {
                    self.become_stopped();
                } else {
                    self.stopping = true;
                }
            }
            _ => {
                if self.stash.is_empty() && self.received == self.confirmed {
                    self.stop();
                } else {
                    self.stopping = true;
                }
            }
        }
    }

    /// Stop now (the consumer went away, or the owner shuts down): a best-effort Ack of what
    /// was confirmed goes to the producer.
    pub fn stop(&mut self) {
        if self.is_stopped() {
            return;
        }
        if let Some(producer) = &self.producer {
            self.transmits.push_back((
                producer.clone(),
                ConsumerFrame::Ack {
                    confirmed: self.confirmed,
                },
            ));
        }
        self.become_stopped();
    }

    /// Fires the retry timer when it is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.is_stopped() || self.retry.deadline > now {
            return;
        }
        match &self.phase {
            Phase::WaitingForStart => {
                self.retry.repeat(now);
                self.retry_register();
            }
            Phase::WaitingForConfirmation(_) => {
                // No retries while the consumer works; they resume from active.
                self.retry.repeat(now);
            }
            Phase::Active => {
                self.retry.schedule_next(now);
                if !self.retry_register() {
                    self.retry_request();
                }
            }
            Phase::Resending { producer, from } => {
                let (producer, from) = (producer.clone(), *from);
                self.retry.schedule_next(now);
                if !self.retry_register() {
                    // The Resend may have been lost.
                    self.transmits
                        .push_back((producer, ConsumerFrame::Resend { from }));
                }
            }
            Phase::Stopped => {}
        }
    }

    /// The next frame, with the producer it is for.
    pub fn poll_transmit(&mut self) -> Option<(ProducerRef, ConsumerFrame)> {
        self.transmits.pop_front()
    }

    /// The next event for the consumer.
    pub fn poll_event(&mut self) -> Option<ConsumerEvent<M>> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.is_stopped()).then_some(self.retry.deadline)
    }

    fn resend_lost(&self) -> bool {
        !self.settings.only_flow_control
    }

    fn delivery_of(&self, message: &SequencedMessage<M>) -> Delivery<M> {
        Delivery {
            message: message.message.clone(),
            producer_id: message.producer.id.clone(),
            seq_nr: message.seq_nr,
        }
    }

    fn stash_if_room(&mut self, message: SequencedMessage<M>) {
        if (self.stash.len() as u64) < self.window {
            self.stash.push_back(message);
        }
    }

    /// Akka unstashes one message after each handled one; handled synchronously that amounts
    /// to processing the stash until a delivery is outstanding again.
    fn drain_stash(&mut self, now: Instant) {
        while matches!(self.phase, Phase::Active) {
            let Some(message) = self.stash.pop_front() else {
                break;
            };
            self.receive_active(message, now);
        }
    }

    fn is_producer_changed(&self, message: &SequencedMessage<M>) -> bool {
        self.producer.as_ref() != Some(&message.producer) || self.received == SeqNr::ZERO
    }

    fn receive_active(&mut self, message: SequencedMessage<M>, now: Instant) {
        self.retry.reset(now);
        let expected = self.received.next();
        if self.is_producer_changed(&message) {
            self.receive_changed_producer(message, now);
        } else if self.registering.is_some() {
            // Discarded: we are moving to another producer.
        } else if message.seq_nr == expected {
            self.received = message.seq_nr;
            self.deliver(message);
        } else if message.seq_nr > expected {
            if self.resend_lost() {
                self.start_resending(message.producer, expected, now);
            } else {
                // Only flow control: lost messages are skipped.
                self.received = message.seq_nr;
                self.deliver(message);
            }
        } else if message.first {
            // A duplicate first: the producer still resends it, so our Request was lost.
            self.retry_request();
        }
    }

    fn receive_resending(&mut self, message: SequencedMessage<M>, now: Instant) {
        if self.is_producer_changed(&message) {
            self.receive_changed_producer(message, now);
        } else if self.registering.is_some() {
            // Discarded: we are moving to another producer.
        } else if message.seq_nr == self.received.next() {
            self.received = message.seq_nr;
            self.deliver(message);
        } else if message.first {
            self.retry_request();
        }
    }

    fn receive_changed_producer(&mut self, message: SequencedMessage<M>, now: Instant) {
        if message.first || !self.resend_lost() {
            let up_to = message.seq_nr.minus(1).plus(self.window);
            self.transmit_request(&message.producer, SeqNr::ZERO, up_to, false);
            if self.registering.as_ref() == Some(&message.producer) {
                self.registering = None;
            }
            self.producer = Some(message.producer.clone());
            self.received = message.seq_nr;
            self.confirmed = SeqNr::ZERO;
            self.requested = up_to;
            self.deliver(message);
        } else if self.received == SeqNr::ZERO {
            // A fresh consumer (e.g. a re-created entity) joined mid-stream: ask for everything
            // unconfirmed, with the head marked first.
            self.start_resending(message.producer, SeqNr::ZERO, now);
        } else {
            tracing::warn!(
                producer = %message.producer.id,
                seq_nr = %message.seq_nr,
                "discarding message from an unexpected producer"
            );
        }
    }

    fn start_resending(&mut self, producer: ProducerRef, from: SeqNr, now: Instant) {
        self.transmits
            .push_back((producer.clone(), ConsumerFrame::Resend { from }));
        self.stash.clear();
        self.retry.start(now);
        self.phase = Phase::Resending { producer, from };
    }

    fn deliver(&mut self, message: SequencedMessage<M>) {
        let delivery = self.delivery_of(&message);
        self.events.push_back(ConsumerEvent::Deliver(delivery));
        self.phase = Phase::WaitingForConfirmation(message);
    }

    fn transmit_request(
        &mut self,
        producer: &ProducerRef,
        confirmed: SeqNr,
        request_up_to: SeqNr,
        via_timeout: bool,
    ) {
        self.transmits.push_back((
            producer.clone(),
            ConsumerFrame::Request {
                confirmed,
                request_up_to,
                support_resend: self.resend_lost(),
                via_timeout,
            },
        ));
    }

    /// Re-sends RegisterConsumer while registering; returns whether it did.
    fn retry_register(&mut self) -> bool {
        match &self.registering {
            Some(producer) => {
                self.transmits
                    .push_back((producer.clone(), ConsumerFrame::RegisterConsumer));
                true
            }
            None => false,
        }
    }

    /// In case the Request, or the message that would have triggered one, was lost.
    fn retry_request(&mut self) {
        let Some(producer) = self.producer.clone() else {
            return;
        };
        let up_to = if self.resend_lost() {
            self.requested
        } else {
            self.received.plus(self.window / 2)
        };
        self.requested = up_to;
        self.transmit_request(&producer, self.confirmed, up_to, true);
    }

    fn become_stopped(&mut self) {
        self.phase = Phase::Stopped;
        self.stash.clear();
        self.events.push_back(ConsumerEvent::Stopped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(window: u32) -> ConsumerSettings {
        ConsumerSettings {
            flow_control_window: window,
            resend_interval_min: Duration::from_secs(1),
            resend_interval_max: Duration::from_secs(2),
            only_flow_control: false,
        }
    }

    fn pc(incarnation: u64) -> ProducerRef {
        ProducerRef {
            id: ProducerId::new("p"),
            incarnation,
        }
    }

    fn msg(producer: &ProducerRef, seq_nr: u64, first: bool) -> SequencedMessage<u64> {
        SequencedMessage {
            producer: producer.clone(),
            seq_nr: SeqNr(seq_nr),
            message: seq_nr,
            first,
            ack: false,
        }
    }

    fn request(confirmed: u64, up_to: u64, via_timeout: bool) -> ConsumerFrame {
        ConsumerFrame::Request {
            confirmed: SeqNr(confirmed),
            request_up_to: SeqNr(up_to),
            support_resend: true,
            via_timeout,
        }
    }

    fn frames(cc: &mut ConsumerController<u64>) -> Vec<ConsumerFrame> {
        std::iter::from_fn(|| cc.poll_transmit())
            .map(|(_, f)| f)
            .collect()
    }

    fn delivered(cc: &mut ConsumerController<u64>) -> Vec<u64> {
        std::iter::from_fn(|| cc.poll_event())
            .filter_map(|e| match e {
                ConsumerEvent::Deliver(d) => Some(d.message),
                ConsumerEvent::Stopped => None,
            })
            .collect()
    }

    fn started(window: u32) -> ConsumerController<u64> {
        let mut cc = ConsumerController::new(settings(window), Instant::now());
        cc.start(Instant::now());
        cc
    }

    // CC-03
    #[tokio::test(start_paused = true)]
    async fn sends_the_initial_request_and_retries_it_when_idle() {
        let p = pc(1);
        let mut cc = ConsumerController::new(settings(20), Instant::now());
        cc.handle_message(msg(&p, 1, true), Instant::now());
        assert!(frames(&mut cc).is_empty(), "stashed until Start");
        cc.start(Instant::now());
        assert_eq!(frames(&mut cc), vec![request(0, 20, false)]);
        assert_eq!(delivered(&mut cc), vec![1]);
        cc.confirm(Instant::now()).unwrap();
        assert_eq!(frames(&mut cc), vec![request(1, 20, false)]);

        tokio::time::advance(Duration::from_secs(1)).await;
        cc.handle_timeout(Instant::now());
        assert_eq!(frames(&mut cc), vec![request(1, 20, true)]);
    }

    // CC-04
    #[tokio::test(start_paused = true)]
    async fn requests_more_after_half_the_window_is_confirmed() {
        let p = pc(1);
        let mut cc = started(20);
        for n in 1..=9 {
            cc.handle_message(msg(&p, n, n == 1), Instant::now());
            cc.confirm(Instant::now()).unwrap();
        }
        assert_eq!(
            frames(&mut cc),
            vec![request(0, 20, false), request(1, 20, false)]
        );
        cc.handle_message(msg(&p, 10, false), Instant::now());
        assert!(frames(&mut cc).is_empty());
        cc.confirm(Instant::now()).unwrap();
        assert_eq!(frames(&mut cc), vec![request(10, 30, false)]);
    }

    // CC-05
    #[tokio::test(start_paused = true)]
    async fn detects_a_gap_and_delivers_in_order_after_the_resend() {
        let p = pc(1);
        let mut cc = started(20);
        for n in 1..=2 {
            cc.handle_message(msg(&p, n, n == 1), Instant::now());
            cc.confirm(Instant::now()).unwrap();
        }
        frames(&mut cc);
        delivered(&mut cc);
        cc.handle_message(msg(&p, 5, false), Instant::now());
        assert_eq!(
            frames(&mut cc),
            vec![ConsumerFrame::Resend { from: SeqNr(3) }]
        );
        for n in 3..=5 {
            cc.handle_message(msg(&p, n, false), Instant::now());
            cc.confirm(Instant::now()).unwrap();
        }
        assert_eq!(delivered(&mut cc), vec![3, 4, 5]);
    }

    // CC-06 and D-05
    #[tokio::test(start_paused = true)]
    async fn backs_off_request_retries_and_snaps_back_on_traffic() {
        let p = pc(1);
        let mut cc = started(20);
        for n in 1..=2 {
            cc.handle_message(msg(&p, n, n == 1), Instant::now());
            cc.confirm(Instant::now()).unwrap();
        }
        frames(&mut cc);
        let t0 = Instant::now();
        let mut retries = Vec::new();
        for _ in 0..4 {
            let at = cc.poll_timeout().unwrap();
            tokio::time::advance(at - Instant::now()).await;
            cc.handle_timeout(Instant::now());
            retries.push((Instant::now() - t0, frames(&mut cc)));
        }
        let offsets: Vec<Duration> = retries.iter().map(|(d, _)| *d).collect();
        assert_eq!(
            offsets,
            vec![
                Duration::from_secs(1),
                Duration::from_millis(2500),
                Duration::from_millis(4500),
                Duration::from_millis(6500)
            ]
        );
        assert!(
            retries
                .iter()
                .all(|(_, f)| f == &vec![request(2, 20, true)])
        );

        cc.handle_message(msg(&p, 3, false), Instant::now());
        cc.confirm(Instant::now()).unwrap();
        assert_eq!(
            cc.poll_timeout(),
            Some(Instant::now() + Duration::from_secs(1))
        );
    }

    // CC-07
    #[tokio::test(start_paused = true)]
    async fn stashes_while_waiting_for_confirmation_and_drops_duplicates() {
        let p = pc(1);
        let mut cc = started(20);
        cc.handle_message(msg(&p, 1, true), Instant::now());
        cc.confirm(Instant::now()).unwrap();
        cc.handle_message(msg(&p, 2, false), Instant::now());
        cc.handle_message(msg(&p, 3, false), Instant::now());
        cc.handle_message(msg(&p, 4, false), Instant::now());
        assert_eq!(delivered(&mut cc), vec![1, 2]);
        cc.confirm(Instant::now()).unwrap();
        assert_eq!(delivered(&mut cc), vec![3]);
        cc.confirm(Instant::now()).unwrap();
        assert_eq!(delivered(&mut cc), vec![4]);
        cc.confirm(Instant::now()).unwrap();
        for n in [5, 6, 7, 5, 6, 7, 8] {
            cc.handle_message(msg(&p, n, false), Instant::now());
        }
        let mut all = delivered(&mut cc);
        while cc.confirm(Instant::now()).is_ok() {
            all.extend(delivered(&mut cc));
        }
        assert_eq!(all, vec![5, 6, 7, 8]);
    }

    // CC-09
    #[tokio::test(start_paused = true)]
    async fn a_restarted_consumer_gets_the_outstanding_delivery_again() {
        let p = pc(1);
        let mut cc = started(20);
        cc.handle_message(msg(&p, 1, true), Instant::now());
        cc.handle_message(msg(&p, 2, false), Instant::now());
        assert_eq!(delivered(&mut cc), vec![1]);
        cc.start(Instant::now());
        assert_eq!(delivered(&mut cc), vec![1]);
        cc.confirm(Instant::now()).unwrap();
        assert_eq!(delivered(&mut cc), vec![2]);
    }

    // CC-12
    #[tokio::test(start_paused = true)]
    async fn a_resent_first_message_is_delivered_once_but_a_new_producer_is_accepted() {
        let p1 = pc(1);
        let mut cc = started(20);
        cc.handle_message(msg(&p1, 1, true), Instant::now());
        cc.handle_message(msg(&p1, 1, true), Instant::now());
        assert_eq!(delivered(&mut cc), vec![1]);
        cc.confirm(Instant::now()).unwrap();
        cc.handle_message(msg(&p1, 1, true), Instant::now());
        assert!(delivered(&mut cc).is_empty());
        frames(&mut cc);

        let p2 = pc(2);
        cc.handle_message(msg(&p2, 1, true), Instant::now());
        assert_eq!(delivered(&mut cc), vec![1]);
        let to_p2: Vec<ProducerRef> = std::iter::from_fn(|| cc.poll_transmit())
            .map(|(to, _)| to)
            .collect();
        assert_eq!(to_p2, vec![p2]);
    }

    // CC-13
    #[tokio::test(start_paused = true)]
    async fn the_window_starts_at_the_first_message_of_each_producer() {
        let mut cc = started(20);
        cc.handle_message(msg(&pc(1), 1, true), Instant::now());
        cc.confirm(Instant::now()).unwrap();
        cc.handle_message(msg(&pc(2), 23, true), Instant::now());
        cc.confirm(Instant::now()).unwrap();
        cc.handle_message(msg(&pc(3), 7, true), Instant::now());
        let requests: Vec<ConsumerFrame> = frames(&mut cc)
            .into_iter()
            .filter(
                |f| matches!(f, ConsumerFrame::Request { confirmed, .. } if *confirmed == SeqNr(0)),
            )
            .collect();
        assert_eq!(
            requests,
            vec![
                request(0, 20, false),
                request(0, 42, false),
                request(0, 26, false)
            ]
        );
        assert_eq!(delivered(&mut cc), vec![1, 23, 7]);
    }

    // CC-14
    #[tokio::test(start_paused = true)]
    async fn a_fresh_consumer_asks_for_everything_when_joining_mid_stream() {
        let p = pc(1);
        let mut cc = ConsumerController::new(settings(20), Instant::now());
        cc.handle_message(msg(&p, 44, false), Instant::now());
        cc.handle_message(msg(&p, 41, true), Instant::now());
        cc.handle_message(msg(&p, 45, false), Instant::now());
        cc.start(Instant::now());
        assert_eq!(
            frames(&mut cc),
            vec![ConsumerFrame::Resend { from: SeqNr(0) }]
        );
        assert!(delivered(&mut cc).is_empty());
        for n in 41..=46 {
            cc.handle_message(msg(&p, n, n == 41), Instant::now());
        }
        assert_eq!(frames(&mut cc), vec![request(0, 60, false)]);
        assert_eq!(delivered(&mut cc), vec![41]);
        cc.confirm(Instant::now()).unwrap();
        assert_eq!(frames(&mut cc), vec![request(41, 60, false)]);
        let mut rest = delivered(&mut cc);
        while cc.confirm(Instant::now()).is_ok() {
            rest.extend(delivered(&mut cc));
        }
        assert_eq!(rest, vec![42, 43, 44, 45, 46]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fresh_consumer_repeats_its_lost_resend_from_zero() {
        let p = pc(1);
        let mut cc = started(20);
        cc.handle_message(msg(&p, 5, false), Instant::now());
        assert_eq!(
            frames(&mut cc),
            vec![ConsumerFrame::Resend { from: SeqNr(0) }]
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        cc.handle_timeout(Instant::now());
        assert_eq!(
            frames(&mut cc),
            vec![ConsumerFrame::Resend { from: SeqNr(0) }]
        );
    }

    // CC-16
    #[tokio::test(start_paused = true)]
    async fn deliver_then_stop_delivers_everything_received_then_stops() {
        let p = pc(1);
        let mut cc = started(20);
        cc.handle_message(msg(&p, 1, true), Instant::now());
        cc.confirm(Instant::now()).unwrap();
        cc.handle_message(msg(&p, 2, false), Instant::now());
        cc.handle_message(msg(&p, 3, false), Instant::now());
        cc.handle_message(msg(&p, 4, false), Instant::now());
        cc.deliver_then_stop();
        cc.handle_message(msg(&p, 5, false), Instant::now());
        let mut all = delivered(&mut cc);
        frames(&mut cc);
        while cc.confirm(Instant::now()).is_ok() {
            all.extend(delivered(&mut cc));
        }
        assert_eq!(all, vec![1, 2, 3, 4, 5]);
        assert!(cc.is_stopped());
        assert_eq!(
            frames(&mut cc).last(),
            Some(&ConsumerFrame::Ack {
                confirmed: SeqNr(5)
            })
        );
        assert_eq!(cc.poll_timeout(), None);
    }

    // CC-19
    #[tokio::test(start_paused = true)]
    async fn only_flow_control_delivers_across_gaps() {
        let p = pc(1);
        let mut cc = ConsumerController::new(
            ConsumerSettings {
                only_flow_control: true,
                ..settings(20)
            },
            Instant::now(),
        );
        cc.start(Instant::now());
        for n in [1, 3, 4, 35] {
            cc.handle_message(msg(&p, n, n == 1), Instant::now());
            cc.confirm(Instant::now()).unwrap();
        }
        assert_eq!(delivered(&mut cc), vec![1, 3, 4, 35]);
        assert!(frames(&mut cc).iter().all(|f| matches!(
            f,
            ConsumerFrame::Request {
                support_resend: false,
                ..
            } | ConsumerFrame::Ack { .. }
        )));
    }

    #[tokio::test(start_paused = true)]
    async fn confirming_with_nothing_outstanding_is_an_error_that_changes_nothing() {
        let mut cc = started(20);
        assert_eq!(
            cc.confirm(Instant::now()),
            Err(ConsumerError::NothingToConfirm)
        );
        assert!(!cc.is_stopped());
    }

    // D-06
    #[tokio::test(start_paused = true)]
    async fn an_odd_window_requests_after_integer_half() {
        let p = pc(1);
        let mut cc = started(5);
        cc.handle_message(msg(&p, 1, true), Instant::now());
        cc.confirm(Instant::now()).unwrap();
        frames(&mut cc);
        cc.handle_message(msg(&p, 2, false), Instant::now());
        cc.confirm(Instant::now()).unwrap();
        assert!(frames(&mut cc).is_empty());
        cc.handle_message(msg(&p, 3, false), Instant::now());
        cc.confirm(Instant::now()).unwrap();
        assert_eq!(frames(&mut cc), vec![request(3, 7, false)]);
    }
}
