//! The bridge task: takes deliveries from the AMQP source while fewer than `max_in_flight` are
//! unsettled, decodes them, hands them to their entity through reliable delivery, and settles
//! each with the broker once its entity confirmed: ack (batched over the contiguous settled
//! prefix), dead-letter with a reason then ack, or nack back to the queue at the processing
//! deadline. It owns the dispatcher, the in-flight table and the entity host; nothing else
//! touches them.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{Future, StreamExt};
use lapin::BasicProperties;
use lapin::message::Delivery;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::amqp::{AmqpError, AmqpSource, Session, SourceEvent};
use crate::bridge::acks::AckWriter;
use crate::bridge::dispatch::Dispatcher;
use crate::bridge::inflight::{DeliveryKey, Entry, InFlight, Settlement};
use crate::bridge::settings::BridgeSettings;
use crate::delivery::{DeliverySettings, ProducerId};
use crate::entity::{
    Entity, EntityFactory, EntityId, EntityMessage, EntityReply, Envelope, InvalidMessage,
    LocalEntityHost,
};
use crate::metrics::BridgeMetrics;
use crate::timer::sleep_until;

/// Longest wait for the broker to confirm a dead-letter copy.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(30);

/// Replies and deliveries handled per wake-up before acks are flushed; bounds ack latency
/// under load while still batching.
const BATCH: usize = 256;

type MessageOf<F> = <<F as EntityFactory>::Entity as Entity>::Message;
type DeadLetterFuture = Pin<Box<dyn Future<Output = (DeliveryKey, Result<(), AmqpError>)> + Send>>;

/// What the bridge keeps of a delivery until it is settled.
struct Held {
    acker: lapin::Acker,
    body: Vec<u8>,
    properties: BasicProperties,
    entity: Option<EntityId>,
}

/// Why the bridge stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The AMQP source task ended on its own; nothing more can be consumed.
    #[error("the AMQP source stopped unexpectedly")]
    SourceStopped,
}

/// The stream stage between RabbitMQ and the entities.
pub struct Bridge<F: EntityFactory> {
    settings: BridgeSettings,
    source: AmqpSource,
    host: LocalEntityHost<F>,
    replies: mpsc::Receiver<EntityReply>,
    dispatcher: Dispatcher<MessageOf<F>>,
    in_flight: InFlight<Held>,
    session: Option<Session>,
    /// Entities' verdicts that a delivery must be dead-lettered once confirmed.
    rejections: HashMap<DeliveryKey, String>,
    dead_letters: FuturesUnordered<DeadLetterFuture>,
    acks: AckWriter,
    metrics: BridgeMetrics,
    settled: Vec<Entry<Held>>,
    expired: Vec<DeliveryKey>,
}

impl<F: EntityFactory> Bridge<F> {
    /// A bridge over a running source and an entity host with its reply channel.
    pub fn new(
        settings: BridgeSettings,
        delivery: DeliverySettings,
        source: AmqpSource,
        host: LocalEntityHost<F>,
        replies: mpsc::Receiver<EntityReply>,
        metrics: BridgeMetrics,
    ) -> Self {
        let first_incarnation = rand::rng().random();
        Bridge {
            in_flight: InFlight::new(settings.processing_deadline),
            settings,
            source,
            host,
            replies,
            dispatcher: Dispatcher::new(
                ProducerId::new("bridge"),
                first_incarnation,
                delivery.producer_controller,
                delivery.sharding.producer_controller,
            ),
            session: None,
            rejections: HashMap::new(),
            dead_letters: FuturesUnordered::new(),
            acks: AckWriter::spawn(metrics.clone()),
            metrics,
            settled: Vec::new(),
            expired: Vec::new(),
        }
    }

    /// Runs until `shutdown`, then stops taking deliveries, lets in-flight work finish and be
    /// acked (up to `shutdown_timeout`), closes the channel and stops the entities.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), BridgeError> {
        let mut drain_until: Option<Instant> = None;
        let result = loop {
            let can_take = drain_until.is_none()
                && self.in_flight.len() < usize::from(self.settings.max_in_flight);
            let wake_at = [
                self.dispatcher.poll_timeout(),
                self.in_flight.next_deadline(),
                drain_until,
            ]
            .into_iter()
            .flatten()
            .min();
            tokio::select! {
                biased;
                _ = shutdown.cancelled(), if drain_until.is_none() => {
                    info!(in_flight = self.in_flight.len(), "shutting down: finishing in-flight work");
                    drain_until = Some(Instant::now() + self.settings.shutdown_timeout);
                }
                Some(reply) = self.replies.recv() => {
                    self.on_reply(reply);
                    for _ in 1..BATCH {
                        let Ok(reply) = self.replies.try_recv() else { break };
                        self.on_reply(reply);
                    }
                }
                Some((key, result)) = self.dead_letters.next(), if !self.dead_letters.is_empty() => {
                    self.on_dead_lettered(key, result);
                }
                event = self.source.next(), if can_take => {
                    let Some(event) = event else { break Err(BridgeError::SourceStopped) };
                    self.on_source_event(event);
                    while self.in_flight.len() < usize::from(self.settings.max_in_flight) {
                        let Some(event) = self.source.try_next() else { break };
                        self.on_source_event(event);
                    }
                }
                _ = sleep_until(wake_at) => {}
            }
            let now = Instant::now();
            self.dispatcher.handle_timeout(now);
            // Confirmations first: a delivery confirmed in this pass is acked, not expired.
            self.pump_dispatcher();
            self.expire(now);
            self.flush_acks(now);
            self.metrics.in_flight.set(self.in_flight.len() as i64);
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
        // Nobody reads entity replies any more; dropping the receiver lets entities blocked on
        // a full reply channel finish instead of hanging the shutdown.
        drop(self.replies);
        self.host.shutdown().await;
        result
    }

    fn on_source_event(&mut self, event: SourceEvent) {
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
            SourceEvent::Delivery(delivery) => self.on_delivery(*delivery),
        }
    }

    fn on_delivery(&mut self, delivery: Delivery) {
        if self.session.is_none() || delivery.acker.poisoned() {
            // Its channel is gone: the broker has it back already.
            return;
        }
        if delivery.redelivered {
            self.metrics.redelivered.inc();
        }
        let decoded = self.decode(&delivery.data);
        let Delivery {
            data,
            properties,
            acker,
            ..
        } = delivery;
        let now = Instant::now();
        match decoded {
            Ok(message) => {
                let entity = message.entity_id();
                let key = self.in_flight.insert(
                    Held {
                        acker,
                        body: data,
                        properties,
                        entity: Some(entity.clone()),
                    },
                    now,
                );
                let envelope = Arc::new(Envelope {
                    correlation: key.0,
                    message,
                });
                self.dispatcher.offer(entity, envelope, now);
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
                        entity: None,
                    },
                    now,
                );
                self.dead_letter(key, invalid.to_string());
            }
        }
    }

    fn decode(&self, body: &[u8]) -> Result<MessageOf<F>, InvalidMessage> {
        if body.len() > self.settings.max_message_bytes {
            return Err(InvalidMessage::Oversize {
                size: body.len(),
                limit: self.settings.max_message_bytes,
            });
        }
        MessageOf::<F>::decode(body)
    }

    fn on_reply(&mut self, reply: EntityReply) {
        match reply {
            EntityReply::Frame { entity, to, frame } => {
                self.dispatcher
                    .handle_frame(&entity, &to, frame, Instant::now());
            }
            EntityReply::Rejected {
                correlation,
                reason,
                ..
            } => {
                // Comes before the confirmation, on the same ordered channel.
                let key = DeliveryKey(correlation);
                if self.in_flight.pending(key).is_some() {
                    self.rejections.insert(key, reason);
                }
            }
        }
    }

    /// Hands the dispatcher's messages to the entities and settles what they confirmed.
    fn pump_dispatcher(&mut self) {
        while let Some((entity, message)) = self.dispatcher.poll_transmit() {
            self.host.deliver(&entity, message);
        }
        while let Some(correlation) = self.dispatcher.poll_confirmed() {
            let key = DeliveryKey(correlation);
            match self.rejections.remove(&key) {
                Some(reason) if self.in_flight.pending(key).is_some() => {
                    self.dead_letter(key, reason);
                }
                _ => {
                    self.in_flight.settle(key, Settlement::Acked);
                }
            }
        }
    }

    /// Publishes a copy to the dead-letter exchange; the delivery is acked once it is confirmed.
    fn dead_letter(&mut self, key: DeliveryKey, reason: String) {
        let (Some(held), Some(session)) = (self.in_flight.pending(key), &self.session) else {
            return;
        };
        let publisher = session.dead_letters.clone();
        let body = held.body.clone();
        let properties = held.properties.clone();
        self.in_flight.mark_settling(key);
        self.dead_letters.push(Box::pin(async move {
            let publish = publisher.publish(&body, &properties, &reason);
            let result = tokio::time::timeout(DEAD_LETTER_TIMEOUT, publish)
                .await
                .unwrap_or(Err(AmqpError::Timeout(DEAD_LETTER_TIMEOUT)));
            (key, result)
        }));
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

    /// Nacks a pending delivery back to the queue and forgets it.
    fn requeue(&mut self, key: DeliveryKey) {
        let Some(held) = self.in_flight.pending(key) else {
            return;
        };
        self.acks.nack(held.acker.clone());
        if let Some(entity) = &held.entity {
            self.dispatcher.cancel(entity, key.0);
        }
        self.rejections.remove(&key);
        self.in_flight.settle(key, Settlement::Requeued);
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

    /// Acks the contiguous settled prefix with one `multiple` ack.
    fn flush_acks(&mut self, now: Instant) {
        let mut settled = std::mem::take(&mut self.settled);
        self.in_flight.pop_settled(&mut settled);
        let (mut acked, mut dead_lettered) = (0, 0);
        let mut last = None;
        for entry in settled.drain(..) {
            match entry.settlement {
                Some(Settlement::Acked) => acked += 1,
                Some(Settlement::DeadLettered) => dead_lettered += 1,
                // Already nacked.
                _ => continue,
            }
            let latency = now.saturating_duration_since(entry.received_at);
            self.metrics.ack_latency.observe(latency.as_secs_f64());
            last = Some(entry.held.acker);
        }
        self.settled = settled;
        if let (Some(acker), Some(session)) = (last, &self.session) {
            self.acks
                .ack(session.generation, acker, acked, dead_lettered);
        }
    }

    /// The channel's deliveries can no longer be acked; the broker requeued them.
    fn lose_channel(&mut self) {
        let dispatcher = &mut self.dispatcher;
        // A message still waiting for its entity is cancelled: its redelivered copy takes its
        // place. One already with its entity stays counted until the entity confirms it.
        let lost = self.in_flight.orphan_all(|key, held| match &held.entity {
            Some(entity) => !dispatcher.cancel(entity, key.0),
            None => false,
        });
        if lost > 0 {
            self.metrics.deliveries.requeued.inc_by(lost as u64);
            warn!(
                lost,
                "channel lost; its unacked deliveries return to the queue"
            );
        }
        // Their verdicts no longer matter: redelivered copies are processed afresh.
        self.rejections.clear();
    }
}
