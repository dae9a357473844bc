//! The ConsumerController core: accepts sequenced messages from a ProducerController, delivers
//! them to its consumer one at a time and in order, detects gaps and asks for resends, grants
//! the producer a flow-control window, and retries its requests with back-off while idle
//! (Akka's `ConsumerControllerImpl`, docs/protocol.md, "Consumer controller").
//!
//! Sans-IO: the owner feeds inputs with `now` and drains [`ConsumerController::poll_transmit`],
//! [`ConsumerController::poll_event`] and [`ConsumerController::poll_timeout`] after every
//! input. Chunked messages are reassembled here, from contiguous pieces only.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::delivery::codec::Codec;
use crate::delivery::protocol::{
    ConsumerFrame, Payload, ProducerId, ProducerRef, SeqNr, SequencedMessage,
};
use crate::delivery::settings::{ConsumerSettings, MIN_FLOW_CONTROL_WINDOW, timer_interval};

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

/// A consumer-side problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConsumerError {
    /// `confirm` was called while no delivery was outstanding; nothing changed.
    #[error("confirmation while no delivery is outstanding")]
    NothingToConfirm,
    /// A chunked message could not be reassembled (no codec, or it does not decode); the
    /// controller stopped, as Akka's does, since a retry would meet the same bytes.
    #[error("chunked message seq nr {seq_nr} cannot be decoded: {reason}")]
    Undecodable {
        /// The message's last chunk.
        seq_nr: SeqNr,
        /// Why.
        reason: String,
    },
    /// A chunked message grew beyond [`MAX_REASSEMBLED_BYTES`]; the controller stopped.
    #[error("chunked message at seq nr {seq_nr} exceeds {MAX_REASSEMBLED_BYTES} bytes")]
    TooLarge {
        /// The chunk that crossed the limit.
        seq_nr: SeqNr,
    },
}

/// The largest chunked message a consumer reassembles; beyond it the producer is misbehaving
/// (or misconfigured) and the controller stops rather than grow without bound.
pub const MAX_REASSEMBLED_BYTES: usize = 64 * 1024 * 1024;

/// The pieces of a chunked message collected so far.
#[derive(Debug)]
struct Reassembly {
    pieces: Vec<Bytes>,
    bytes: usize,
    /// Its first chunk was marked `first` (the producer's first message).
    first: bool,
    /// The sequence number of the last piece collected; the next must follow it.
    through: SeqNr,
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
        let min = timer_interval(min);
        let max = timer_interval(max).max(min);
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
    /// The chunked message being reassembled (boxed: idle controllers stay small).
    reassembly: Option<Box<Reassembly>>,
    codec: Option<Arc<dyn Codec<M>>>,
    failure: Option<ConsumerError>,
    retry: RetryTimer,
    transmits: VecDeque<(ProducerRef, ConsumerFrame)>,
    events: VecDeque<ConsumerEvent<M>>,
}

impl<M> std::fmt::Debug for ConsumerController<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerController")
            .field("producer", &self.producer)
            .field("received", &self.received)
            .field("confirmed", &self.confirmed)
            .field("requested", &self.requested)
            .field("stash", &self.stash.len())
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

/// What works for any message type: stopping and draining frames (used from `Drop`).
impl<M> ConsumerController<M> {
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

    /// The next frame, with the producer it is for.
    pub fn poll_transmit(&mut self) -> Option<(ProducerRef, ConsumerFrame)> {
        self.transmits.pop_front()
    }

    fn become_stopped(&mut self) {
        self.phase = Phase::Stopped;
        self.stash.clear();
        self.events.push_back(ConsumerEvent::Stopped);
    }

    /// True once the controller has stopped for good.
    pub fn is_stopped(&self) -> bool {
        matches!(self.phase, Phase::Stopped)
    }

    /// Holds and owes nothing: no delivery out, nothing stashed, half reassembled, to send or
    /// to hand over. Dropped then, it loses only what it knows of the producer's sequence,
    /// as a passivated entity's controller does.
    pub fn is_quiet(&self) -> bool {
        matches!(self.phase, Phase::Active | Phase::Stopped)
            && self.registering.is_none()
            && !self.stopping
            && self.stash.is_empty()
            && self.reassembly.is_none()
            && self.transmits.is_empty()
            && self.events.is_empty()
    }

    /// Messages stashed behind the outstanding delivery: the random suite checks none are left.
    #[cfg(any(test, feature = "testkit"))]
    pub(crate) fn stashed_len(&self) -> usize {
        self.stash.len()
    }

    /// Chunks held toward a message not yet whole: the random suite checks none are left.
    #[cfg(any(test, feature = "testkit"))]
    pub(crate) fn reassembling_len(&self) -> usize {
        self.reassembly.as_ref().map_or(0, |r| r.pieces.len())
    }
}

impl<M: Clone + 'static> ConsumerController<M> {
    /// A controller waiting for its consumer's Start; its retry timer runs from `now`.
    pub fn new(settings: ConsumerSettings, now: Instant) -> Self {
        let retry = RetryTimer::new(
            settings.resend_interval_min,
            settings.resend_interval_max,
            now,
        );
        ConsumerController {
            // Below 3 the half-window Request never fires and delivery stalls; the config
            // path rejects such values by key, code that builds settings gets the minimum.
            window: u64::from(settings.flow_control_window.max(MIN_FLOW_CONTROL_WINDOW)),
            settings,
            phase: Phase::WaitingForStart,
            producer: None,
            received: SeqNr::ZERO,
            confirmed: SeqNr::ZERO,
            requested: SeqNr::ZERO,
            registering: None,
            stopping: false,
            stash: VecDeque::new(),
            reassembly: None,
            codec: None,
            failure: None,
            retry,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Reassembles chunked messages with `codec` (needed when the producer chunks).
    pub fn with_codec(mut self, codec: Arc<dyn Codec<M>>) -> Self {
        self.codec = Some(codec);
        self
    }

    /// Why the controller stopped, when it stopped on an error.
    pub fn failure(&self) -> Option<&ConsumerError> {
        self.failure.as_ref()
    }

    /// Gives back buffer memory kept from busier times (for controllers that sit idle).
    pub fn shrink_buffers(&mut self) {
        self.stash.shrink_to_fit();
        self.transmits.shrink_to_fit();
        self.events.shrink_to_fit();
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
                if let Some(redelivery) = self.delivery_of(current) {
                    self.events.push_back(ConsumerEvent::Deliver(redelivery));
                }
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

    /// The delivery of a whole message (chunks are reassembled before they get here).
    fn delivery_of(&self, message: &SequencedMessage<M>) -> Option<Delivery<M>> {
        match &message.payload {
            Payload::Message(m) => Some(Delivery {
                message: m.clone(),
                producer_id: message.producer.id.clone(),
                seq_nr: message.seq_nr,
            }),
            Payload::Chunk(_) => None,
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
            self.deliver(message, now);
        } else if message.seq_nr > expected {
            if self.resend_lost() {
                self.start_resending(message.producer, expected, now);
            } else {
                // Only flow control: lost messages are skipped.
                self.received = message.seq_nr;
                self.deliver(message, now);
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
            self.deliver(message, now);
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
            self.reassembly = None;
            self.received = message.seq_nr;
            self.confirmed = SeqNr::ZERO;
            self.requested = up_to;
            self.deliver(message, now);
        } else if self.received == SeqNr::ZERO {
            // A fresh consumer (e.g. a re-created entity) joined mid-stream: ask for everything
            // unconfirmed, with the head marked first; once, not again for every message still
            // on its way (each ask resends all of them; the retry timer repeats a lost one).
            let asked = matches!(
                &self.phase,
                Phase::Resending { producer, from }
                    if *producer == message.producer && *from == SeqNr::ZERO
            );
            if !asked {
                self.start_resending(message.producer, SeqNr::ZERO, now);
            }
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

    fn deliver(&mut self, message: SequencedMessage<M>, now: Instant) {
        let SequencedMessage {
            producer,
            seq_nr,
            payload,
            first,
            ack,
        } = message;
        let chunk = match payload {
            Payload::Message(m) => {
                self.reassembly = None;
                let whole = SequencedMessage {
                    producer,
                    seq_nr,
                    payload: Payload::Message(m),
                    first,
                    ack,
                };
                self.hand_to_consumer(whole);
                return;
            }
            Payload::Chunk(chunk) => chunk,
        };
        let continues = self
            .reassembly
            .as_ref()
            .is_some_and(|r| r.through.next() == seq_nr);
        if chunk.first_chunk {
            self.reassembly = Some(Box::new(Reassembly {
                pieces: Vec::new(),
                bytes: 0,
                first,
                through: seq_nr,
            }));
        } else if !continues {
            // Its first chunk was skipped (only flow control), or a new producer started
            // mid-message: these pieces cannot make a whole message.
            tracing::warn!(%seq_nr, "discarding a chunk without the start of its message");
            self.reassembly = None;
            self.request_more_while_chunks_arrive(&producer, seq_nr, now);
            self.phase = Phase::Active;
            return;
        }
        let Some(reassembly) = self.reassembly.as_mut() else {
            return;
        };
        reassembly.through = seq_nr;
        reassembly.bytes = reassembly.bytes.saturating_add(chunk.bytes.len());
        reassembly.pieces.push(chunk.bytes);
        if reassembly.bytes > MAX_REASSEMBLED_BYTES {
            tracing::error!(%seq_nr, "chunked message exceeds {MAX_REASSEMBLED_BYTES} bytes; stopping");
            self.failure = Some(ConsumerError::TooLarge { seq_nr });
            self.reassembly = None;
            self.become_stopped();
            return;
        }
        if !chunk.last_chunk {
            self.request_more_while_chunks_arrive(&producer, seq_nr, now);
            self.phase = Phase::Active;
            return;
        }
        let Some(reassembly) = self.reassembly.take() else {
            return;
        };
        let mut bytes = BytesMut::with_capacity(reassembly.bytes);
        for piece in &reassembly.pieces {
            bytes.extend_from_slice(piece);
        }
        let decoded = match &self.codec {
            Some(codec) => codec.decode(&bytes).map_err(|e| e.to_string()),
            None => Err("no codec to reassemble chunked messages".to_owned()),
        };
        match decoded {
            Ok(m) => {
                let whole = SequencedMessage {
                    producer,
                    seq_nr,
                    payload: Payload::Message(m),
                    first: reassembly.first,
                    ack,
                };
                self.hand_to_consumer(whole);
            }
            Err(reason) => {
                tracing::error!(%seq_nr, %reason, "chunked message cannot be decoded; stopping");
                self.failure = Some(ConsumerError::Undecodable { seq_nr, reason });
                self.become_stopped();
            }
        }
    }

    /// Many chunks can use up the window before any message is confirmed: ask for more at
    /// half of it.
    fn request_more_while_chunks_arrive(
        &mut self,
        producer: &ProducerRef,
        seq_nr: SeqNr,
        now: Instant,
    ) {
        let half = self.window / 2;
        if self.requested.distance_from(seq_nr) == Some(half) {
            let up_to = self.requested.plus(half);
            self.transmit_request(producer, self.confirmed, up_to, false);
            self.retry.start(now);
            self.requested = up_to;
        }
    }

    fn hand_to_consumer(&mut self, whole: SequencedMessage<M>) {
        if let Some(delivery) = self.delivery_of(&whole) {
            self.events.push_back(ConsumerEvent::Deliver(delivery));
        }
        self.phase = Phase::WaitingForConfirmation(whole);
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
}

#[cfg(test)]
mod tests;
