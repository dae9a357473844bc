//! The ShardingProducerController core (Akka's, docs/protocol.md, "Sharding producer controller"),
//! sans IO: one per node and producer, sending to any number of sharded entities through one child
//! ProducerController per entity. A message for an entity with demand goes out at once; one for an
//! entity without demand waits in that entity's buffer (all buffers together at most
//! `buffer_size`). The producer hears, in every `RequestNext`, which entities have demand and how
//! much waits for the others, and paces itself by that.
//!
//! Timers: an entity idle for `resend_first_unconfirmed_idle_timeout` that still owes a
//! confirmation gets its first unconfirmed message again (it may have been stopped by a
//! rebalance or a crash, and a new incarnation needs waking); an entity with nothing
//! unconfirmed or buffered, idle for `cleanup_unused_after`, loses its child (a later message
//! starts a new one at sequence number 1, which its consumer takes as a new producer).
//!
//! With a durable queue every message is stored (qualifier: the entity id) before it is
//! routed, the reply to an ask comes after storage, and a restarted controller routes what was
//! stored and not confirmed first.
//!
//! Inputs: `start`, `send`, `send_with_confirmation`, `handle_frame`, `handle_timeout`, and the
//! durable queue's answers. Outputs: `poll_transmit` (entity, message), `poll_event`,
//! `poll_store`, `poll_timeout`.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use tokio::time::Instant;
use tracing::warn;

use crate::delivery::child_timers::ChildTimers;
use crate::delivery::durable::front::DurableFront;
use crate::delivery::durable::{
    DurableError, DurableState, MessageSent, StoreClient, StoreRequest,
};
use crate::delivery::producer::{ProducerController, ProducerEvent};
use crate::delivery::protocol::{
    ConsumerFrame, Payload, ProducerId, ProducerRef, SeqNr, SequencedMessage,
};
use crate::delivery::settings::{ProducerSettings, ShardingProducerSettings};
use crate::eviction::{least_recently_used, shrink_when_mostly_empty};
use crate::ids::EntityId;

/// What the controller tells its producer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardingProducerEvent<T> {
    /// The producer may send; these entities have demand, these have messages waiting.
    RequestNext {
        /// Entities that take a message at once.
        entities_with_demand: BTreeSet<EntityId>,
        /// Messages waiting, per entity without demand (zero included).
        buffered_for_entities_without_demand: BTreeMap<EntityId, usize>,
    },
    /// A message sent with confirmation was confirmed by its entity (or stored, when durable).
    Confirmed {
        /// The token given with it.
        token: T,
    },
    /// The entity gave up on a message sent with confirmation (it reported why before it
    /// confirmed it, so the message is settled either way).
    Rejected {
        /// The token given with it.
        token: T,
        /// The entity's reason.
        reason: String,
    },
}

/// Why the controller stopped; it refuses every further input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShardingProducerError {
    /// More messages waited for entities without demand than `buffer_size` (D-10).
    #[error("buffer of {0} messages waiting for entities is full")]
    BufferFull(usize),
    /// The durable queue failed beyond its retry attempts.
    #[error(transparent)]
    Store(#[from] DurableError),
    /// Chunking was configured; sharding cannot chunk.
    #[error("sharded delivery does not support chunk_large_messages")]
    ChunkingUnsupported,
}

struct Waiting<M, T> {
    total_seq_nr: SeqNr,
    message: M,
    reply: Option<T>,
}

/// Sent to the child and not confirmed yet; the message is kept to resend it through a new
/// child if this one fails.
struct Unconfirmed<M, T> {
    /// Its number in the entity's child stream.
    out_seq_nr: SeqNr,
    total_seq_nr: SeqNr,
    message: M,
    reply: Option<T>,
    /// The entity reported it could not process it.
    rejected: Option<String>,
}

struct Out<M, T> {
    controller: ProducerController<M, SeqNr>,
    buffered: VecDeque<Waiting<M, T>>,
    unconfirmed: VecDeque<Unconfirmed<M, T>>,
    last_used: Instant,
    /// The child's resend count already added to the parent's.
    resent_seen: u64,
    /// The deadline last put on the timer heap for this child.
    armed: Option<Instant>,
}

impl<M: Clone + 'static, T> Out<M, T> {
    /// Nothing unconfirmed or waiting: the child may go, and a new one takes its place later.
    fn owes_nothing(&self) -> bool {
        self.controller.unconfirmed_len() == 0
            && self.buffered.is_empty()
            && self.unconfirmed.is_empty()
    }
}

enum Phase {
    /// Waiting for the producer's Start and the (durable) state.
    Initializing {
        has_producer: bool,
    },
    Active,
}

/// A message being stored before it is routed.
/// Sans-IO ShardingProducerController for messages `M` and confirmation tokens `T`.
pub struct ShardingProducerController<M, T> {
    producer_id: ProducerId,
    settings: ProducerSettings,
    sharding: ShardingProducerSettings,
    next_incarnation: u64,
    phase: Phase,
    failure: Option<ShardingProducerError>,
    outs: HashMap<EntityId, Out<M, T>>,
    /// Messages in every child's `buffered`, kept so pacing costs O(1), not O(entities).
    buffered_total: usize,
    /// Resends of children, kept up to date as each child's outputs are drained.
    resent: u64,
    /// Whether `RequestNext` events are produced: building one visits every entity, which a
    /// driver that paces by [`Self::buffered`] does not need per message.
    report_demand: bool,
    current_seq_nr: SeqNr,
    /// The state to load, and (durable) messages being stored, with their entity and asker.
    front: DurableFront<M, (EntityId, Option<T>)>,
    timers: ChildTimers<EntityId>,
    next_idle_check: Option<Instant>,
    transmits: VecDeque<(EntityId, SequencedMessage<M>)>,
    events: VecDeque<ShardingProducerEvent<T>>,
}

impl<M: Clone + 'static, T> ShardingProducerController<M, T> {
    /// A controller without a durable queue; `first_incarnation` (random) tells its children
    /// apart from an earlier run's.
    pub fn new(
        producer_id: ProducerId,
        settings: ProducerSettings,
        sharding: ShardingProducerSettings,
        first_incarnation: u64,
    ) -> Result<Self, ShardingProducerError> {
        Self::build(
            producer_id,
            settings,
            sharding,
            first_incarnation,
            DurableFront::volatile(),
        )
    }

    /// A controller with a durable queue: it loads the stored state first.
    pub fn with_durable_queue(
        producer_id: ProducerId,
        settings: ProducerSettings,
        sharding: ShardingProducerSettings,
        first_incarnation: u64,
    ) -> Result<Self, ShardingProducerError> {
        let front = DurableFront::durable(settings.durable_queue.retry_attempts);
        Self::build(producer_id, settings, sharding, first_incarnation, front)
    }

    fn build(
        producer_id: ProducerId,
        settings: ProducerSettings,
        sharding: ShardingProducerSettings,
        first_incarnation: u64,
        front: DurableFront<M, (EntityId, Option<T>)>,
    ) -> Result<Self, ShardingProducerError> {
        if settings.chunk_large_messages.is_some() {
            return Err(ShardingProducerError::ChunkingUnsupported);
        }
        Ok(ShardingProducerController {
            producer_id,
            settings,
            sharding,
            next_incarnation: first_incarnation,
            phase: Phase::Initializing {
                has_producer: false,
            },
            failure: None,
            outs: HashMap::new(),
            buffered_total: 0,
            resent: 0,
            report_demand: true,
            current_seq_nr: SeqNr(1),
            front,
            timers: ChildTimers::new(),
            next_idle_check: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        })
    }

    /// Whether it takes messages: a durable controller first loads its state, and a message
    /// sent before that would be numbered wrongly (Akka's producer waits for RequestNext).
    pub fn is_active(&self) -> bool {
        matches!(self.phase, Phase::Active) && self.failure.is_none()
    }

    /// The settings of its children.
    pub fn settings(&self) -> &ProducerSettings {
        &self.settings
    }

    /// Why the controller stopped, if it did.
    pub fn failure(&self) -> Option<&ShardingProducerError> {
        self.failure.as_ref()
    }

    /// Entities with a child controller now.
    pub fn entity_count(&self) -> usize {
        self.outs.len()
    }

    /// Messages waiting for entities without demand.
    pub fn buffered(&self) -> usize {
        debug_assert_eq!(
            self.buffered_total,
            self.outs.values().map(|o| o.buffered.len()).sum::<usize>()
        );
        self.buffered_total
    }

    /// Messages taken and not yet handed to a child: waiting for demand, and (durable) for
    /// storage. What a driver paces by.
    pub fn waiting(&self) -> usize {
        self.buffered() + self.front.storing()
    }

    /// Messages its children sent again so far (see [`ProducerController::resent`]),
    /// children that were cleaned up included.
    pub fn resent(&self) -> u64 {
        self.resent
    }

    /// Stops producing `RequestNext` events (for drivers that pace by [`Self::buffered`]).
    pub fn without_demand_reports(mut self) -> Self {
        self.report_demand = false;
        self
    }

    /// Messages sent and not confirmed yet, all entities together.
    pub fn unconfirmed(&self) -> usize {
        self.outs.values().map(|o| o.unconfirmed.len()).sum()
    }

    /// The producer (re)registered (Akka's `Start`): it gets a RequestNext.
    pub fn start(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Initializing { has_producer, .. } => {
                *has_producer = true;
                self.activate_when_ready(now);
            }
            Phase::Active => self.request_next(),
        }
    }

    /// Sends `message` to `entity`.
    pub fn send(
        &mut self,
        entity: EntityId,
        message: M,
        now: Instant,
    ) -> Result<(), ShardingProducerError> {
        self.receive(entity, message, None, now)
    }

    /// Sends `message` to `entity`; `token` comes back in `Confirmed` once it is confirmed (or
    /// stored, with a durable queue).
    pub fn send_with_confirmation(
        &mut self,
        entity: EntityId,
        message: M,
        token: T,
        now: Instant,
    ) -> Result<(), ShardingProducerError> {
        self.receive(entity, message, Some(token), now)
    }

    /// A frame from `entity`'s ConsumerController for the child `to`; frames for an earlier
    /// child of the entity are ignored.
    pub fn handle_frame(
        &mut self,
        entity: &EntityId,
        to: &ProducerRef,
        frame: ConsumerFrame,
        now: Instant,
    ) {
        if self.failure.is_some() {
            return;
        }
        let Some(out) = self.outs.get_mut(entity) else {
            return;
        };
        if out.controller.producer_ref() != to {
            return;
        }
        out.last_used = now;
        if let Err(error) = out.controller.handle_frame(frame, now) {
            // A misbehaving consumer: its child goes; what it held is resent by a new child,
            // and the producer hears nothing lost (its asks stay unanswered until then).
            warn!(%entity, %error, "sharded delivery to an entity failed; restarting its controller");
            if let Some(failed) = self.outs.remove(entity) {
                self.restart_child(entity.clone(), failed, now);
            }
            return;
        }
        self.after_child(entity, now);
    }

    /// `entity` reports (ahead of its confirmation) that it gave up on message `seq_nr` of the
    /// child `to`; the message's confirmation then comes back as `Rejected`.
    pub fn reject(&mut self, entity: &EntityId, to: &ProducerRef, seq_nr: SeqNr, reason: String) {
        let Some(out) = self.outs.get_mut(entity) else {
            return;
        };
        if out.controller.producer_ref() != to {
            return;
        }
        if let Some(unconfirmed) = out.unconfirmed.iter_mut().find(|u| u.out_seq_nr == seq_nr) {
            unconfirmed.rejected = Some(reason);
        }
    }

    /// Time passed: child timers, idle wake-ups, cleanup.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.failure.is_some() {
            return;
        }
        if self.next_idle_check.is_some_and(|at| at <= now) {
            self.check_idle(now);
        }
        while let Some((at, entity)) = self.timers.pop_due(now) {
            let Some(out) = self.outs.get_mut(&entity) else {
                continue;
            };
            if out.armed != Some(at) {
                continue;
            }
            out.armed = None;
            out.controller.handle_timeout(now);
            self.after_child(&entity, now);
        }
    }

    /// The next message for an entity.
    pub fn poll_transmit(&mut self) -> Option<(EntityId, SequencedMessage<M>)> {
        self.transmits.pop_front()
    }

    /// The next event for the producer.
    pub fn poll_event(&mut self) -> Option<ShardingProducerEvent<T>> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] is due (possibly early, never late).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.failure.is_some() {
            return None;
        }
        self.timers
            .next()
            .into_iter()
            .chain(self.next_idle_check)
            .min()
    }

    fn receive(
        &mut self,
        entity: EntityId,
        message: M,
        reply: Option<T>,
        now: Instant,
    ) -> Result<(), ShardingProducerError> {
        if let Some(failure) = &self.failure {
            return Err(failure.clone());
        }
        if self.front.is_durable() {
            let seq_nr = self.current_seq_nr;
            self.current_seq_nr = seq_nr.next();
            let sent = MessageSent {
                seq_nr,
                payload: Payload::Message(message),
                ack: reply.is_some(),
                qualifier: entity.as_str().to_owned(),
                timestamp_millis: 0,
            };
            self.front.store(sent, (entity, reply));
            return Ok(());
        }
        self.route(entity, SeqNr::ZERO, message, reply, now);
        match &self.failure {
            Some(failure) => Err(failure.clone()),
            None => Ok(()),
        }
    }

    /// Sends to the entity's child if it has demand, or buffers; starts the child if there is
    /// none.
    fn route(
        &mut self,
        entity: EntityId,
        total_seq_nr: SeqNr,
        message: M,
        reply: Option<T>,
        now: Instant,
    ) {
        if !self.outs.contains_key(&entity) {
            let out = self.new_child(&entity, now);
            self.outs.insert(entity.clone(), out);
            self.limit_children(&entity);
        }
        let total_buffered = self.buffered_total;
        let Some(out) = self.outs.get_mut(&entity) else {
            return;
        };
        out.last_used = now;
        if out.controller.has_demand() && out.buffered.is_empty() {
            send_to_child(out, total_seq_nr, message, reply, now);
            self.after_child(&entity, now);
            return;
        }
        if total_buffered >= self.sharding.buffer_size {
            self.failure = Some(ShardingProducerError::BufferFull(self.sharding.buffer_size));
            return;
        }
        out.buffered.push_back(Waiting {
            total_seq_nr,
            message,
            reply,
        });
        self.buffered_total += 1;
        self.after_child(&entity, now);
        self.request_next();
    }

    fn new_child(&mut self, entity: &EntityId, now: Instant) -> Out<M, T> {
        let incarnation = self.next_incarnation;
        self.next_incarnation = self.next_incarnation.wrapping_add(1);
        // Akka names the child "<producerId>-<entityId>"; its consumer keys its controller by it.
        let child_id = ProducerId::new(format!("{}-{}", self.producer_id, entity));
        let mut controller = ProducerController::new(child_id, incarnation, self.settings.clone());
        // It sends through this controller, so it needs no RegisterConsumer.
        controller.start(now);
        controller.register_consumer(now);
        if self.next_idle_check.is_none() {
            self.next_idle_check = Some(now + self.idle_check_interval());
        }
        Out {
            controller,
            buffered: VecDeque::new(),
            unconfirmed: VecDeque::new(),
            last_used: now,
            resent_seen: 0,
            armed: None,
        }
    }

    /// Over `max_entity_controllers` after `newest` got a child: drops the least recently used
    /// children that owe nothing, at least a hundredth of the limit of them.
    fn limit_children(&mut self, newest: &EntityId) {
        let least_recent = least_recently_used(
            self.outs.len(),
            self.sharding.max_entity_controllers,
            self.outs
                .iter()
                .filter(|(id, out)| *id != newest && out.owes_nothing())
                .map(|(id, out)| (out.last_used, id)),
        );
        if least_recent.is_empty() {
            return;
        }
        for entity in &least_recent {
            self.outs.remove(entity);
        }
        shrink_when_mostly_empty(&mut self.outs);
    }

    /// A child that failed is replaced: what it held unconfirmed goes out again first.
    fn restart_child(&mut self, entity: EntityId, failed: Out<M, T>, now: Instant) {
        let mut out = self.new_child(&entity, now);
        // Its buffered messages are counted already; its unconfirmed ones join them.
        self.buffered_total += failed.unconfirmed.len();
        out.buffered = failed
            .unconfirmed
            .into_iter()
            .map(|u| Waiting {
                total_seq_nr: u.total_seq_nr,
                message: u.message,
                reply: u.reply,
            })
            .chain(failed.buffered)
            .collect();
        self.outs.insert(entity.clone(), out);
        self.after_child(&entity, now);
    }

    /// Drains one child's outputs; feeds it buffered messages while it has demand.
    fn after_child(&mut self, entity: &EntityId, now: Instant) {
        let mut gained_demand = false;
        let Some(out) = self.outs.get_mut(entity) else {
            return;
        };
        loop {
            while let Some(event) = out.controller.poll_event() {
                match event {
                    // Every message goes with a confirmation request, and the child confirms
                    // them one by one, in order.
                    ProducerEvent::Confirmed { .. } => {
                        let Some(done) = out.unconfirmed.pop_front() else {
                            continue;
                        };
                        out.last_used = now;
                        if done.total_seq_nr != SeqNr::ZERO {
                            self.front.confirmed(done.total_seq_nr, entity.as_str());
                        }
                        if let Some(token) = done.reply {
                            self.events.push_back(match done.rejected {
                                Some(reason) => ShardingProducerEvent::Rejected { token, reason },
                                None => ShardingProducerEvent::Confirmed { token },
                            });
                        }
                    }
                    ProducerEvent::RequestNext { .. } => gained_demand = true,
                }
            }
            if !out.controller.has_demand() {
                break;
            }
            let Some(next) = out.buffered.pop_front() else {
                break;
            };
            self.buffered_total -= 1;
            send_to_child(out, next.total_seq_nr, next.message, next.reply, now);
        }
        while let Some(message) = out.controller.poll_transmit() {
            self.transmits.push_back((entity.clone(), message));
        }
        self.resent += out.controller.resent() - out.resent_seen;
        out.resent_seen = out.controller.resent();
        let deadline = out.controller.poll_timeout();
        self.timers.arm(entity, &mut out.armed, deadline);
        let demand_with_empty_buffer = out.controller.has_demand() && out.buffered.is_empty();
        if gained_demand && demand_with_empty_buffer {
            self.request_next();
        }
    }

    fn request_next(&mut self) {
        if !self.report_demand || !matches!(self.phase, Phase::Active) || self.failure.is_some() {
            return;
        }
        let mut entities_with_demand = BTreeSet::new();
        let mut buffered = BTreeMap::new();
        for (entity, out) in &self.outs {
            if out.controller.has_demand() && out.buffered.is_empty() {
                entities_with_demand.insert(entity.clone());
            } else {
                buffered.insert(entity.clone(), out.buffered.len());
            }
        }
        self.events.push_back(ShardingProducerEvent::RequestNext {
            entities_with_demand,
            buffered_for_entities_without_demand: buffered,
        });
    }

    /// Resends at once the first unconfirmed message of every entity silent for `idle_for`,
    /// instead of waiting for `resend_first_unconfirmed_idle_timeout`: the driver calls it
    /// when a node went down, since entities that lived there stay silent until woken.
    pub fn wake_idle(&mut self, idle_for: std::time::Duration, now: Instant) {
        if self.failure.is_some() {
            return;
        }
        self.check_idle_after(idle_for, now);
    }

    fn check_idle(&mut self, now: Instant) {
        self.check_idle_after(self.sharding.resend_first_unconfirmed_idle_timeout, now);
    }

    fn check_idle_after(&mut self, resend_after: std::time::Duration, now: Instant) {
        let cleanup_after = self.sharding.cleanup_unused_after;
        let mut wake = Vec::new();
        self.outs.retain(|entity, out| {
            let idle = now.saturating_duration_since(out.last_used);
            let owes = out.controller.unconfirmed_len() > 0;
            if owes && idle >= resend_after {
                wake.push(entity.clone());
            }
            !out.owes_nothing() || idle < cleanup_after
        });
        shrink_when_mostly_empty(&mut self.outs);
        for entity in wake {
            if let Some(out) = self.outs.get_mut(&entity) {
                out.controller.resend_first_unconfirmed();
                out.last_used = now;
            }
            self.after_child(&entity, now);
        }
        self.next_idle_check = (!self.outs.is_empty()).then(|| now + self.idle_check_interval());
    }

    /// Akka runs both idle checks at half their timeouts.
    fn idle_check_interval(&self) -> std::time::Duration {
        self.sharding
            .cleanup_unused_after
            .min(self.sharding.resend_first_unconfirmed_idle_timeout)
            / 2
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
        let nothing_unconfirmed = state.unconfirmed.is_empty();
        // What was stored and not confirmed goes first, to the entity named by its qualifier.
        for sent in state.unconfirmed {
            if let Payload::Message(message) = sent.payload {
                self.route(
                    EntityId::new(sent.qualifier),
                    sent.seq_nr,
                    message,
                    None,
                    now,
                );
            }
        }
        if nothing_unconfirmed {
            self.request_next();
        }
    }
}

fn send_to_child<M: Clone + 'static, T>(
    out: &mut Out<M, T>,
    total_seq_nr: SeqNr,
    message: M,
    reply: Option<T>,
    now: Instant,
) {
    // Demand was checked, so the child accepts it.
    let out_seq_nr = out
        .controller
        .send_with_confirmation(message.clone(), total_seq_nr, now)
        .unwrap_or(SeqNr::ZERO);
    out.unconfirmed.push_back(Unconfirmed {
        out_seq_nr,
        total_seq_nr,
        message,
        reply,
        rejected: None,
    });
}

impl<M, T> StoreClient<M> for ShardingProducerController<M, T>
where
    M: Clone + 'static,
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

    /// Reply to an asker, then route the message.
    fn handle_message_stored(&mut self, seq_nr: SeqNr, now: Instant) {
        let Some((sent, (entity, reply))) = self.front.stored(seq_nr) else {
            return;
        };
        if let Some(token) = reply {
            self.events
                .push_back(ShardingProducerEvent::Confirmed { token });
        }
        if let Payload::Message(message) = sent.payload {
            self.route(entity, seq_nr, message, None, now);
        }
        self.front.resume();
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
