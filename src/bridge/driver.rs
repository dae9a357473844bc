//! The bridge task: takes deliveries from the AMQP source while fewer than `max_in_flight` are
//! with the entities, decodes them, submits each to its entity through the node's
//! ShardingProducerController (reliable delivery to wherever the entity's shard lives), and
//! settles each with the broker once its entity confirmed: ack (batched over the contiguous
//! settled prefix, or alone when the prefix is held up), dead-letter with a reason then ack,
//! or nack back to the queue at the processing deadline. It owns the in-flight table; the
//! controller and the entities belong to the cluster node and outlive the bridge (a singleton
//! that may move to another node).

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{Future, FutureExt, StreamExt};
use lapin::BasicProperties;
use lapin::message::Delivery;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, info, warn};

use crate::amqp::{AmqpError, AmqpSource, Session, SourceEvent};
use crate::bridge::acks::AckWriter;
use crate::bridge::inflight::{DeliveryKey, Entry, InFlight, Settlement};
use crate::bridge::journey;
use crate::bridge::settings::BridgeSettings;
use crate::delivery::sharding::driver::{AskError, AskOutcome, Outcome, ShardingProducerHandle};
use crate::entity::{EntityId, EntityMessage};
use crate::metrics::BridgeMetrics;
use crate::telemetry::traceparent;
use crate::timer::sleep_until;

/// Longest wait for the broker to confirm a dead-letter copy.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Replies and deliveries handled per wake-up before acks are flushed; bounds ack latency
/// under load while still batching.
const BATCH: usize = 256;

/// How many taken deliveries make the bridge ack settled ones behind an unsettled head one by
/// one: half the in-flight bound below the prefetch, so finished work never fills the broker's
/// window, while entities fast enough to settle in order keep their one `multiple` ack per
/// batch. (Acking them alone already from the in-flight bound on measured no better with 5 ms
/// entities, and every single ack costs the ack writer a round trip to lapin's I/O thread.)
fn isolated_acks_above(settings: &BridgeSettings) -> usize {
    let prefetch = usize::from(settings.effective_prefetch());
    let bound = usize::from(settings.max_in_flight);
    prefetch.saturating_sub(bound / 2).max(1)
}

type DeadLetterFuture = Pin<Box<dyn Future<Output = (DeliveryKey, Result<(), AmqpError>)> + Send>>;

/// A submitted delivery's outcome, with its key and entity.
struct KeyedOutcome {
    key: DeliveryKey,
    entity: EntityId,
    outcome: Outcome,
}

impl Future for KeyedOutcome {
    type Output = (DeliveryKey, EntityId, Result<AskOutcome, AskError>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let ready = Pin::new(&mut self.outcome).poll(cx);
        ready.map(|outcome| (self.key, self.entity.clone(), outcome))
    }
}

/// How many submitted deliveries each entity has outstanding: its size is the number of
/// entities with work, the quantity a closed queueing model of the bridge turns on.
#[derive(Default)]
struct EntitiesWithWork(HashMap<EntityId, u32>);

impl EntitiesWithWork {
    fn add(&mut self, entity: &EntityId) {
        *self.0.entry(entity.clone()).or_default() += 1;
    }

    fn remove(&mut self, entity: &EntityId) {
        if let Some(count) = self.0.get_mut(entity) {
            *count -= 1;
            if *count == 0 {
                self.0.remove(entity);
            }
        }
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// What the bridge keeps of a delivery until it is settled.
struct Held {
    acker: lapin::Acker,
    body: Vec<u8>,
    properties: BasicProperties,
    /// Headed to an entity (false: dead-lettered before reaching one).
    to_entity: bool,
    /// Its `warren.delivery` span, ended when the delivery is dropped.
    span: Span,
    /// The span of the step it is in (submitted, acked, dead-lettered, requeued).
    step: Span,
}

/// Why the bridge stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The AMQP source task ended on its own; nothing more can be consumed.
    #[error("the AMQP source stopped unexpectedly")]
    SourceStopped,
    /// The node's sharding producer controller stopped; nothing can reach an entity.
    #[error("the sharding producer controller stopped")]
    ProducerStopped,
}

/// The stream stage between RabbitMQ and the entities.
pub struct Bridge<M> {
    settings: BridgeSettings,
    source: AmqpSource,
    producer: ShardingProducerHandle<M>,
    /// One per submitted delivery: its entity's confirmation or rejection.
    outcomes: FuturesUnordered<KeyedOutcome>,
    with_work: EntitiesWithWork,
    /// A decoded delivery waiting for room at the controller; nothing more is taken meanwhile.
    unsubmitted: Option<(DeliveryKey, EntityId, M)>,
    in_flight: InFlight<Held>,
    session: Option<Session>,
    dead_letters: FuturesUnordered<DeadLetterFuture>,
    acks: AckWriter,
    metrics: BridgeMetrics,
    settled: Vec<Entry<Held>>,
    expired: Vec<DeliveryKey>,
}

impl<M: EntityMessage + Send + 'static> Bridge<M> {
    /// A bridge from a running source to the entities `producer` reaches.
    pub fn new(
        settings: BridgeSettings,
        source: AmqpSource,
        producer: ShardingProducerHandle<M>,
        metrics: BridgeMetrics,
    ) -> Self {
        Bridge {
            in_flight: InFlight::new(settings.processing_deadline, isolated_acks_above(&settings)),
            settings,
            source,
            producer,
            outcomes: FuturesUnordered::new(),
            with_work: EntitiesWithWork::default(),
            unsubmitted: None,
            session: None,
            dead_letters: FuturesUnordered::new(),
            acks: AckWriter::spawn(metrics.clone()),
            metrics,
            settled: Vec::new(),
            expired: Vec::new(),
        }
    }

    /// Runs until `shutdown`, then stops taking deliveries, lets in-flight work finish and be
    /// acked (up to `shutdown_timeout`) and closes the channel. The entities are the node's:
    /// they stay.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), BridgeError> {
        let mut drain_until: Option<Instant> = None;
        let result = loop {
            let mut failure = None;
            let can_take = drain_until.is_none() && self.has_room();
            let wake_at = [self.in_flight.next_deadline(), drain_until]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if drain_until.is_none() => {
                    info!(in_flight = self.in_flight.len(), "stopping: finishing in-flight work");
                    drain_until = Some(Instant::now() + self.settings.shutdown_timeout);
                }
                Some((key, entity, outcome)) = self.outcomes.next(), if !self.outcomes.is_empty() => {
                    self.with_work.remove(&entity);
                    failure = self.on_outcome(key, outcome).err();
                    for _ in 1..BATCH {
                        if failure.is_some() {
                            break;
                        }
                        let Some(Some((key, entity, outcome))) = self.outcomes.next().now_or_never() else { break };
                        self.with_work.remove(&entity);
                        failure = self.on_outcome(key, outcome).err();
                    }
                }
                Some((key, result)) = self.dead_letters.next(), if !self.dead_letters.is_empty() => {
                    self.on_dead_lettered(key, result);
                }
                // Only waits for room: the permit itself would borrow the handle past this arm.
                room = self.producer.reserve().map(|permit| permit.map(drop)), if self.unsubmitted.is_some() => {
                    failure = match room {
                        Ok(()) => self.submit_waiting().err(),
                        Err(_) => Some(BridgeError::ProducerStopped),
                    };
                }
                event = self.source.next(), if can_take => {
                    match event {
                        Some(event) => failure = self.on_source_event(event).err(),
                        None => failure = Some(BridgeError::SourceStopped),
                    }
                    while failure.is_none() && self.has_room() {
                        let Some(event) = self.source.try_next() else { break };
                        failure = self.on_source_event(event).err();
                    }
                }
                _ = sleep_until(wake_at) => {}
            }
            let now = Instant::now();
            self.expire(now);
            // Whatever was settled is acked, a failure included.
            self.flush_acks(now);
            self.metrics.in_flight.set(self.in_flight.working() as i64);
            self.metrics
                .entities_with_work
                .set(self.with_work.len() as i64);
            if let Some(failure) = failure {
                break Err(failure);
            }
            if let Some(until) = drain_until {
                if self.in_flight.is_empty() && self.dead_letters.is_empty() {
                    info!("in-flight work finished");
                    break Ok(());
                }
                if now >= until {
                    warn!(
                        unsettled = self.in_flight.len(),
                        "shutdown timeout: closing the channel; the broker requeues what is left"
                    );
                    break Ok(());
                }
            }
        };
        // Every decided ack reaches the broker before the channel closes.
        self.acks.close().await;
        self.source.close().await;
        self.metrics.in_flight.set(0);
        self.metrics.entities_with_work.set(0);
        result
    }

    fn on_source_event(&mut self, event: SourceEvent) -> Result<(), BridgeError> {
        match event {
            SourceEvent::Connected(session) => {
                self.lose_channel();
                self.session = Some(session);
            }
            SourceEvent::Disconnected { generation, .. } => {
                if self.session.as_ref().map(|s| s.generation) == Some(generation) {
                    self.lose_channel();
                    self.session = None;
                }
            }
            SourceEvent::Delivery(delivery) => self.on_delivery(*delivery)?,
        }
        Ok(())
    }

    fn on_delivery(&mut self, delivery: Delivery) -> Result<(), BridgeError> {
        if self.session.is_none() || delivery.acker.poisoned() {
            // Its channel is gone: the broker has it back already.
            return Ok(());
        }
        if delivery.redelivered {
            self.metrics.redelivered.inc();
        }
        let span = journey::delivery_span(self.source.queue(), &delivery);
        let decoded = journey::decode(&span).in_scope(|| self.settings.decode::<M>(&delivery.data));
        let Delivery {
            data,
            properties,
            acker,
            ..
        } = delivery;
        let now = Instant::now();
        match decoded {
            Ok(mut message) => {
                let entity = message.entity_id();
                span.record("entity", entity.as_str());
                let step = journey::submit(&span, entity.as_str());
                if let Some(context) = traceparent(&step) {
                    message.set_trace_context(context);
                }
                let key = self.in_flight.insert(
                    Held {
                        acker,
                        body: data,
                        properties,
                        to_entity: true,
                        span,
                        step,
                    },
                    now,
                );
                // The controller has room unless its buffer is full (`max_in_flight` is at
                // most its size, but an earlier bridge on this node may have left messages
                // there): then this delivery waits, and nothing more is taken meanwhile.
                self.unsubmitted = Some((key, entity, message));
                self.submit_waiting()?;
            }
            Err(invalid) => {
                self.metrics
                    .invalid_messages
                    .with_label_values(&[invalid.kind()])
                    .inc();
                warn!(reason = %invalid, "dead-lettering an unusable message");
                let key = self.in_flight.insert(
                    Held {
                        acker,
                        body: data,
                        properties,
                        to_entity: false,
                        span,
                        step: Span::none(),
                    },
                    now,
                );
                self.dead_letter(key, invalid.to_string());
            }
        }
        Ok(())
    }

    /// Another delivery may be taken: none waits for the controller, and fewer than
    /// `max_in_flight` are with the entities (settled ones waiting for their ack do not count:
    /// the broker's prefetch bounds those).
    fn has_room(&self) -> bool {
        self.unsubmitted.is_none()
            && self.in_flight.working() < usize::from(self.settings.max_in_flight)
    }

    /// Submits the delivery that waited for room, if there is room now.
    fn submit_waiting(&mut self) -> Result<(), BridgeError> {
        let Some(permit) = self
            .producer
            .try_reserve()
            .map_err(|_| BridgeError::ProducerStopped)?
        else {
            return Ok(());
        };
        if let Some((key, entity, message)) = self.unsubmitted.take() {
            self.with_work.add(&entity);
            let outcome = permit.submit(entity.clone(), message);
            self.outcomes.push(KeyedOutcome {
                key,
                entity,
                outcome,
            });
        }
        Ok(())
    }

    /// Settles a delivery its entity confirmed (ack) or gave up on (dead-letter).
    fn on_outcome(
        &mut self,
        key: DeliveryKey,
        outcome: Result<AskOutcome, AskError>,
    ) -> Result<(), BridgeError> {
        match outcome {
            Ok(AskOutcome::Confirmed) => {
                if let Some(held) = self.in_flight.pending_mut(key) {
                    journey::settled(&held.span, "acked", None);
                    held.step = journey::ack(&held.span);
                }
                self.in_flight.settle(key, Settlement::Acked);
            }
            Ok(AskOutcome::Rejected(reason)) => {
                if self.in_flight.pending(key).is_some() {
                    self.dead_letter(key, reason);
                } else {
                    // An orphan (its copy is back in the queue) or already requeued.
                    self.in_flight.settle(key, Settlement::Requeued);
                }
            }
            Err(AskError::Stopped) => return Err(BridgeError::ProducerStopped),
        }
        Ok(())
    }

    /// Publishes a copy to the dead-letter exchange; the delivery is acked once it is confirmed.
    fn dead_letter(&mut self, key: DeliveryKey, reason: String) {
        let (Some(held), Some(session)) = (self.in_flight.pending_mut(key), &self.session) else {
            return;
        };
        let publisher = session.dead_letters.clone();
        let body = held.body.clone();
        let properties = held.properties.clone();
        journey::settled(&held.span, "dead_lettered", Some(&reason));
        held.step = journey::dead_letter(&held.span, &reason);
        let step = held.step.clone();
        self.in_flight.mark_settling(key);
        self.dead_letters.push(Box::pin(
            async move {
                let publish = publisher.publish(&body, &properties, &reason);
                let result = tokio::time::timeout(DEAD_LETTER_TIMEOUT, publish)
                    .await
                    .unwrap_or(Err(AmqpError::Timeout(DEAD_LETTER_TIMEOUT)));
                (key, result)
            }
            .instrument(step),
        ));
    }

    fn on_dead_lettered(&mut self, key: DeliveryKey, result: Result<(), AmqpError>) {
        match result {
            Ok(()) => {
                self.in_flight.settle(key, Settlement::DeadLettered);
            }
            Err(error) => {
                // Requeueing would bring the message straight back to the same failure. A new
                // session, opened after a pause, redeclares the topology and tries again.
                warn!(%error, "dead-lettering failed; reopening the AMQP session");
                if let Some(session) = &self.session {
                    session.abort();
                }
            }
        }
    }

    /// Nacks a pending delivery back to the queue. One still with the controller keeps its
    /// place in the in-flight bound until its outcome arrives (then ignored), so copies cannot
    /// pile up behind a stuck entity.
    fn requeue(&mut self, key: DeliveryKey) {
        let Some(held) = self.in_flight.pending_mut(key) else {
            return;
        };
        journey::settled(&held.span, "requeued", None);
        held.step = journey::requeue(&held.span);
        let generation = self.session.as_ref().map_or(0, |s| s.generation);
        self.acks.nack(generation, held.acker.clone());
        let to_entity = held.to_entity;
        if self.unsubmitted.as_ref().is_some_and(|(k, _, _)| *k == key) {
            self.unsubmitted = None;
            self.in_flight.settle(key, Settlement::Requeued);
        } else if to_entity {
            self.in_flight.requeue_held(key);
        } else {
            self.in_flight.settle(key, Settlement::Requeued);
        }
    }

    fn expire(&mut self, now: Instant) {
        let mut expired = std::mem::take(&mut self.expired);
        self.in_flight.expire(now, &mut expired);
        if !expired.is_empty() {
            warn!(
                count = expired.len(),
                deadline = ?self.settings.processing_deadline,
                "processing deadline passed; requeueing"
            );
        }
        for key in expired.drain(..) {
            self.requeue(key);
        }
        self.expired = expired;
    }

    /// Acks the contiguous settled prefix with one `multiple` ack, then, when the broker's
    /// window is filling up with finished work, each settled delivery behind the first
    /// unsettled one on its own.
    fn flush_acks(&mut self, now: Instant) {
        let mut settled = std::mem::take(&mut self.settled);
        self.in_flight.pop_settled(&mut settled);
        let (mut acked, mut dead_lettered) = (0, 0);
        let mut last = None;
        for entry in settled.drain(..) {
            match entry.settlement {
                // Already acked alone, or already nacked.
                _ if entry.acked_alone => continue,
                Some(Settlement::Acked) => acked += 1,
                Some(Settlement::DeadLettered) => dead_lettered += 1,
                _ => continue,
            }
            let latency = now.saturating_duration_since(entry.received_at);
            self.metrics.ack_latency.observe(latency.as_secs_f64());
            last = Some(entry.held.acker);
        }
        self.settled = settled;
        let Some(session) = &self.session else {
            return;
        };
        if let Some(acker) = last {
            self.acks
                .ack(session.generation, acker, acked, dead_lettered);
        }
        let (acks, metrics) = (&self.acks, &self.metrics);
        self.in_flight.take_isolated(|entry| {
            let latency = now.saturating_duration_since(entry.received_at);
            metrics.ack_latency.observe(latency.as_secs_f64());
            let dead_lettered = entry.settlement == Some(Settlement::DeadLettered);
            acks.ack_one(session.generation, entry.held.acker.clone(), dead_lettered);
        });
    }

    /// The channel's deliveries can no longer be acked; the broker requeued them.
    fn lose_channel(&mut self) {
        // A message already submitted stays counted until its entity confirms it (its memory
        // is still in use); its redelivered copy is processed afresh and deduplicated. One
        // still waiting to be submitted is dropped: its copy takes its place.
        let unsubmitted = self.unsubmitted.take().map(|(key, _, _)| key);
        let lost = self
            .in_flight
            .orphan_all(|key, held| held.to_entity && Some(key) != unsubmitted);
        if lost > 0 {
            self.metrics.deliveries.requeued.inc_by(lost as u64);
            warn!(
                lost,
                "channel lost; its unacked deliveries return to the queue"
            );
        }
    }
}
