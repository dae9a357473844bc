//! The supervised AMQP consumer. One task owns the connection: it connects, declares the
//! topology, sets per-consumer prefetch (`global = false`) and consumes with manual acks; after
//! any failure it rebuilds all of that with backoff. Deliveries reach the bridge through a small
//! bounded channel, so prefetch stays the bound on what is held in memory.
//!
//! Every (re)connection is a new *session* with a new generation: acks are only valid on the
//! channel a delivery came from, so the bridge abandons the deliveries of an older session and
//! lets the broker redeliver them.

use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{Channel, Connection, Consumer};
use prometheus::{IntCounter, IntGauge};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::amqp::dead_letter::DeadLetterPublisher;
use crate::amqp::settings::AmqpSettings;
use crate::amqp::{AmqpError, topology};

/// Longest wait for the broker while opening a session.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest wait for the broker while closing a channel and connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A session that lasted this long was healthy: the reconnect backoff starts over.
const STABLE_SESSION: Duration = Duration::from_secs(30);

/// Deliveries handed over but not yet taken by the bridge; small, because prefetch is the
/// real bound and the bridge pulls only when it has room.
const HANDOVER_CAPACITY: usize = 16;

/// What the consumer needs beyond the shared broker settings.
#[derive(Clone, Debug)]
pub struct SourceSettings {
    /// Broker and topology.
    pub amqp: AmqpSettings,
    /// The queue this consumer reads: one of `amqp`'s source queues.
    pub queue: String,
    /// Unacked deliveries the broker may push to this consumer.
    pub prefetch: u16,
    /// Shown in the management UI; also the consumer tag's stem.
    pub connection_name: String,
}

/// Counters the source keeps up to date.
#[derive(Clone, Debug)]
pub struct SourceMetrics {
    /// Sessions opened after the first one.
    pub reconnects: IntCounter,
    /// 1 while a session is consuming.
    pub connected: IntGauge,
}

/// One consuming channel; its deliveries can only be acked while it lives.
#[derive(Clone)]
pub struct Session {
    /// Increases with every new session.
    pub generation: u64,
    /// Dead-letter publisher, on a connection of its own: a publishing connection can be
    /// blocked by a broker resource alarm, and acks must not wait behind that.
    pub dead_letters: DeadLetterPublisher,
    abort: CancellationToken,
}

impl Session {
    /// Ends this session (the broker requeues its unacked deliveries) and opens a new one
    /// after a pause; for when part of it, such as dead-lettering, stopped working.
    pub fn abort(&self) {
        self.abort.cancel();
    }
}

/// What the source tells the bridge, in order.
pub enum SourceEvent {
    /// A new session is consuming; every delivery that follows belongs to it.
    Connected(Session),
    /// A message; ack it only through its own `acker`.
    Delivery(Box<Delivery>),
    /// The session failed; the broker requeues its unacked deliveries.
    Disconnected {
        /// The session that ended.
        generation: u64,
        /// Why it ended.
        reason: String,
    },
}

/// Handle to the supervised consumer task.
pub struct AmqpSource {
    queue: String,
    events: mpsc::Receiver<SourceEvent>,
    close: CancellationToken,
    task: JoinHandle<()>,
}

impl AmqpSource {
    /// Starts consuming in the background; it keeps reconnecting until [`Self::close`].
    pub fn spawn(settings: SourceSettings, metrics: SourceMetrics) -> Self {
        let (tx, events) = mpsc::channel(HANDOVER_CAPACITY);
        let close = CancellationToken::new();
        let queue = settings.queue.clone();
        let task = tokio::spawn(supervise(settings, metrics, tx, close.clone()));
        AmqpSource {
            queue,
            events,
            close,
            task,
        }
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next event; `None` once the source has stopped.
    pub async fn next(&mut self) -> Option<SourceEvent> {
        self.events.recv().await
    }

    /// The next event if one is ready, without waiting.
    pub fn try_next(&mut self) -> Option<SourceEvent> {
        self.events.try_recv().ok()
    }

    /// Closes the channel and connection (the broker requeues whatever is unacked) and waits
    /// for the task. Never `basic.cancel`: on a quorum queue with single active consumer that
    /// would hand the queue over while deliveries are still held.
    pub async fn close(self) {
        self.close.cancel();
        drop(self.events);
        if let Err(error) = self.task.await {
            warn!(%error, "amqp source task failed");
        }
    }
}

struct Open {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
    dead_letter_connection: Connection,
    dead_letters: DeadLetterPublisher,
}

enum PumpEnd {
    Closed,
    ReceiverGone,
    Failed(String),
}

async fn supervise(
    settings: SourceSettings,
    metrics: SourceMetrics,
    tx: mpsc::Sender<SourceEvent>,
    close: CancellationToken,
) {
    let mut backoff = settings.amqp.reconnect_backoff();
    let mut generation = 0u64;
    loop {
        let attempt = tokio::select! {
            _ = close.cancelled() => return,
            attempt = tokio::time::timeout(OPEN_TIMEOUT, open(&settings, generation + 1)) => attempt,
        };
        match attempt {
            Ok(Ok(mut open)) => {
                generation += 1;
                if generation > 1 {
                    metrics.reconnects.inc();
                }
                let started = tokio::time::Instant::now();
                metrics.connected.set(1);
                info!(generation, queue = %settings.queue, prefetch = settings.prefetch, "consuming");
                let abort = CancellationToken::new();
                let session = Session {
                    generation,
                    dead_letters: open.dead_letters.clone(),
                    abort: abort.clone(),
                };
                let end = if tx.send(SourceEvent::Connected(session)).await.is_err() {
                    PumpEnd::ReceiverGone
                } else {
                    pump(&mut open.consumer, &tx, &close, &abort).await
                };
                // Quick failures in a row back off further; a healthy session starts over.
                if started.elapsed() >= STABLE_SESSION {
                    backoff = settings.amqp.reconnect_backoff();
                }
                metrics.connected.set(0);
                match end {
                    PumpEnd::Closed | PumpEnd::ReceiverGone => {
                        shut(&open).await;
                        info!(generation, "consumer closed");
                        return;
                    }
                    PumpEnd::Failed(reason) => {
                        warn!(generation, %reason, "consumer session failed; reconnecting");
                        let _ = tx
                            .send(SourceEvent::Disconnected { generation, reason })
                            .await;
                        shut(&open).await;
                    }
                }
            }
            Ok(Err(error)) if error.is_refused_topology() => {
                error!(%error, queue = %settings.queue, "not consuming; retrying");
            }
            Ok(Err(error)) => warn!(%error, "cannot consume from the broker; retrying"),
            Err(_) => warn!(timeout = ?OPEN_TIMEOUT, "broker did not answer; retrying"),
        }
        let delay = backoff.next().unwrap_or(settings.amqp.reconnect_max);
        tokio::select! {
            _ = close.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn open(settings: &SourceSettings, generation: u64) -> Result<Open, AmqpError> {
    let connection = settings.amqp.connect(&settings.connection_name).await?;
    topology::declare(&connection, &settings.amqp).await?;
    let channel = connection.create_channel().await?;
    // Per consumer, before consuming: it applies only to consumers created afterwards, and it
    // is the only kind quorum queues accept.
    channel
        .basic_qos(settings.prefetch, BasicQosOptions { global: false })
        .await?;
    let tag = format!("{}-{generation}", settings.connection_name);
    let consumer = channel
        .basic_consume(
            ShortString::from(settings.queue.as_str()),
            ShortString::from(tag.as_str()),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let dead_letter_connection = settings
        .amqp
        .connect(&format!("{}-dead-letters", settings.connection_name))
        .await?;
    let dead_letters = DeadLetterPublisher::open(
        &dead_letter_connection,
        &settings.amqp.queue,
        &settings.queue,
    )
    .await?;
    Ok(Open {
        connection,
        channel,
        consumer,
        dead_letter_connection,
        dead_letters,
    })
}

async fn pump(
    consumer: &mut Consumer,
    tx: &mpsc::Sender<SourceEvent>,
    close: &CancellationToken,
    abort: &CancellationToken,
) -> PumpEnd {
    loop {
        // Reserve room first, so a delivery is only taken off the consumer when the bridge can
        // accept it.
        let permit = tokio::select! {
            biased;
            _ = close.cancelled() => return PumpEnd::Closed,
            _ = abort.cancelled() => return PumpEnd::Failed("session aborted by the bridge".into()),
            permit = tx.reserve() => match permit {
                Ok(permit) => permit,
                Err(_) => return PumpEnd::ReceiverGone,
            },
        };
        let next = tokio::select! {
            biased;
            _ = close.cancelled() => return PumpEnd::Closed,
            _ = abort.cancelled() => return PumpEnd::Failed("session aborted by the bridge".into()),
            next = consumer.next() => next,
        };
        match next {
            Some(Ok(delivery)) => permit.send(SourceEvent::Delivery(Box::new(delivery))),
            Some(Err(error)) => return PumpEnd::Failed(error.to_string()),
            None => return PumpEnd::Failed("consumer cancelled by the broker".into()),
        }
    }
}

async fn shut(open: &Open) {
    let closing = async {
        let _ = open
            .channel
            .close(200, ShortString::from("warren consumer closing"))
            .await;
        let _ = open
            .connection
            .close(200, ShortString::from("warren consumer closing"))
            .await;
        let _ = open
            .dead_letter_connection
            .close(200, ShortString::from("warren consumer closing"))
            .await;
    };
    if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
        warn!("broker did not confirm the close in time");
    }
}
