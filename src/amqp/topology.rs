//! Declares the queue topology, idempotently, with the one function both binaries use (or, with
//! `amqp.declare = "passive"`, attaches to a queue that exists, as it is): the
//! durable source queue (single active consumer, dead-lettering to `<queue>.dlx`, and on quorum
//! queues an explicit delivery limit) and the dead-letter exchange and queue `<queue>.dlq`.
//!
//! With partitions, the source queue is N partition queues `<queue>.p0` … like it, fed by the
//! consistent-hash exchange `<queue>.partitions` (plugin `rabbitmq_consistent_hash_exchange`)
//! that hashes the routing key, the entity's id, so one entity's messages all land in one
//! partition; they share the one dead-letter queue. A different partition count than the
//! topology was declared with would rebind the exchange and move entities between queues while
//! their older messages wait in the old ones, so the declarations carry the count where the
//! broker compares it (the partition exchange's kind, each partition queue's
//! `x-dead-letter-routing-key`) and a mismatch is refused by the broker before anything is
//! published or consumed.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use tracing::warn;

use crate::amqp::AmqpError;
use crate::amqp::settings::{
    AmqpSettings, DeclareMode, QueueType, partition_exchange, partition_queue,
};

/// The consistent-hash exchange's type name.
const CONSISTENT_HASH: &str = "x-consistent-hash";

/// Each partition queue's binding key: its weight, the number of hash buckets it gets. Equal
/// weights share the keys evenly.
const PARTITION_WEIGHT: &str = "1";

/// Name of the fanout exchange that receives the source queue's dead letters.
pub fn dead_letter_exchange(queue: &str) -> String {
    format!("{queue}.dlx")
}

/// Name of the queue that keeps the source queue's dead letters.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// Declares (or checks) the whole topology on a channel of `connection`; a queue that exists
/// with other arguments is a `PRECONDITION_FAILED` error from the broker, reported as is, and
/// a topology declared with another partition count is [`AmqpError::PartitionMismatch`].
pub async fn declare(connection: &Connection, settings: &AmqpSettings) -> Result<(), AmqpError> {
    let channel = connection.create_channel().await?;
    match settings.declare {
        DeclareMode::All => declare_on(&channel, settings).await?,
        DeclareMode::Passive => attach(&channel, &settings.queue).await?,
    }
    channel.close(200, ShortString::from("declared")).await?;
    Ok(())
}

/// The durable options every queue is declared with.
const DURABLE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

async fn declare_on(channel: &Channel, settings: &AmqpSettings) -> Result<(), AmqpError> {
    // First, so that a node configured with another count declares nothing.
    channel
        .exchange_declare(
            ShortString::from(partition_exchange(&settings.queue).as_str()),
            partition_exchange_kind(settings.partitions),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|error| match refusal_code(&error) {
            Some(COMMAND_INVALID) if settings.partitions > 1 => AmqpError::NoConsistentHashExchange,
            _ => partition_mismatch(error, "inequivalent arg 'type'", settings),
        })?;
    declare_dead_letters(channel, &settings.queue).await?;
    if settings.partitions > 1 {
        refuse_an_unpartitioned_backlog(channel, settings).await?;
    }
    for (partition, queue) in (0u16..).zip(settings.source_queues()) {
        channel
            .queue_declare(
                ShortString::from(queue.as_str()),
                DURABLE,
                source_queue_arguments(settings, partition),
            )
            .await
            .map_err(|error| partition_mismatch(error, DEAD_LETTER_ROUTING_KEY, settings))?;
    }
    if settings.partitions > 1 {
        bind_partitions(channel, settings).await?;
    }
    Ok(())
}

/// `amqp.declare = "passive"`: the queue must exist and is taken as it is. Over AMQP a passive
/// declare says only that it exists (and its counts), never its arguments, so what Warren
/// cannot count on is said once per connection: without `x-single-active-consumer` the bridge
/// singleton is the only fence against two consumers (a partition healing with two holders
/// would deliver to both for a moment), and messages the broker itself dead-letters (rejected
/// by a quorum delivery limit, expired) go where the queue's own `x-dead-letter-exchange` says,
/// if anywhere. Warren's own dead letters (undecodable orders, failed entities) go to
/// `<queue>.dlq` through `<queue>.dlx`, which it declares beside the queue.
async fn attach(channel: &Channel, queue: &str) -> Result<(), AmqpError> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..DURABLE
    };
    channel
        .queue_declare(ShortString::from(queue), passive, FieldTable::default())
        .await
        .map_err(|error| match refusal_code(&error) {
            Some(NOT_FOUND) => AmqpError::MissingQueue {
                queue: queue.to_owned(),
            },
            _ => AmqpError::Broker(error),
        })?;
    warn!(
        %queue,
        dead_letters = %dead_letter_queue(queue),
        "amqp.declare = \"passive\": using the queue as it is; its arguments cannot be read over AMQP, so \
         without x-single-active-consumer the bridge singleton is the only fence against two \
         consumers, and what the broker dead-letters itself follows the queue's own \
         x-dead-letter-exchange; Warren's dead letters go to the dead-letter queue named here"
    );
    declare_dead_letters(channel, queue).await
}

/// The dead-letter exchange and queue of `queue`.
async fn declare_dead_letters(channel: &Channel, queue: &str) -> Result<(), AmqpError> {
    let dlx = dead_letter_exchange(queue);
    let dlq = dead_letter_queue(queue);
    channel
        .exchange_declare(
            ShortString::from(dlx.as_str()),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(
            ShortString::from(dlq.as_str()),
            DURABLE,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            ShortString::from(dlq.as_str()),
            ShortString::from(dlx.as_str()),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Beside the partitions the single queue stays declared, empty: messages still published to
/// it the unpartitioned way wait there instead of being dropped, and a backlog left from before
/// the queue was partitioned (which no partition's consumer would read) is refused.
async fn refuse_an_unpartitioned_backlog(
    channel: &Channel,
    settings: &AmqpSettings,
) -> Result<(), AmqpError> {
    let single = channel
        .queue_declare(
            ShortString::from(settings.queue.as_str()),
            DURABLE,
            unpartitioned_queue_arguments(settings),
        )
        .await?;
    if single.message_count() == 0 {
        return Ok(());
    }
    Err(AmqpError::PartitionMismatch {
        queue: settings.queue.clone(),
        configured: settings.partitions,
        found: format!(
            "the unpartitioned queue `{}` holds {} messages",
            settings.queue,
            single.message_count()
        ),
    })
}

/// Binds the partition queues to their exchange. Buckets are numbered in binding order;
/// binding again with the same key is a no-op, so every declaration after the first leaves the
/// ring as it was. A restarted broker rebuilds the ring from its bindings sorted by queue name,
/// so bind in that order (p0, p1, p10, p11, …, p2), or entities would move to other partitions
/// on a restart.
async fn bind_partitions(channel: &Channel, settings: &AmqpSettings) -> Result<(), AmqpError> {
    let exchange = partition_exchange(&settings.queue);
    let mut by_name = settings.source_queues();
    by_name.sort();
    for queue in by_name {
        channel
            .queue_bind(
                ShortString::from(queue.as_str()),
                ShortString::from(exchange.as_str()),
                ShortString::from(PARTITION_WEIGHT),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// The partition exchange's kind, which records whether the queue is partitioned: the
/// consistent-hash exchange that routes to the partitions, or for one queue a direct exchange
/// with nothing bound, there only so that the broker refuses a later declaration with
/// partitions (an exchange's kind cannot change), and the other way round.
fn partition_exchange_kind(partitions: u16) -> ExchangeKind {
    if partitions > 1 {
        ExchangeKind::Custom(CONSISTENT_HASH.into())
    } else {
        ExchangeKind::Direct
    }
}

/// The argument that records a partition queue's place, `<queue>.p<i> of <N>`: the broker
/// refuses to declare an existing queue with a different value, so a node configured with
/// another partition count fails on the first partition queue. The dead-letter exchange is a
/// fanout, so the key routes nothing; it names the partition on messages the broker itself
/// dead-letters.
const DEAD_LETTER_ROUTING_KEY: &str = "x-dead-letter-routing-key";

/// AMQP reply code for a declaration that disagrees with what exists.
const PRECONDITION_FAILED: u16 = 406;

/// AMQP reply code for an unknown exchange type, among others.
const COMMAND_INVALID: u16 = 503;

/// The broker's reply code for a passive declare of something that does not exist.
const NOT_FOUND: u16 = 404;

/// The reply code of a refusal by the broker, if `error` is one.
fn refusal_code(error: &lapin::Error) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(refusal) => Some(refusal.get_id()),
        _ => None,
    }
}

/// `error` as [`AmqpError::PartitionMismatch`] when the broker refused a declaration for a
/// reason that names `marker`; any other error as it is.
fn partition_mismatch(error: lapin::Error, marker: &str, settings: &AmqpSettings) -> AmqpError {
    if let lapin::ErrorKind::ProtocolError(refusal) = error.kind()
        && refusal.get_id() == PRECONDITION_FAILED
        && refusal.get_message().as_str().contains(marker)
    {
        return AmqpError::PartitionMismatch {
            queue: settings.queue.clone(),
            configured: settings.partitions,
            found: refusal.get_message().to_string(),
        };
    }
    error.into()
}

/// Partition `partition`'s queue arguments: the single queue's, and with more than one
/// partition the [`DEAD_LETTER_ROUTING_KEY`] that records the count.
fn source_queue_arguments(settings: &AmqpSettings, partition: u16) -> FieldTable {
    let mut arguments = unpartitioned_queue_arguments(settings);
    if settings.partitions > 1 {
        let place = format!(
            "{} of {}",
            partition_queue(&settings.queue, partition),
            settings.partitions
        );
        arguments.insert(
            DEAD_LETTER_ROUTING_KEY.into(),
            AMQPValue::LongString(LongString::from(place.as_str())),
        );
    }
    arguments
}

/// The single queue's arguments, as every version has declared them.
fn unpartitioned_queue_arguments(settings: &AmqpSettings) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(
            dead_letter_exchange(&settings.queue).as_str(),
        )),
    );
    // A broker-side fence: even two nodes that both believe they hold the consumer role cannot
    // both receive.
    arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    if settings.queue_type == QueueType::Quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        // 3.10 has no default limit; every return (nack, close, crash) counts toward it.
        arguments.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(settings.delivery_limit)),
        );
    }
    arguments
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_queues_get_an_explicit_delivery_limit_and_classic_ones_do_not() {
        let classic = source_queue_arguments(&AmqpSettings::default(), 0);
        assert!(!classic.contains_key("x-delivery-limit"));
        assert!(classic.contains_key("x-single-active-consumer"));
        let quorum = source_queue_arguments(
            &AmqpSettings {
                queue_type: QueueType::Quorum,
                delivery_limit: 7,
                ..AmqpSettings::default()
            },
            0,
        );
        assert_eq!(
            quorum.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(7))
        );
    }
}
