//! The WorkPullingProducerController core (Akka JVM's, docs/protocol.md,
//! "Work-pulling producer controller"): one producer feeding many workers. Each worker gets a child
//! ProducerController; a message goes to a random worker that has demand, or waits in a bounded
//! buffer until one does. When a worker goes away, its unconfirmed messages are routed to the
//! others (at-least-once). With a durable queue the worker is chosen before the message is stored,
//! so its confirmation qualifier is known, and messages re-routed after a restart or a departure
//! are stored again under their new worker before the old record is confirmed (the hand-over).
//!
//! Sans-IO like the other cores: inputs with `now`, outputs drained with `poll_transmit`
//! (frames for a worker), `poll_event`, `poll_store` and `poll_timeout`. Workers are named by
//! `W` (any address type); where the list of workers comes from is the driver's business.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::delivery::durable::front::DurableFront;
use crate::delivery::durable::{
    DurableError, DurableState, MessageSent, Qualifier, StoreClient, StoreRequest,
};
use crate::delivery::producer::{ProducerController, ProducerEvent};
use crate::delivery::protocol::{
    ConsumerFrame, Payload, ProducerId, ProducerRef, SeqNr, SequencedMessage,
};
use crate::delivery::settings::ProducerSettings;

/// What the controller tells its producer.
#[derive(Debug, PartialEq, Eq)]
pub enum WorkPullingEvent<T> {
    /// The producer may send exactly one message.
    RequestNext,
    /// A message sent with confirmation was confirmed by its worker (or, with a durable queue,
    /// stored).
    Confirmed {
        /// The token given with the message.
        token: T,
    },
}

/// Why the controller stopped; it refuses every further input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WorkPullingError {
    /// The producer sent without an unused `RequestNext` (D-14).
    #[error("message sent without demand")]
    NoDemand,
    /// A new message found `buffer_size` messages already waiting for a worker (D-10).
    /// Messages re-routed from departed workers never fail the controller: they are bounded by
    /// those workers' windows, and failing would lose them.
    #[error("buffer of {0} messages waiting for a worker is full")]
    BufferFull(usize),
    /// The durable queue failed beyond its retry attempts.
    #[error(transparent)]
    Store(#[from] DurableError),
    /// Chunking was configured; work pulling cannot chunk.
    #[error("work pulling does not support chunk_large_messages")]
    ChunkingUnsupported,
}

/// Where a message waiting for a worker came from.
#[derive(Clone, Debug)]
enum Origin {
    /// Sent by the producer just now (it used up the producer's RequestNext).
    Fresh,
    /// Already waited in the buffer, or came back from a departed worker (not durable).
    Rerouted,
    /// Stored under another qualifier: store again for the new worker, then confirm the old.
    HandOver {
        old_qualifier: Qualifier,
        old_seq_nr: SeqNr,
    },
}

struct Pending<M, T> {
    message: M,
    reply: Option<T>,
    origin: Origin,
}

struct Unconfirmed<M, T> {
    out_seq_nr: SeqNr,
    total_seq_nr: SeqNr,
    message: M,
    reply: Option<T>,
}

struct Worker<M, T> {
    qualifier: Qualifier,
    controller: ProducerController<M, ()>,
    unconfirmed: VecDeque<Unconfirmed<M, T>>,
    /// Its demand is promised to a message being stored (durable mode).
    reserved: bool,
}

/// A message chosen for a worker and being stored.
/// What a message being stored needs once it is.
struct Storing<T, W> {
    worker: W,
    reply: Option<T>,
    hand_over: Option<(Qualifier, SeqNr)>,
    fresh: bool,
}

enum Phase {
    /// Waiting for the producer's Start and the (durable) state.
    Initializing {
        has_producer: bool,
    },
    Active,
}

/// Sans-IO WorkPullingProducerController for messages `M`, confirmation tokens `T` and worker
/// addresses `W`.
///
/// Guarantees: every message reaches some worker at least once; without crashes or departures
/// exactly once. No order across messages. `Confirmed` means processed by a worker (or stored,
/// with a durable queue).
pub struct WorkPullingProducerController<M, T, W> {
    producer_id: ProducerId,
    settings: ProducerSettings,
    buffer_size: usize,
    rng: SmallRng,
    phase: Phase,
    failure: Option<WorkPullingError>,
    requested: bool,
    workers: HashMap<W, Worker<M, T>>,
    by_incarnation: HashMap<u64, W>,
    next_incarnation: u64,
    buffer: VecDeque<Pending<M, T>>,
    current_seq_nr: SeqNr,
    /// The state to load, and (durable) messages chosen for a worker, stored one at a time in
    /// this order.
    front: DurableFront<M, Storing<T, W>>,
    transmits: VecDeque<(W, SequencedMessage<M>)>,
    events: VecDeque<WorkPullingEvent<T>>,
}

impl<M, T, W> WorkPullingProducerController<M, T, W>
where
    M: Clone + 'static,
    W: Clone + Eq + Hash,
{
    /// A controller without a durable queue. `seed` drives worker choice and incarnations.
    pub fn new(
        producer_id: ProducerId,
        settings: ProducerSettings,
        buffer_size: usize,
        seed: u64,
    ) -> Result<Self, WorkPullingError> {
        Self::build(
            producer_id,
            settings,
            buffer_size,
            seed,
            DurableFront::volatile(),
        )
    }

    /// A controller with a durable queue: it loads the stored state first and re-routes what
    /// was not confirmed.
    pub fn with_durable_queue(
        producer_id: ProducerId,
        settings: ProducerSettings,
        buffer_size: usize,
        seed: u64,
    ) -> Result<Self, WorkPullingError> {
        let front = DurableFront::durable(settings.durable_queue.retry_attempts);
        Self::build(producer_id, settings, buffer_size, seed, front)
    }

    fn build(
        producer_id: ProducerId,
        settings: ProducerSettings,
        buffer_size: usize,
        seed: u64,
        front: DurableFront<M, Storing<T, W>>,
    ) -> Result<Self, WorkPullingError> {
        if settings.chunk_large_messages.is_some() {
            return Err(WorkPullingError::ChunkingUnsupported);
        }
        let mut rng = SmallRng::seed_from_u64(seed);
        let next_incarnation = rng.random();
        Ok(WorkPullingProducerController {
            producer_id,
            settings,
            buffer_size,
            rng,
            phase: Phase::Initializing {
                has_producer: false,
            },
            failure: None,
            requested: false,
            workers: HashMap::new(),
            by_incarnation: HashMap::new(),
            next_incarnation,
            buffer: VecDeque::new(),
            current_seq_nr: SeqNr(1),
            front,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    /// Workers known now (Akka's `WorkerStats.numberOfWorkers`).
    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Messages waiting for a worker with demand.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// Nothing buffered or being stored, and every worker confirmed all it was sent: the
    /// controller may stop without losing anything.
    pub fn is_settled(&self) -> bool {
        matches!(self.phase, Phase::Active)
            && self.buffer.is_empty()
            && self.front.is_idle()
            && self.workers.values().all(|w| w.unconfirmed.is_empty())
    }

    /// Why the controller stopped, if it did.
    pub fn failure(&self) -> Option<&WorkPullingError> {
        self.failure.as_ref()
    }

    /// The producer (re)registered: a pending demand is offered to it again.
    pub fn start(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Initializing { has_producer, .. } => {
                *has_producer = true;
                self.activate_when_ready(now);
            }
            Phase::Active => {
                if self.requested {
                    self.events.push_back(WorkPullingEvent::RequestNext);
                }
            }
        }
    }

    /// The current workers (from the registry): new ones get a controller, departed ones have
    /// their unconfirmed messages routed to the others.
    pub fn workers_changed(&mut self, current: impl IntoIterator<Item = W>, now: Instant) {
        if self.failure.is_some() {
            return;
        }
        let current: Vec<W> = current.into_iter().collect();
        let departed: Vec<W> = self
            .workers
            .keys()
            .filter(|w| !current.contains(w))
            .cloned()
            .collect();
        for worker in current {
            if !self.workers.contains_key(&worker) {
                self.add_worker(worker, now);
            }
        }
        for worker in departed {
            self.remove_worker(&worker, now);
        }
        self.flush_buffer(now);
        self.request_if_free();
    }

    /// Sends a message to some worker (Akka's `Msg`).
    pub fn send(&mut self, message: M, now: Instant) -> Result<(), WorkPullingError> {
        self.receive(message, None, now)
    }

    /// Sends a message and emits [`WorkPullingEvent::Confirmed`] with `token` once a worker
    /// confirmed it (or it is stored, with a durable queue).
    pub fn send_with_confirmation(
        &mut self,
        message: M,
        token: T,
        now: Instant,
    ) -> Result<(), WorkPullingError> {
        self.receive(message, Some(token), now)
    }

    /// A frame from a worker's ConsumerController, addressed to one child controller.
    pub fn handle_frame(&mut self, to: &ProducerRef, frame: ConsumerFrame, now: Instant) {
        if self.failure.is_some() {
            return;
        }
        let Some(worker) = self.by_incarnation.get(&to.incarnation).cloned() else {
            return;
        };
        let Some(out) = self.workers.get_mut(&worker) else {
            return;
        };
        if out.controller.handle_frame(frame, now).is_err() {
            // A misbehaving worker is dropped; its messages go to others.
            self.remove_worker(&worker, now);
        } else {
            self.after_child(&worker);
        }
        self.flush_buffer(now);
        self.request_if_free();
    }

    /// Fires the child controllers' timers that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<W> = self
            .workers
            .iter()
            .filter(|(_, out)| out.controller.poll_timeout().is_some_and(|at| at <= now))
            .map(|(w, _)| w.clone())
            .collect();
        for worker in due {
            if let Some(out) = self.workers.get_mut(&worker) {
                out.controller.handle_timeout(now);
            }
            self.after_child(&worker);
        }
        self.flush_buffer(now);
    }

    /// The next frame, with the worker it is for.
    pub fn poll_transmit(&mut self) -> Option<(W, SequencedMessage<M>)> {
        self.transmits.pop_front()
    }

    /// The next event for the producer.
    pub fn poll_event(&mut self) -> Option<WorkPullingEvent<T>> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.workers
            .values()
            .filter_map(|out| out.controller.poll_timeout())
            .min()
    }

    fn activate_when_ready(&mut self, now: Instant) {
        let Phase::Initializing { has_producer: true } = self.phase else {
            return;
        };
        let Some(state) = self.front.take_state() else {
            return;
        };
        self.phase = Phase::Active;
        self.current_seq_nr = state.current_seq_nr;
        // What was stored and not confirmed goes out again, each under a new worker.
        for sent in state.unconfirmed {
            if let Payload::Message(message) = sent.payload {
                self.buffer.push_back(Pending {
                    message,
                    reply: None,
                    origin: Origin::HandOver {
                        old_qualifier: sent.qualifier,
                        old_seq_nr: sent.seq_nr,
                    },
                });
            }
        }
        self.flush_buffer(now);
        self.request_if_free();
    }

    fn add_worker(&mut self, worker: W, now: Instant) {
        let incarnation = self.next_incarnation;
        self.next_incarnation = self.next_incarnation.wrapping_add(1);
        // Unique across restarts (like Akka's UUIDs): a new child must never share a qualifier
        // with records an earlier controller left, or its confirmations would remove them
        // before they are handed over.
        let qualifier = format!("{}-{incarnation:016x}", self.producer_id);
        let mut controller = ProducerController::new(
            ProducerId::new(qualifier.as_str()),
            incarnation,
            self.settings.clone(),
        );
        controller.start(now);
        controller.register_consumer(now);
        self.by_incarnation.insert(incarnation, worker.clone());
        self.workers.insert(
            worker.clone(),
            Worker {
                qualifier,
                controller,
                unconfirmed: VecDeque::new(),
                reserved: false,
            },
        );
        self.after_child(&worker);
    }

    fn remove_worker(&mut self, worker: &W, now: Instant) {
        let Some(out) = self.workers.remove(worker) else {
            return;
        };
        self.by_incarnation
            .remove(&out.controller.producer_ref().incarnation);
        for unconfirmed in out.unconfirmed {
            let origin = if self.front.is_durable() {
                Origin::HandOver {
                    old_qualifier: out.qualifier.clone(),
                    old_seq_nr: unconfirmed.total_seq_nr,
                }
            } else {
                Origin::Rerouted
            };
            self.route(
                Pending {
                    message: unconfirmed.message,
                    reply: unconfirmed.reply,
                    origin,
                },
                now,
            );
        }
    }

    fn receive(
        &mut self,
        message: M,
        reply: Option<T>,
        now: Instant,
    ) -> Result<(), WorkPullingError> {
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        if !matches!(self.phase, Phase::Active) || !self.requested {
            self.failure = Some(WorkPullingError::NoDemand);
            return Err(WorkPullingError::NoDemand);
        }
        self.requested = false;
        self.route(
            Pending {
                message,
                reply,
                origin: Origin::Fresh,
            },
            now,
        );
        self.request_if_free();
        match &self.failure {
            Some(failure) => Err(failure.clone()),
            None => Ok(()),
        }
    }

    /// Sends a message to a random worker with demand, or buffers it.
    fn route(&mut self, pending: Pending<M, T>, now: Instant) {
        let candidates: Vec<W> = self
            .workers
            .iter()
            .filter(|(_, out)| out.controller.has_demand() && !out.reserved)
            .map(|(w, _)| w.clone())
            .collect();
        if candidates.is_empty() {
            if matches!(pending.origin, Origin::Fresh) && self.buffer.len() >= self.buffer_size {
                self.failure = Some(WorkPullingError::BufferFull(self.buffer_size));
                return;
            }
            let origin = match pending.origin {
                Origin::Fresh => Origin::Rerouted,
                other => other,
            };
            self.buffer.push_back(Pending { origin, ..pending });
            return;
        }
        let worker = candidates[self.rng.random_range(0..candidates.len())].clone();
        if !self.front.is_durable() {
            self.deliver(&worker, pending.message, pending.reply, SeqNr::ZERO, now);
            return;
        }
        let (fresh, hand_over) = match pending.origin {
            Origin::HandOver {
                old_qualifier,
                old_seq_nr,
            } => (false, Some((old_qualifier, old_seq_nr))),
            Origin::Fresh => (true, None),
            Origin::Rerouted => (false, None),
        };
        let Some(out) = self.workers.get_mut(&worker) else {
            return;
        };
        out.reserved = true;
        let seq_nr = self.current_seq_nr;
        self.current_seq_nr = seq_nr.next();
        let sent = MessageSent {
            seq_nr,
            payload: Payload::Message(pending.message),
            ack: pending.reply.is_some(),
            qualifier: out.qualifier.clone(),
            timestamp_millis: 0,
        };
        let storing = Storing {
            worker,
            reply: pending.reply,
            hand_over,
            fresh,
        };
        self.front.store(sent, storing);
    }

    fn deliver(
        &mut self,
        worker: &W,
        message: M,
        reply: Option<T>,
        total_seq_nr: SeqNr,
        now: Instant,
    ) {
        let Some(out) = self.workers.get_mut(worker) else {
            return;
        };
        match out
            .controller
            .send_with_confirmation(message.clone(), (), now)
        {
            Ok(out_seq_nr) => out.unconfirmed.push_back(Unconfirmed {
                out_seq_nr,
                total_seq_nr,
                message,
                reply,
            }),
            Err(_) => {
                // Cannot happen for a worker with demand; if it does, the worker is dropped and
                // the message routed elsewhere.
                self.remove_worker(worker, now);
                self.route(
                    Pending {
                        message,
                        reply,
                        origin: Origin::Rerouted,
                    },
                    now,
                );
                return;
            }
        }
        self.after_child(worker);
    }

    /// Moves a child controller's outputs: frames to its worker, confirmations to the producer.
    fn after_child(&mut self, worker: &W) {
        let Some(out) = self.workers.get_mut(worker) else {
            return;
        };
        let mut confirmed_up_to = None;
        while let Some(event) = out.controller.poll_event() {
            // RequestNext needs no bookkeeping: `has_demand` says the same.
            if let ProducerEvent::Confirmed { seq_nr, .. } = event {
                confirmed_up_to = Some(seq_nr);
            }
        }
        while let Some(message) = out.controller.poll_transmit() {
            self.transmits.push_back((worker.clone(), message));
        }
        if let Some(up_to) = confirmed_up_to {
            let mut last_total = None;
            while out
                .unconfirmed
                .front()
                .is_some_and(|u| u.out_seq_nr <= up_to)
            {
                if let Some(done) = out.unconfirmed.pop_front() {
                    last_total = Some(done.total_seq_nr);
                    if let Some(token) = done.reply {
                        self.events.push_back(WorkPullingEvent::Confirmed { token });
                    }
                }
            }
            if let Some(seq_nr) = last_total {
                self.front.confirmed(seq_nr, out.qualifier.as_str());
            }
        }
    }

    fn has_free_worker(&self) -> bool {
        self.workers
            .values()
            .any(|out| out.controller.has_demand() && !out.reserved)
    }

    /// Routes buffered messages, oldest first, while some worker has free demand. Called at the
    /// end of every input (never from inside routing, so it cannot recurse).
    fn flush_buffer(&mut self, now: Instant) {
        while !self.buffer.is_empty() && self.has_free_worker() && self.failure.is_none() {
            if let Some(pending) = self.buffer.pop_front() {
                self.route(pending, now);
            }
        }
    }

    /// Offers the producer a RequestNext when it has none, nothing waits, and some worker has
    /// free demand: Akka's decision table in one rule, which also rules out the duplicate
    /// RequestNext of akka #29854.
    fn request_if_free(&mut self) {
        // The cheap checks first: usually the producer holds a RequestNext already.
        if matches!(self.phase, Phase::Active)
            && self.failure.is_none()
            && !self.requested
            && self.buffer.is_empty()
            && !self.front.extras().any(|s| s.fresh)
            && self.has_free_worker()
        {
            self.requested = true;
            self.events.push_back(WorkPullingEvent::RequestNext);
        }
    }
}

impl<M, T, W> StoreClient<M> for WorkPullingProducerController<M, T, W>
where
    M: Clone + 'static,
    W: Clone + Eq + Hash,
{
    fn handle_state_loaded(&mut self, state: DurableState<M>, now: Instant) {
        // The front takes a state only while it waits for one, so only while initializing.
        if self.front.state_loaded(state) {
            self.activate_when_ready(now);
        }
    }

    fn handle_load_failed(&mut self, attempt: u32) {
        if let Err(error) = self.front.load_failed(attempt) {
            self.failure = Some(error.into());
        }
    }

    /// Reply, complete a hand-over, and send the message to its preselected worker.
    fn handle_message_stored(&mut self, seq_nr: SeqNr, now: Instant) {
        let Some((sent, stored)) = self.front.stored(seq_nr) else {
            return;
        };
        if let Some(token) = stored.reply {
            self.events.push_back(WorkPullingEvent::Confirmed { token });
        }
        if let Some((old_qualifier, old_seq_nr)) = stored.hand_over {
            self.front.confirmed(old_seq_nr, old_qualifier);
        }
        let Payload::Message(message) = sent.payload else {
            return;
        };
        // The same incarnation, not just the same address: a worker that left and came back
        // has a new qualifier, and the stored record names the old one.
        match self.workers.get_mut(&stored.worker) {
            Some(out) if out.qualifier == sent.qualifier && out.controller.has_demand() => {
                out.reserved = false;
                self.deliver(&stored.worker, message, None, seq_nr, now);
            }
            // The worker went away while its message was stored: store it again for another
            // (a hand-over, so the old record is confirmed once the new one is stored).
            _ => self.route(
                Pending {
                    message,
                    reply: None,
                    origin: Origin::HandOver {
                        old_qualifier: sent.qualifier,
                        old_seq_nr: seq_nr,
                    },
                },
                now,
            ),
        }
        self.front.resume();
        self.flush_buffer(now);
        self.request_if_free();
    }

    fn handle_store_failed(&mut self, seq_nr: SeqNr, attempt: u32) {
        if let Err(error) = self.front.store_failed(seq_nr, attempt) {
            self.failure = Some(error.into());
        }
    }

    fn poll_store(&mut self) -> Option<StoreRequest<M>> {
        self.front.poll_request()
    }
}

#[cfg(test)]
mod tests;
