//! Declares the queue topology, idempotently, with the one function both binaries use: the
//! durable source queue (single active consumer, dead-lettering to `<queue>.dlx`, and on quorum
//! queues an explicit delivery limit) and the dead-letter exchange and queue `<queue>.dlq`.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};

use crate::amqp::AmqpError;
use crate::amqp::settings::{AmqpSettings, QueueType};

/// Name of the fanout exchange that receives the source queue's dead letters.
pub fn dead_letter_exchange(queue: &str) -> String {
    format!("{queue}.dlx")
}

/// Name of the queue that keeps the source queue's dead letters.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// Declares (or checks) the whole topology; a queue that exists with other arguments is a
/// `PRECONDITION_FAILED` error from the broker, reported as is.
pub async fn declare(channel: &Channel, settings: &AmqpSettings) -> Result<(), AmqpError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let dlx = dead_letter_exchange(&settings.queue);
    let dlq = dead_letter_queue(&settings.queue);
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
            durable,
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
    channel
        .queue_declare(
            ShortString::from(settings.queue.as_str()),
            durable,
            source_queue_arguments(settings),
        )
        .await?;
    Ok(())
}

fn source_queue_arguments(settings: &AmqpSettings) -> FieldTable {
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
        let classic = source_queue_arguments(&AmqpSettings::default());
        assert!(!classic.contains_key("x-delivery-limit"));
        assert!(classic.contains_key("x-single-active-consumer"));
        let quorum = source_queue_arguments(&AmqpSettings {
            queue_type: QueueType::Quorum,
            delivery_limit: 7,
            ..AmqpSettings::default()
        });
        assert_eq!(
            quorum.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(7))
        );
    }
}
