//! The confirmed publisher: persistent, `mandatory` messages on a channel in confirm mode, with
//! a bounded number of confirms outstanding (pipelined, not one at a time). A message counts as
//! published only when the broker acked it without returning it. Nacked messages, and every
//! message still unconfirmed when the connection drops, are published again after reconnecting
//! with backoff: at-least-once, nothing silently dropped. A returned (unroutable) message is
//! counted and reported, never taken for success.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{Future, FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tracing::{info, warn};

use crate::amqp::settings::AmqpSettings;
use crate::amqp::{AmqpError, topology};
use crate::telemetry::traces::TRACEPARENT;

/// How the publisher connects and how far it pipelines.
#[derive(Clone, Debug)]
pub struct PublisherSettings {
    /// Broker and topology: published through the default exchange routed by queue name, or
    /// with partitions through their exchange routed by each message's partition key.
    pub amqp: AmqpSettings,
    /// Most messages published but not yet confirmed.
    pub max_outstanding: usize,
    /// Shown in the management UI.
    pub connection_name: String,
}

/// One message to publish.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    /// The body, sent as `application/json`.
    pub body: Vec<u8>,
    /// Set as the AMQP `message_id` when given (consumers may deduplicate on it).
    pub message_id: Option<String>,
    /// The id of the entity the message is for: with partitions, the routing key that picks
    /// its partition, so all of one entity's messages share one queue and keep their order.
    pub partition_key: String,
    /// The W3C trace context to send along in a `traceparent` header, if the message is traced.
    pub traceparent: Option<String>,
}

/// Running totals, for progress lines and the final summary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublisherStats {
    /// Messages handed to [`ConfirmedPublisher::publish`].
    pub accepted: u64,
    /// Messages the broker confirmed and routed to a queue.
    pub confirmed: u64,
    /// Messages returned as unroutable (not delivered anywhere).
    pub returned: u64,
    /// Publisher nacks received (each nacked message is published again).
    pub nacked: u64,
    /// Publications beyond the first, after a nack or a lost connection.
    pub republished: u64,
    /// Connections opened after the first one.
    pub reconnects: u64,
    /// Accepted but neither confirmed nor returned yet.
    pub outstanding: u64,
}

type ConfirmFuture =
    Pin<Box<dyn Future<Output = (u64, u64, lapin::Result<Confirmation>)> + Send + 'static>>;

struct Pending {
    message: OutgoingMessage,
    sends: u32,
}

struct Link {
    connection: Connection,
    channel: Channel,
}

/// A publisher that survives broker restarts and connection loss.
pub struct ConfirmedPublisher {
    settings: PublisherSettings,
    link: Option<Link>,
    /// Connections opened so far; confirms from an older one are ignored.
    generations: u64,
    /// Pauses before reconnecting; present from a failure until the next confirm.
    reconnect_pause: Option<Box<dyn Iterator<Item = Duration> + Send>>,
    next_id: u64,
    /// Every message accepted and not yet confirmed or returned, by acceptance order.
    outstanding: BTreeMap<u64, Pending>,
    /// Messages to publish on the current channel, in order.
    to_send: VecDeque<u64>,
    confirms: FuturesUnordered<ConfirmFuture>,
    stats: PublisherStats,
}

impl ConfirmedPublisher {
    /// A publisher that connects on first use.
    pub fn new(settings: PublisherSettings) -> Self {
        ConfirmedPublisher {
            settings,
            link: None,
            generations: 0,
            reconnect_pause: None,
            next_id: 0,
            outstanding: BTreeMap::new(),
            to_send: VecDeque::new(),
            confirms: FuturesUnordered::new(),
            stats: PublisherStats::default(),
        }
    }

    /// Totals so far.
    pub fn stats(&self) -> PublisherStats {
        PublisherStats {
            outstanding: self.outstanding.len() as u64,
            ..self.stats
        }
    }

    /// Accepts a message and publishes it, waiting only while `max_outstanding` confirms are
    /// pending. Reconnects as long as it takes; cancel by dropping the future.
    pub async fn publish(&mut self, message: OutgoingMessage) {
        let id = self.next_id;
        self.next_id += 1;
        self.outstanding.insert(id, Pending { message, sends: 0 });
        self.to_send.push_back(id);
        self.stats.accepted += 1;
        loop {
            self.settle_ready();
            self.send_what_fits().await;
            if self.to_send.is_empty() && self.confirms.len() < self.settings.max_outstanding {
                return;
            }
            self.wait_for_a_confirm().await;
        }
    }

    /// Waits until every accepted message is confirmed or returned.
    pub async fn flush(&mut self) {
        loop {
            self.settle_ready();
            self.send_what_fits().await;
            if self.outstanding.is_empty() {
                return;
            }
            self.wait_for_a_confirm().await;
        }
    }

    /// Closes the connection politely; unconfirmed messages stay counted as outstanding.
    pub async fn close(mut self) {
        if let Some(link) = self.link.take() {
            let _ = link
                .connection
                .close(200, ShortString::from("warren producer done"))
                .await;
        }
    }

    /// Publishes queued messages while the confirm window has room.
    async fn send_what_fits(&mut self) {
        while self.confirms.len() < self.settings.max_outstanding {
            let Some(&id) = self.to_send.front() else {
                return;
            };
            let channel = self.ensure_link().await;
            let generation = self.generations;
            let Some(pending) = self.outstanding.get_mut(&id) else {
                self.to_send.pop_front();
                continue;
            };
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/json"));
            let properties = match &pending.message.message_id {
                Some(message_id) => {
                    properties.with_message_id(ShortString::from(message_id.as_str()))
                }
                None => properties,
            };
            let properties = match &pending.message.traceparent {
                Some(context) => {
                    let mut headers = FieldTable::default();
                    headers.insert(
                        TRACEPARENT.into(),
                        AMQPValue::LongString(LongString::from(context.as_str())),
                    );
                    properties.with_headers(headers)
                }
                None => properties,
            };
            let (exchange, routing_key) = self
                .settings
                .amqp
                .publish_target(&pending.message.partition_key);
            let published = channel
                .basic_publish(
                    ShortString::from(exchange),
                    ShortString::from(routing_key),
                    BasicPublishOptions {
                        // Never `immediate`: RabbitMQ 3+ closes the connection for it.
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &pending.message.body,
                    properties,
                )
                .await;
            match published {
                Ok(confirm) => {
                    if pending.sends > 0 {
                        self.stats.republished += 1;
                    }
                    pending.sends += 1;
                    self.to_send.pop_front();
                    self.confirms
                        .push(Box::pin(async move { (id, generation, confirm.await) }));
                }
                Err(error) => {
                    self.link_lost(&error.to_string());
                    return;
                }
            }
        }
    }

    /// Settles the confirms that already arrived, without waiting.
    fn settle_ready(&mut self) {
        while let Some(Some((id, generation, result))) = self.confirms.next().now_or_never() {
            self.settle(id, generation, result);
        }
    }

    async fn wait_for_a_confirm(&mut self) {
        if let Some((id, generation, result)) = self.confirms.next().await {
            self.settle(id, generation, result);
        }
    }

    fn settle(&mut self, id: u64, generation: u64, result: lapin::Result<Confirmation>) {
        if generation != self.generations {
            return;
        }
        match result {
            Ok(Confirmation::Ack(None)) => {
                if self.outstanding.remove(&id).is_some() {
                    self.stats.confirmed += 1;
                }
                // Only a confirm proves the link works; a broker that accepts the connection
                // but closes the channel on every publish must still be backed off from.
                self.reconnect_pause = None;
            }
            Ok(Confirmation::Ack(Some(returned))) => {
                if self.outstanding.remove(&id).is_some() {
                    self.stats.returned += 1;
                    warn!(
                        queue = %self.settings.amqp.queue,
                        reply = %returned.reply_text,
                        "message returned as unroutable"
                    );
                }
            }
            Ok(Confirmation::Nack(_)) => {
                self.stats.nacked += 1;
                self.to_send.push_back(id);
            }
            Ok(Confirmation::NotRequested) => self.link_lost("channel is not in confirm mode"),
            Err(error) => self.link_lost(&error.to_string()),
        }
    }

    /// Forgets the channel; every unconfirmed message is published again on the next one.
    fn link_lost(&mut self, reason: &str) {
        self.start_backing_off();
        if self.link.take().is_some() {
            warn!(%reason, outstanding = self.outstanding.len(), "publisher connection lost; republishing unconfirmed messages");
        }
        self.confirms = FuturesUnordered::new();
        self.to_send = self.outstanding.keys().copied().collect();
    }

    /// Connects and declares the topology before the first publish, waiting out an
    /// unreachable broker; fails only when the broker's topology disagrees with the settings
    /// ([`AmqpError::PartitionMismatch`], [`AmqpError::NoConsistentHashExchange`]), which no
    /// wait mends.
    pub async fn connect(&mut self) -> Result<(), AmqpError> {
        while self.link.is_none() {
            if let Err(error) = self.try_link().await
                && error.is_refused_topology()
            {
                return Err(error);
            }
        }
        Ok(())
    }

    async fn ensure_link(&mut self) -> Channel {
        loop {
            if let Some(link) = &self.link {
                return link.channel.clone();
            }
            // A refused topology is logged and retried: the producer checked it at start.
            let _ = self.try_link().await;
        }
    }

    /// One attempt to open the link, after the backoff's pause if one is running; a failure
    /// is logged and starts the backoff.
    async fn try_link(&mut self) -> Result<(), AmqpError> {
        if let Some(pause) = self.reconnect_pause.as_mut() {
            let delay = pause.next().unwrap_or(self.settings.amqp.reconnect_max);
            tokio::time::sleep(delay).await;
        }
        match open(&self.settings).await {
            Ok((connection, channel)) => {
                self.generations += 1;
                if self.generations > 1 {
                    self.stats.reconnects += 1;
                    info!(generation = self.generations, "publisher reconnected");
                }
                self.link = Some(Link {
                    connection,
                    channel,
                });
                Ok(())
            }
            Err(error) => {
                warn!(%error, "cannot publish to the broker");
                self.start_backing_off();
                Err(error)
            }
        }
    }

    fn start_backing_off(&mut self) {
        if self.reconnect_pause.is_none() {
            self.reconnect_pause = Some(Box::new(self.settings.amqp.reconnect_backoff()));
        }
    }
}

/// Connects, declares the topology and turns on confirms. A free function so that the
/// publisher's futures borrow only the (shareable) settings across the awaits.
async fn open(settings: &PublisherSettings) -> Result<(Connection, Channel), AmqpError> {
    let connection = settings.amqp.connect(&settings.connection_name).await?;
    topology::declare(&connection, &settings.amqp).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((connection, channel))
}

/// Publishes one message with the `mandatory` flag on `channel` (in confirm mode) and waits for
/// the broker's confirm: `Ok` only when it acked the message without returning it. For one-off
/// copies (dead letters, replays); [`ConfirmedPublisher`] pipelines a stream.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: ShortString,
    routing_key: ShortString,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), AmqpError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = channel
        .basic_publish(exchange.clone(), routing_key, options, body, properties)
        .await?;
    match confirm.await? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(AmqpError::Returned {
            exchange: exchange.to_string(),
            reply: returned.reply_text.to_string(),
        }),
        Confirmation::Nack(_) => Err(AmqpError::Nacked),
        Confirmation::NotRequested => Err(AmqpError::NotConfirmed),
    }
}
