//! The ProducerController core: numbers a producer's messages, keeps the unconfirmed ones for
//! resending, grants the producer one message at a time within the consumer's flow-control
//! window, splits large messages into chunks, stores messages in a durable queue before sending
//! them when it has one, and reports confirmations (Akka's `ProducerControllerImpl`,
//! docs/protocol.md, "Producer controller").
//!
//! Sans-IO: no clock reads, no tasks, no channels, no storage. The owner feeds inputs with
//! `now` and drains, after every input, [`ProducerController::poll_transmit`] (frames for the
//! consumer), [`ProducerController::poll_event`] (for the producer),
//! [`ProducerController::poll_store`] (requests for the durable queue, whose answers come back
//! through the `handle_*` methods) and [`ProducerController::poll_timeout`].

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;

use crate::delivery::codec::{Codec, CodecError};
use crate::delivery::durable::front::DurableFront;
use crate::delivery::durable::{
    DurableError, DurableState, MessageSent, NO_QUALIFIER, StoreClient, StoreRequest,
};
use crate::delivery::protocol::{ConsumerFrame, ProducerId, ProducerRef, SeqNr, SequencedMessage};
use crate::delivery::settings::{ProducerSettings, timer_interval};

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
    /// A message sent with [`ProducerController::send_with_confirmation`] is confirmed: by the
    /// consumer, or, with a durable queue, by the queue having stored it. Emitted in sequence
    /// order; for a chunked message `seq_nr` is its last chunk's.
    Confirmed {
        /// The confirmed message's sequence number.
        seq_nr: SeqNr,
        /// The token given when it was sent.
        token: T,
    },
}

/// Why the controller stopped; it refuses every further input.
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
    /// The consumer sent a Request whose confirmed sequence number is beyond its own window,
    /// or whose window is wider than any consumer can be configured with.
    #[error("inconsistent request: confirmed {confirmed}, requested up to {request_up_to}")]
    InconsistentRequest {
        /// The confirmed sequence number in the Request.
        confirmed: SeqNr,
        /// The window end in the Request.
        request_up_to: SeqNr,
    },
    /// The consumer confirmed a sequence number this controller never sent. Trusting it would
    /// drop unconfirmed messages and, with a durable queue, store a confirmation that hides
    /// every real one up to it.
    #[error("the consumer confirmed {confirmed}, but only messages before {current} were sent")]
    ConfirmedUnsent {
        /// The confirmed sequence number in the frame.
        confirmed: SeqNr,
        /// The next sequence number to be sent.
        current: SeqNr,
    },
    /// The durable queue failed beyond its retry attempts.
    #[error(transparent)]
    Durable(#[from] DurableError),
    /// A message could not be serialized for chunking.
    #[error("message could not be chunked: {0}")]
    Codec(#[from] CodecError),
}

#[derive(Debug)]
enum Phase {
    /// Waiting for the producer's Start, a consumer, and the (durable) state.
    Initializing {
        has_producer: bool,
        has_consumer: bool,
    },
    Active,
}

/// Sans-IO ProducerController for message type `M` (cloned once per send for the resend
/// buffer: make it cheap to clone) and confirmation token `T`.
///
/// Inputs: [`Self::start`], [`Self::register_consumer`], [`Self::send`],
/// [`Self::send_with_confirmation`], [`Self::handle_frame`], [`Self::resend_first_unconfirmed`],
/// the durable-queue answers, and [`Self::handle_timeout`].
///
/// Guarantees: while neither side restarts, the consumer sees every message once, in order.
/// `Confirmed` means processed by the consumer (without a durable queue) or stored (with one).
/// With a durable queue a restarted controller resends what was stored and not confirmed
/// (at-least-once).
pub struct ProducerController<M, T> {
    me: ProducerRef,
    settings: ProducerSettings,
    chunking: Option<(usize, Arc<dyn Codec<M>>)>,
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
    /// Chunks of the current message not sent (nor being stored) yet; the head is next.
    remaining_chunks: VecDeque<SequencedMessage<M>>,
    /// With a durable queue: the state to load, and the chunk being stored (one at a time,
    /// with whether it opens the session).
    front: DurableFront<M, bool>,
    awaiting_confirmation: VecDeque<(SeqNr, T)>,
    /// Periodic ResendFirst timer; `None` when cancelled.
    resend_first_at: Option<Instant>,
    transmits: VecDeque<SequencedMessage<M>>,
    /// Messages sent again so far (lost, or waking a consumer), for metrics.
    resent: u64,
    events: VecDeque<ProducerEvent<T>>,
}

impl<M: std::fmt::Debug, T> std::fmt::Debug for ProducerController<M, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerController")
            .field("producer", &self.me)
            .field("current_seq_nr", &self.current_seq_nr)
            .field("confirmed_seq_nr", &self.confirmed_seq_nr)
            .field("requested_seq_nr", &self.requested_seq_nr)
            .field("unconfirmed", &self.unconfirmed.len())
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl<M: Clone + 'static, T> ProducerController<M, T> {
    /// A controller without a durable queue; `incarnation` must differ from any earlier
    /// controller with the same id that a consumer may still remember.
    pub fn new(producer_id: ProducerId, incarnation: u64, settings: ProducerSettings) -> Self {
        Self::build(producer_id, incarnation, settings, DurableFront::volatile())
    }

    /// A controller with a durable queue: it first asks for the stored state
    /// ([`StoreRequest::LoadState`]) and resumes from it.
    pub fn with_durable_queue(
        producer_id: ProducerId,
        incarnation: u64,
        settings: ProducerSettings,
    ) -> Self {
        let front = DurableFront::durable(settings.durable_queue.retry_attempts);
        Self::build(producer_id, incarnation, settings, front)
    }

    fn build(
        producer_id: ProducerId,
        incarnation: u64,
        settings: ProducerSettings,
        front: DurableFront<M, bool>,
    ) -> Self {
        ProducerController {
            me: ProducerRef {
                id: producer_id,
                incarnation,
            },
            settings,
            chunking: None,
            phase: Phase::Initializing {
                has_producer: false,
                has_consumer: false,
            },
            failure: None,
            requested: false,
            current_seq_nr: SeqNr(1),
            confirmed_seq_nr: SeqNr::ZERO,
            requested_seq_nr: SeqNr(1),
            first_seq_nr: SeqNr(1),
            support_resend: true,
            unconfirmed: VecDeque::new(),
            remaining_chunks: VecDeque::new(),
            front,
            awaiting_confirmation: VecDeque::new(),
            resend_first_at: None,
            transmits: VecDeque::new(),
            resent: 0,
            events: VecDeque::new(),
        }
    }

    /// Turns on chunking (when `chunk_large_messages` is set) with `codec` to serialize messages.
    pub fn with_codec(mut self, codec: Arc<dyn Codec<M>>) -> Self {
        self.chunking = self
            .settings
            .chunk_large_messages
            .map(|size| (size.max(1) as usize, codec));
        self
    }

    /// This controller's identity, carried in every message it sends.
    pub fn producer_ref(&self) -> &ProducerRef {
        &self.me
    }

    /// True once the producer, a consumer and the state are all there.
    pub fn is_active(&self) -> bool {
        matches!(self.phase, Phase::Active)
    }

    /// The producer holds an unused `RequestNext`: it may send one message now.
    pub fn has_demand(&self) -> bool {
        self.failure.is_none()
            && self.requested
            && self.nothing_pending()
            && self.current_seq_nr <= self.requested_seq_nr
    }

    /// While the producer has demand: the highest sequence number it may use now. Each message
    /// takes one number when nothing is chunked, so a driver may grant the producer the whole
    /// range at once; the core still checks every send against it.
    pub fn requested_up_to(&self) -> Option<SeqNr> {
        self.has_demand().then_some(self.requested_seq_nr)
    }

    /// True when one message takes exactly one sequence number and no storage step: then the
    /// whole [`Self::requested_up_to`] range may be granted at once.
    pub fn grants_whole_window(&self) -> bool {
        self.chunking.is_none() && !self.front.is_durable()
    }

    /// Sequence number the next message will get.
    pub fn current_seq_nr(&self) -> SeqNr {
        self.current_seq_nr
    }

    /// Highest sequence number the consumer confirmed.
    pub fn confirmed_seq_nr(&self) -> SeqNr {
        self.confirmed_seq_nr
    }

    /// Everything the producer sent is confirmed and nothing waits to be sent or stored: the
    /// controller may stop without losing anything.
    pub fn is_settled(&self) -> bool {
        self.is_active()
            && self.nothing_pending()
            && self.confirmed_seq_nr.next() >= self.current_seq_nr
    }

    /// Messages sent but not yet confirmed (kept for resending).
    pub fn unconfirmed_len(&self) -> usize {
        self.unconfirmed.len()
    }

    /// Messages sent again so far, on a consumer's `Resend`, a timer, or a wake-up.
    pub fn resent(&self) -> u64 {
        self.resent
    }

    /// Messages sent with confirmation whose confirmation is still to come.
    pub fn awaiting_confirmation_len(&self) -> usize {
        self.awaiting_confirmation.len()
    }

    /// Chunks of the current message not sent yet: the random suite checks none are left.
    #[cfg(any(test, feature = "testkit"))]
    pub(crate) fn unsent_chunks_len(&self) -> usize {
        self.remaining_chunks.len() + self.front.storing()
    }

    /// Gives back buffer memory kept from busier times (for controllers that sit idle).
    pub fn shrink_buffers(&mut self) {
        self.unconfirmed.shrink_to_fit();
        self.remaining_chunks.shrink_to_fit();
        self.awaiting_confirmation.shrink_to_fit();
        self.transmits.shrink_to_fit();
        self.events.shrink_to_fit();
        self.front.shrink_to_fit();
    }

    /// Why the controller stopped, if it did.
    pub fn failure(&self) -> Option<&ProducerError> {
        self.failure.as_ref()
    }

    /// The producer (re)registered (Akka's `Start`): a pending demand is offered to it again.
    pub fn start(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Initializing { has_producer, .. } => {
                *has_producer = true;
                self.activate_when_ready(now);
            }
            Phase::Active => {
                if self.requested && self.nothing_pending() {
                    self.request_next(self.confirmed_seq_nr);
                }
            }
        }
    }

    /// A consumer (re)connected (Akka's `RegisterConsumer`). While active this starts a new
    /// session: the first unconfirmed message is re-sent marked `first` until confirmed, then
    /// the rest follow.
    pub fn register_consumer(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Initializing { has_consumer, .. } => {
                *has_consumer = true;
                self.activate_when_ready(now);
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
        self.receive_message(message, None, now)
    }

    /// Sends `message` and emits [`ProducerEvent::Confirmed`] with `token` once it is confirmed
    /// (Akka's `MessageWithConfirmation`). Returns the sequence number the reply will carry.
    pub fn send_with_confirmation(
        &mut self,
        message: M,
        token: T,
        now: Instant,
    ) -> Result<SeqNr, ProducerError> {
        self.receive_message(message, Some(token), now)
    }

    /// A frame from the consumer side of the link.
    pub fn handle_frame(
        &mut self,
        frame: ConsumerFrame,
        now: Instant,
    ) -> Result<(), ProducerError> {
        self.check_running()?;
        if let ConsumerFrame::RegisterConsumer = frame {
            self.register_consumer(now);
            return Ok(());
        }
        if !self.is_active() {
            // Akka drops these while initializing; the consumer retries.
            return Ok(());
        }
        match frame {
            ConsumerFrame::Request {
                confirmed,
                request_up_to,
                support_resend,
                via_timeout,
            } => self.receive_request(confirmed, request_up_to, support_resend, via_timeout, now),
            ConsumerFrame::Ack { confirmed } => {
                self.check_sent(confirmed)?;
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
            self.resent += 1;
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

    fn check_running(&self) -> Result<(), ProducerError> {
        match &self.failure {
            Some(failure) => Err(failure.clone()),
            None => Ok(()),
        }
    }

    fn fail(&mut self, error: ProducerError) -> ProducerError {
        self.failure = Some(error.clone());
        self.resend_first_at = None;
        error
    }

    /// Nothing of the last message waits to be sent or stored.
    fn nothing_pending(&self) -> bool {
        self.remaining_chunks.is_empty() && self.front.is_idle()
    }

    fn activate_when_ready(&mut self, now: Instant) {
        let Phase::Initializing {
            has_producer: true,
            has_consumer: true,
        } = self.phase
        else {
            return;
        };
        let Some(state) = self.front.take_state() else {
            return;
        };
        self.phase = Phase::Active;
        self.current_seq_nr = state.current_seq_nr;
        self.confirmed_seq_nr = state.highest_confirmed_seq_nr;
        self.first_seq_nr = state.highest_confirmed_seq_nr.next();
        // pekko's fix (#2762): the window starts at the current sequence number, not at 1.
        self.requested_seq_nr = state.current_seq_nr;
        self.unconfirmed = state
            .unconfirmed
            .into_iter()
            .enumerate()
            .map(|(i, sent)| SequencedMessage {
                producer: self.me.clone(),
                seq_nr: sent.seq_nr,
                payload: sent.payload,
                first: i == 0,
                ack: sent.ack,
            })
            .collect();
        if self.unconfirmed.is_empty() {
            self.request_next(self.confirmed_seq_nr);
        } else {
            self.requested = false;
            // Unlike Akka (docs/protocol.md, "Resuming from a durable queue"), keep resending until
            // confirmed: the one immediate resend may be lost.
            self.arm_resend_first(now);
            self.resend_first();
        }
    }

    fn request_next(&mut self, confirmed_seq_nr: SeqNr) {
        self.requested = true;
        self.events.push_back(ProducerEvent::RequestNext {
            current_seq_nr: self.current_seq_nr,
            confirmed_seq_nr,
        });
    }

    fn receive_message(
        &mut self,
        message: M,
        token: Option<T>,
        now: Instant,
    ) -> Result<SeqNr, ProducerError> {
        self.check_running()?;
        if !self.is_active() || !self.has_demand() {
            return Err(self.fail(ProducerError::NoDemand {
                current: self.current_seq_nr,
                requested_up_to: self.requested_seq_nr,
            }));
        }
        // With demand nothing remains from the previous message: the buffer's capacity is
        // reused, so an unchunked send allocates nothing here.
        if let Err(error) = self.chunk(message, token.is_some()) {
            return Err(self.fail(error));
        }
        let last_seq_nr = self
            .remaining_chunks
            .back()
            .map_or(self.current_seq_nr, |m| m.seq_nr);
        if let Some(token) = token {
            self.awaiting_confirmation.push_back((last_seq_nr, token));
        }
        if self.front.is_durable() {
            self.store_next_chunk();
        } else {
            self.send_chunks(now);
        }
        Ok(last_seq_nr)
    }

    /// Stores the next chunk if the window allows and no store is under way (durable queue).
    fn store_next_chunk(&mut self) {
        let window_allows = self
            .remaining_chunks
            .front()
            .is_some_and(|m| m.seq_nr <= self.requested_seq_nr);
        if !window_allows || !self.front.is_idle() {
            return;
        }
        if let Some(head) = self.remaining_chunks.pop_front() {
            // The payload moves into the store request; `first` is all the record lacks to
            // become the sequenced message again once it is stored.
            let sent = MessageSent {
                seq_nr: head.seq_nr,
                payload: head.payload,
                ack: head.ack,
                qualifier: NO_QUALIFIER.to_owned(),
                timestamp_millis: 0,
            };
            self.front.store(sent, head.first);
        }
    }

    /// Sends one message or chunk to the consumer (Akka's `onMsg`).
    fn on_msg(&mut self, sequenced: SequencedMessage<M>, now: Instant) {
        let seq_nr = sequenced.seq_nr;
        let last_chunk = sequenced.payload.is_last_chunk();
        if self.support_resend {
            self.unconfirmed.push_back(sequenced.clone());
        }
        if seq_nr == self.first_seq_nr {
            self.arm_resend_first(now);
        }
        self.transmits.push_back(sequenced);
        self.current_seq_nr = seq_nr.next();
        if seq_nr == self.requested_seq_nr {
            // Window used up: wait for the consumer's next Request (keep the producer's demand
            // until the message's last chunk is out).
            self.requested = !self.remaining_chunks.is_empty();
        } else if last_chunk {
            self.request_next(self.confirmed_seq_nr);
        } else {
            self.requested = true;
        }
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
        // The max, not the latest: Acks and Requests may arrive reordered (Akka.NET bug, see
        // docs/protocol.md, "Where the Akka ports disagree").
        let new_max = self.confirmed_seq_nr.max(confirmed);
        if new_max != self.confirmed_seq_nr {
            self.front.confirmed(new_max, NO_QUALIFIER);
        }
        self.confirmed_seq_nr = new_max;
    }

    fn receive_request(
        &mut self,
        confirmed: SeqNr,
        request_up_to: SeqNr,
        support_resend: bool,
        via_timeout: bool,
        now: Instant,
    ) -> Result<(), ProducerError> {
        let window = request_up_to.distance_from(confirmed);
        if window.is_none_or(|w| w > u64::from(u32::MAX)) {
            return Err(self.fail(ProducerError::InconsistentRequest {
                confirmed,
                request_up_to,
            }));
        }
        self.check_sent(confirmed)?;
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
            self.requested_seq_nr = new_requested;
            if !self.front.is_idle() {
                // The stored chunk goes out when the store answers.
            } else if !self.remaining_chunks.is_empty() {
                if self.front.is_durable() {
                    self.store_next_chunk();
                } else {
                    self.send_chunks(now);
                }
            } else if !self.requested && new_requested > self.current_seq_nr {
                self.request_next(confirmed);
            }
        }
        self.support_resend = support_resend;
        Ok(())
    }

    /// A confirmation may only name a message this controller sent.
    fn check_sent(&mut self, confirmed: SeqNr) -> Result<(), ProducerError> {
        if confirmed >= self.current_seq_nr {
            return Err(self.fail(ProducerError::ConfirmedUnsent {
                confirmed,
                current: self.current_seq_nr,
            }));
        }
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
            self.resent += 1;
        }
    }

    fn resend_all_unconfirmed(&mut self) {
        self.transmits.extend(self.unconfirmed.iter().cloned());
        self.resent += self.unconfirmed.len() as u64;
    }

    fn arm_resend_first(&mut self, now: Instant) {
        self.resend_first_at =
            Some(now + timer_interval(self.settings.durable_queue.resend_first_interval));
    }

    fn resend_first(&mut self) {
        match self.unconfirmed.front() {
            Some(head) if head.seq_nr == self.first_seq_nr => {
                self.transmits.push_back(head.as_first());
                self.resent += 1;
            }
            _ => {
                if self.current_seq_nr > self.first_seq_nr {
                    self.resend_first_at = None;
                }
            }
        }
    }
}

impl<M: Clone + 'static, T> StoreClient<M> for ProducerController<M, T> {
    fn handle_state_loaded(&mut self, state: DurableState<M>, now: Instant) {
        // The front takes a state only while it waits for one, so only while initializing.
        if self.front.state_loaded(state) {
            self.activate_when_ready(now);
        }
    }

    fn handle_load_failed(&mut self, attempt: u32) {
        if self.failure.is_none()
            && let Err(error) = self.front.load_failed(attempt)
        {
            self.fail(error.into());
        }
    }

    /// Reply to an asker, send the stored chunk, and store the next one if there is one.
    fn handle_message_stored(&mut self, seq_nr: SeqNr, now: Instant) {
        if self.failure.is_some() {
            return;
        }
        // None: a late answer to an earlier attempt.
        let Some((sent, first)) = self.front.stored(seq_nr) else {
            return;
        };
        let stored = SequencedMessage {
            producer: self.me.clone(),
            seq_nr: sent.seq_nr,
            payload: sent.payload,
            first,
            ack: sent.ack,
        };
        if let Some(position) = self
            .awaiting_confirmation
            .iter()
            .position(|(s, _)| *s == seq_nr)
            && let Some((seq_nr, token)) = self.awaiting_confirmation.remove(position)
        {
            // With a durable queue the reply comes after storage, not after the consumer.
            self.events
                .push_back(ProducerEvent::Confirmed { seq_nr, token });
        }
        self.on_msg(stored, now);
        self.store_next_chunk();
    }

    /// Retries the same chunk, or fails after `retry_attempts`. Akka re-stores a chunked
    /// message from its first chunk because its store restarts and forgets partial runs; ours
    /// keep what they acknowledged and take a retry of the last record as a no-op, so the chunk
    /// itself is the right retry (a full restart still drops partial runs in `load_state`).
    fn handle_store_failed(&mut self, seq_nr: SeqNr, attempt: u32) {
        if self.failure.is_none()
            && let Err(error) = self.front.store_failed(seq_nr, attempt)
        {
            self.fail(error.into());
        }
    }

    fn poll_store(&mut self) -> Option<StoreRequest<M>> {
        self.front.poll_request()
    }
}

mod chunking;
#[cfg(test)]
mod tests;
