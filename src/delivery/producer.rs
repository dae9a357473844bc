//! The ProducerController core: numbers a producer's messages, keeps the unconfirmed ones for
//! resending, grants the producer one message at a time within the consumer's flow-control
//! window, and reports confirmations (Akka's `ProducerControllerImpl`, reference §2.1).
//!
//! Sans-IO: no clock reads, no tasks, no channels. The owner feeds inputs with `now` and drains
//! [`ProducerController::poll_transmit`], [`ProducerController::poll_event`] and
//! [`ProducerController::poll_timeout`] after every input. Chunking and the durable producer
//! queue are not here yet.

use std::collections::VecDeque;

use tokio::time::Instant;

use crate::delivery::protocol::{ConsumerFrame, ProducerId, ProducerRef, SeqNr, SequencedMessage};
use crate::delivery::settings::ProducerSettings;

/// What the ProducerController tells its producer.
#[derive(Debug, PartialEq, Eq)]
pub enum ProducerEvent<T> {
    /// The producer may send exactly one message; it will get `current_seq_nr`.
    RequestNext {
        /// Sequence number the next message will get.
        current_seq_nr: SeqNr,
        /// Highest sequence number known to be confirmed.
        confirmed_seq_nr: SeqNr,
    },
    /// A message sent with [`ProducerController::send_with_confirmation`] was confirmed by the
    /// consumer (Akka's reply to `MessageWithConfirmation`). Emitted in sequence order.
    Confirmed {
        /// The confirmed message's sequence number.
        seq_nr: SeqNr,
        /// The token given when it was sent.
        token: T,
    },
}

/// A protocol violation; the controller is failed afterwards and refuses every further input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProducerError {
    /// The producer sent without an unused `RequestNext` (Akka: "Unexpected Msg when no demand").
    #[error(
        "message sent without demand: current seq nr {current}, requested up to {requested_up_to}"
    )]
    NoDemand {
        /// Sequence number the message would have had.
        current: SeqNr,
        /// Highest sequence number the consumer allowed.
        requested_up_to: SeqNr,
    },
    /// The consumer sent a Request whose confirmed sequence number is beyond its own window.
    #[error("inconsistent request: confirmed {confirmed} is beyond requested {request_up_to}")]
    InconsistentRequest {
        /// The confirmed sequence number in the Request.
        confirmed: SeqNr,
        /// The window end in the Request.
        request_up_to: SeqNr,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for both the producer's Start and a consumer.
    Initializing {
        has_producer: bool,
        has_consumer: bool,
    },
    Active,
}

/// Sans-IO ProducerController for message type `M` (cloned once per send, for the resend buffer:
/// make it cheap to clone) and confirmation token `T`.
///
/// Inputs: [`Self::start`], [`Self::register_consumer`], [`Self::send`],
/// [`Self::send_with_confirmation`], [`Self::handle_frame`], [`Self::resend_first_unconfirmed`],
/// [`Self::handle_timeout`]. Outputs, to drain after every input: [`Self::poll_transmit`]
/// (frames for the consumer, in order), [`Self::poll_event`] (for the producer, in order), and
/// [`Self::poll_timeout`] (when to call `handle_timeout` next).
///
/// Guarantees while neither side restarts: the consumer sees every message once, in order; each
/// `Confirmed` event means the consumer processed that message and every earlier one.
#[derive(Debug)]
pub struct ProducerController<M, T> {
    me: ProducerRef,
    settings: ProducerSettings,
    phase: Phase,
    failure: Option<ProducerError>,
    /// The producer holds an unused RequestNext.
    requested: bool,
    current_seq_nr: SeqNr,
    confirmed_seq_nr: SeqNr,
    requested_seq_nr: SeqNr,
    /// Start of the current session with the current consumer.
    first_seq_nr: SeqNr,
    support_resend: bool,
    unconfirmed: VecDeque<SequencedMessage<M>>,
    awaiting_confirmation: VecDeque<(SeqNr, T)>,
    /// Periodic ResendFirst timer; `None` when cancelled.
    resend_first_at: Option<Instant>,
    transmits: VecDeque<SequencedMessage<M>>,
    events: VecDeque<ProducerEvent<T>>,
}

impl<M: Clone, T> ProducerController<M, T> {
    /// A fresh controller for `producer_id`; `incarnation` must differ from any earlier
    /// controller with the same id that a consumer may still remember.
    pub fn new(producer_id: ProducerId, incarnation: u64, settings: ProducerSettings) -> Self {
        ProducerController {
            me: ProducerRef {
                id: producer_id,
                incarnation,
            },
            settings,
            phase: Phase::Initializing {
                has_producer: false,
                has_consumer: false,
            },
            failure: None,
            requested: false,
            current_seq_nr: SeqNr(1),
            confirmed_seq_nr: SeqNr::ZERO,
            // pekko's fix (#2762): the first allowed message is the current one, so a fresh
            // controller pushes seq nr 1 before any Request.
            requested_seq_nr: SeqNr(1),
            first_seq_nr: SeqNr(1),
            support_resend: true,
            unconfirmed: VecDeque::new(),
            awaiting_confirmation: VecDeque::new(),
            resend_first_at: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// This controller's identity, carried in every message it sends.
    pub fn producer_ref(&self) -> &ProducerRef {
        &self.me
    }

    /// True once both the producer and a consumer are known.
    pub fn is_active(&self) -> bool {
        self.phase == Phase::Active
    }

    /// The producer holds an unused `RequestNext`: it may send one message now.
    pub fn has_demand(&self) -> bool {
        self.failure.is_none() && self.requested && self.current_seq_nr <= self.requested_seq_nr
    }

    /// Sequence number the next message will get.
    pub fn current_seq_nr(&self) -> SeqNr {
        self.current_seq_nr
    }

    /// Highest sequence number the consumer confirmed.
    pub fn confirmed_seq_nr(&self) -> SeqNr {
        self.confirmed_seq_nr
    }

    /// Messages sent but not yet confirmed (kept for resending).
    pub fn unconfirmed_len(&self) -> usize {
        self.unconfirmed.len()
    }

    /// The protocol violation that ended this controller, if any.
    pub fn failure(&self) -> Option<&ProducerError> {
        self.failure.as_ref()
    }

    /// The producer (re)registered (Akka's `Start`): a pending demand is offered to it again.
    pub fn start(&mut self) {
        match self.phase {
            Phase::Initializing { has_consumer, .. } => {
                self.phase = Phase::Initializing {
                    has_producer: true,
                    has_consumer,
                };
                self.activate_when_ready();
            }
            Phase::Active => {
                if self.requested {
                    self.request_next(self.confirmed_seq_nr);
                }
            }
        }
    }

    /// A consumer (re)connected (Akka's `RegisterConsumer`). While active this starts a new
    /// session: the first unconfirmed message is re-sent marked `first` until confirmed, then
    /// the rest follow.
    pub fn register_consumer(&mut self, now: Instant) {
        match self.phase {
            Phase::Initializing { has_producer, .. } => {
                self.phase = Phase::Initializing {
                    has_producer,
                    has_consumer: true,
                };
                self.activate_when_ready();
            }
            Phase::Active => {
                self.first_seq_nr = self
                    .unconfirmed
                    .front()
                    .map_or(self.current_seq_nr, |m| m.seq_nr);
                if !self.unconfirmed.is_empty() {
                    self.arm_resend_first(now);
                    self.resend_first();
                }
            }
        }
    }

    /// Sends `message` using the producer's pending demand (Akka's `Msg`).
    pub fn send(&mut self, message: M, now: Instant) -> Result<SeqNr, ProducerError> {
        self.send_inner(message, None, now)
    }

    /// Sends `message` and emits [`ProducerEvent::Confirmed`] with `token` once the consumer
    /// confirmed it (Akka's `MessageWithConfirmation`).
    pub fn send_with_confirmation(
        &mut self,
        message: M,
        token: T,
        now: Instant,
    ) -> Result<SeqNr, ProducerError> {
        self.send_inner(message, Some(token), now)
    }

    /// A frame from the consumer side of the link.
    pub fn handle_frame(
        &mut self,
        frame: ConsumerFrame,
        now: Instant,
    ) -> Result<(), ProducerError> {
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        if let ConsumerFrame::RegisterConsumer = frame {
            self.register_consumer(now);
            return Ok(());
        }
        if self.phase != Phase::Active {
            // Akka drops these while initializing; the consumer retries.
            return Ok(());
        }
        match frame {
            ConsumerFrame::Request {
                confirmed,
                request_up_to,
                support_resend,
                via_timeout,
            } => self.receive_request(confirmed, request_up_to, support_resend, via_timeout),
            ConsumerFrame::Ack { confirmed } => {
                self.receive_ack(confirmed);
                Ok(())
            }
            ConsumerFrame::Resend { from } => {
                self.receive_resend(from);
                Ok(())
            }
            ConsumerFrame::RegisterConsumer => Ok(()),
        }
    }

    /// Re-sends the first unconfirmed message as it is (Akka's `ResendFirstUnconfirmed`, used by
    /// a sharding parent to wake an entity that stopped).
    pub fn resend_first_unconfirmed(&mut self) {
        if let Some(head) = self.unconfirmed.front() {
            self.transmits.push_back(head.clone());
        }
    }

    /// Fires the timers that are due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.failure.is_some() {
            return;
        }
        if self.resend_first_at.is_some_and(|at| at <= now) {
            // Fixed delay, like Akka's startTimerWithFixedDelay.
            self.arm_resend_first(now);
            self.resend_first();
        }
    }

    /// The next frame for the consumer.
    pub fn poll_transmit(&mut self) -> Option<SequencedMessage<M>> {
        self.transmits.pop_front()
    }

    /// The next event for the producer.
    pub fn poll_event(&mut self) -> Option<ProducerEvent<T>> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.resend_first_at
    }

    fn activate_when_ready(&mut self) {
        if let Phase::Initializing {
            has_producer: true,
            has_consumer: true,
        } = self.phase
        {
            self.phase = Phase::Active;
            if self.unconfirmed.is_empty() {
                self.request_next(self.confirmed_seq_nr);
            } else {
                self.requested = false;
                self.resend_first();
            }
        }
    }

    fn request_next(&mut self, confirmed_seq_nr: SeqNr) {
        self.requested = true;
        self.events.push_back(ProducerEvent::RequestNext {
            current_seq_nr: self.current_seq_nr,
            confirmed_seq_nr,
        });
    }

    fn fail(&mut self, error: ProducerError) -> ProducerError {
        self.failure = Some(error.clone());
        self.resend_first_at = None;
        error
    }

    fn send_inner(
        &mut self,
        message: M,
        token: Option<T>,
        now: Instant,
    ) -> Result<SeqNr, ProducerError> {
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        let seq_nr = self.current_seq_nr;
        if self.phase != Phase::Active || !self.requested || seq_nr > self.requested_seq_nr {
            return Err(self.fail(ProducerError::NoDemand {
                current: seq_nr,
                requested_up_to: self.requested_seq_nr,
            }));
        }
        let ack = token.is_some();
        if let Some(token) = token {
            self.awaiting_confirmation.push_back((seq_nr, token));
        }
        let sequenced = SequencedMessage {
            producer: self.me.clone(),
            seq_nr,
            message,
            first: seq_nr == self.first_seq_nr,
            ack,
        };
        if self.support_resend {
            self.unconfirmed.push_back(sequenced.clone());
        }
        if seq_nr == self.first_seq_nr {
            self.arm_resend_first(now);
        }
        self.transmits.push_back(sequenced);
        self.current_seq_nr = seq_nr.next();
        if seq_nr == self.requested_seq_nr {
            // Window exhausted: wait for the consumer's next Request.
            self.requested = false;
        } else {
            self.request_next(self.confirmed_seq_nr);
        }
        Ok(seq_nr)
    }

    fn on_ack(&mut self, confirmed: SeqNr) {
        while self
            .awaiting_confirmation
            .front()
            .is_some_and(|(seq_nr, _)| *seq_nr <= confirmed)
        {
            if let Some((seq_nr, token)) = self.awaiting_confirmation.pop_front() {
                self.events
                    .push_back(ProducerEvent::Confirmed { seq_nr, token });
            }
        }
        if self.support_resend {
            while self
                .unconfirmed
                .front()
                .is_some_and(|m| m.seq_nr <= confirmed)
            {
                self.unconfirmed.pop_front();
            }
        } else {
            self.unconfirmed.clear();
        }
        if confirmed == self.first_seq_nr {
            self.resend_first_at = None;
        }
        // The max, not the latest: Acks and Requests may arrive reordered (Akka.NET bug §8.4).
        self.confirmed_seq_nr = self.confirmed_seq_nr.max(confirmed);
    }

    fn receive_request(
        &mut self,
        confirmed: SeqNr,
        request_up_to: SeqNr,
        support_resend: bool,
        via_timeout: bool,
    ) -> Result<(), ProducerError> {
        if confirmed > request_up_to {
            return Err(self.fail(ProducerError::InconsistentRequest {
                confirmed,
                request_up_to,
            }));
        }
        let first_before = self.first_seq_nr;
        self.on_ack(confirmed);
        if !support_resend {
            self.unconfirmed.clear();
        }
        if (via_timeout || confirmed == first_before) && support_resend {
            // The tail may have been lost with nothing after it to reveal the gap.
            self.resend_all_unconfirmed();
        }
        // Without resending, everything sent beyond the window was probably lost: reopen it.
        let new_requested = if !support_resend && request_up_to <= self.current_seq_nr {
            self.current_seq_nr
                .plus(request_up_to.0.saturating_sub(confirmed.0))
        } else {
            request_up_to
        };
        if new_requested > self.requested_seq_nr {
            if !self.requested && new_requested > self.current_seq_nr {
                self.request_next(confirmed);
            }
            self.requested_seq_nr = new_requested;
        }
        self.support_resend = support_resend;
        Ok(())
    }

    fn receive_ack(&mut self, confirmed: SeqNr) {
        let first_before = self.first_seq_nr;
        self.on_ack(confirmed);
        if confirmed == first_before && !self.unconfirmed.is_empty() {
            self.resend_all_unconfirmed();
        }
    }

    fn receive_resend(&mut self, from: SeqNr) {
        if from == SeqNr::ZERO {
            // A consumer that never saw this producer asks for everything. Unlike Akka, mark the
            // head `first` before resending rather than after, so the consumer accepts this very
            // resend instead of asking again once per message it discards.
            if let Some(head) = self.unconfirmed.front_mut() {
                head.first = true;
            }
        }
        for m in self.unconfirmed.iter().filter(|m| m.seq_nr >= from) {
            self.transmits.push_back(m.clone());
        }
    }

    fn resend_all_unconfirmed(&mut self) {
        self.transmits.extend(self.unconfirmed.iter().cloned());
    }

    fn arm_resend_first(&mut self, now: Instant) {
        self.resend_first_at = Some(now + self.settings.resend_first_interval);
    }

    fn resend_first(&mut self) {
        match self.unconfirmed.front() {
            Some(head) if head.seq_nr == self.first_seq_nr => {
                self.transmits.push_back(head.as_first());
            }
            _ => {
                if self.current_seq_nr > self.first_seq_nr {
                    self.resend_first_at = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testkit::request;

    type Pc = ProducerController<&'static str, u32>;

    fn active_controller(now: Instant) -> Pc {
        let mut pc = Pc::new(ProducerId::new("p"), 1, ProducerSettings::default());
        pc.start();
        pc.register_consumer(now);
        pc
    }

    fn transmitted(pc: &mut Pc) -> Vec<(u64, bool)> {
        std::iter::from_fn(|| pc.poll_transmit())
            .map(|m| (m.seq_nr.0, m.first))
            .collect()
    }

    fn events(pc: &mut Pc) -> Vec<ProducerEvent<u32>> {
        std::iter::from_fn(|| pc.poll_event()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn requests_the_first_message_once_producer_and_consumer_are_known() {
        let now = Instant::now();
        let mut pc = Pc::new(ProducerId::new("p"), 1, ProducerSettings::default());
        pc.start();
        assert!(events(&mut pc).is_empty());
        pc.register_consumer(now);
        assert_eq!(
            events(&mut pc),
            vec![ProducerEvent::RequestNext {
                current_seq_nr: SeqNr(1),
                confirmed_seq_nr: SeqNr(0)
            }]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn pushes_the_first_message_before_any_request_then_waits_for_demand() {
        let now = Instant::now();
        let mut pc = active_controller(now);
        events(&mut pc);
        assert_eq!(pc.send("a", now), Ok(SeqNr(1)));
        assert_eq!(transmitted(&mut pc), vec![(1, true)]);
        // Window of one exhausted: no RequestNext until the consumer's Request.
        assert!(events(&mut pc).is_empty());
        assert!(!pc.has_demand());
        pc.handle_frame(request(0, 3), now).unwrap();
        assert_eq!(
            events(&mut pc),
            vec![ProducerEvent::RequestNext {
                current_seq_nr: SeqNr(2),
                confirmed_seq_nr: SeqNr(0)
            }]
        );
    }

    // PC-01
    #[tokio::test(start_paused = true)]
    async fn resends_the_first_message_every_interval_until_it_is_confirmed() {
        let start = Instant::now();
        let mut pc = active_controller(start);
        pc.send("a", start).unwrap();
        transmitted(&mut pc);
        assert_eq!(pc.poll_timeout(), Some(start + Duration::from_secs(1)));

        tokio::time::advance(Duration::from_secs(1)).await;
        pc.handle_timeout(Instant::now());
        assert_eq!(transmitted(&mut pc), vec![(1, true)]);
        assert_eq!(pc.poll_timeout(), Some(start + Duration::from_secs(2)));

        pc.handle_frame(request(1, 10), Instant::now()).unwrap();
        assert_eq!(pc.poll_timeout(), None);
        tokio::time::advance(Duration::from_millis(1100)).await;
        pc.handle_timeout(Instant::now());
        assert!(transmitted(&mut pc).is_empty());
    }

    // PC-02
    #[tokio::test(start_paused = true)]
    async fn resends_from_the_requested_seq_nr_on_resend() {
        let now = Instant::now();
        let mut pc = active_controller(now);
        pc.send("1", now).unwrap();
        pc.handle_frame(request(0, 10), now).unwrap();
        for m in ["2", "3", "4"] {
            pc.send(m, now).unwrap();
        }
        transmitted(&mut pc);
        pc.handle_frame(ConsumerFrame::Resend { from: SeqNr(3) }, now)
            .unwrap();
        assert_eq!(transmitted(&mut pc), vec![(3, false), (4, false)]);
        assert_eq!(pc.send("5", now), Ok(SeqNr(5)));
    }

    // PC-03
    #[tokio::test(start_paused = true)]
    async fn resends_the_lost_tail_on_a_request_via_timeout() {
        let now = Instant::now();
        let mut pc = active_controller(now);
        pc.send("1", now).unwrap();
        pc.handle_frame(request(1, 10), now).unwrap();
        for m in ["2", "3", "4"] {
            pc.send(m, now).unwrap();
        }
        transmitted(&mut pc);
        let via_timeout = ConsumerFrame::Request {
            confirmed: SeqNr(2),
            request_up_to: SeqNr(10),
            support_resend: true,
            via_timeout: true,
        };
        pc.handle_frame(via_timeout, now).unwrap();
        assert_eq!(transmitted(&mut pc), vec![(3, false), (4, false)]);
    }

    // PC-05
    #[tokio::test(start_paused = true)]
    async fn confirms_in_order_including_messages_whose_ack_was_lost() {
        let now = Instant::now();
        let mut pc = active_controller(now);
        events(&mut pc);
        pc.send_with_confirmation("1", 10, now).unwrap();
        pc.handle_frame(request(1, 10), now).unwrap();
        assert!(events(&mut pc).contains(&ProducerEvent::Confirmed {
            seq_nr: SeqNr(1),
            token: 10
        }));
        for (m, t) in [("2", 20), ("3", 30), ("4", 40)] {
            pc.send_with_confirmation(m, t, now).unwrap();
        }
        events(&mut pc);
        // Ack(3) is lost; Ack(4) confirms 2, 3 and 4 in order.
        pc.handle_frame(
            ConsumerFrame::Ack {
                confirmed: SeqNr(4),
            },
            now,
        )
        .unwrap();
        let tokens: Vec<u32> = events(&mut pc)
            .into_iter()
            .filter_map(|e| match e {
                ProducerEvent::Confirmed { token, .. } => Some(token),
                _ => None,
            })
            .collect();
        assert_eq!(tokens, vec![20, 30, 40]);
        assert_eq!(pc.unconfirmed_len(), 0);
    }

    // PC-06
    #[tokio::test(start_paused = true)]
    async fn a_restarted_producer_takes_over_the_pending_demand() {
        let now = Instant::now();
        let mut pc = active_controller(now);
        pc.send("1", now).unwrap();
        pc.handle_frame(request(1, 10), now).unwrap();
        pc.send("2", now).unwrap();
        events(&mut pc);
        pc.start();
        assert_eq!(
            events(&mut pc),
            vec![ProducerEvent::RequestNext {
                current_seq_nr: SeqNr(3),
                confirmed_seq_nr: SeqNr(1)
            }]
        );
        assert_eq!(pc.send("3", now), Ok(SeqNr(3)));
    }

    // PC-04
    #[tokio::test(start_paused = true)]
    async fn a_new_consumer_gets_the_first_unconfirmed_marked_first_then_the_rest() {
        let now = Instant::now();
        let mut pc = active_controller(now);
        pc.send("1", now).unwrap();
        pc.handle_frame(request(1, 10), now).unwrap();
        pc.send("2", now).unwrap();
        pc.send("3", now).unwrap();
        transmitted(&mut pc);

        pc.register_consumer(now);
        assert_eq!(transmitted(&mut pc), vec![(2, true)]);
        tokio::time::advance(Duration::from_secs(1)).await;
        pc.handle_timeout(Instant::now());
        assert_eq!(transmitted(&mut pc), vec![(2, true)]);

        pc.handle_frame(request(2, 10), Instant::now()).unwrap();
        assert_eq!(transmitted(&mut pc), vec![(3, false)]);
        assert_eq!(pc.send("4", Instant::now()), Ok(SeqNr(4)));
    }

    // PC-08
    #[tokio::test(start_paused = true)]
    async fn without_resend_support_nothing_is_buffered_or_resent() {
        let now = Instant::now();
        let mut pc = active_controller(now);
        pc.send("1", now).unwrap();
        let no_resend = |confirmed, up_to, via_timeout| ConsumerFrame::Request {
            confirmed: SeqNr(confirmed),
            request_up_to: SeqNr(up_to),
            support_resend: false,
            via_timeout,
        };
        pc.handle_frame(no_resend(1, 10, false), now).unwrap();
        for m in ["2", "3", "4"] {
            pc.send(m, now).unwrap();
        }
        transmitted(&mut pc);
        pc.handle_frame(no_resend(2, 10, true), now).unwrap();
        assert!(transmitted(&mut pc).is_empty());
        assert_eq!(pc.unconfirmed_len(), 0);
        assert_eq!(pc.send("5", now), Ok(SeqNr(5)));
    }

    // D-01
    #[tokio::test(start_paused = true)]
    async fn sending_without_demand_fails_the_controller() {
        let now = Instant::now();
        let mut pc = active_controller(now);
        pc.send("1", now).unwrap();
        let err = pc.send("2", now).unwrap_err();
        assert_eq!(
            err,
            ProducerError::NoDemand {
                current: SeqNr(2),
                requested_up_to: SeqNr(1)
            }
        );
        assert_eq!(pc.failure(), Some(&err));
        assert_eq!(pc.handle_frame(request(1, 5), now), Err(err));
    }

    // D-02
    #[tokio::test(start_paused = true)]
    async fn an_inconsistent_request_fails_the_controller() {
        let now = Instant::now();
        let mut pc = active_controller(now);
        pc.send("1", now).unwrap();
        let err = pc.handle_frame(request(5, 3), now).unwrap_err();
        assert!(matches!(err, ProducerError::InconsistentRequest { .. }));
        assert!(pc.failure().is_some());
        assert_eq!(pc.poll_timeout(), None);
    }

    // D-07
    #[tokio::test(start_paused = true)]
    async fn resend_from_zero_resends_everything_with_the_head_marked_first() {
        let now = Instant::now();
        let mut pc = active_controller(now);
        pc.send("1", now).unwrap();
        pc.handle_frame(request(1, 10), now).unwrap();
        pc.send("2", now).unwrap();
        pc.send("3", now).unwrap();
        transmitted(&mut pc);
        pc.handle_frame(ConsumerFrame::Resend { from: SeqNr(0) }, now)
            .unwrap();
        assert_eq!(transmitted(&mut pc), vec![(2, true), (3, false)]);
    }

    // D-09
    #[tokio::test(start_paused = true)]
    async fn an_ack_of_the_first_message_stops_resending_it() {
        let now = Instant::now();
        let mut pc = active_controller(now);
        pc.send_with_confirmation("1", 1, now).unwrap();
        assert!(pc.poll_timeout().is_some());
        pc.handle_frame(
            ConsumerFrame::Ack {
                confirmed: SeqNr(1),
            },
            now,
        )
        .unwrap();
        assert_eq!(pc.poll_timeout(), None);
    }
}
