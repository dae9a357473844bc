//! Dead-lettering with a reason. `basic.reject` cannot add headers, so a message the bridge
//! gives up on is republished to `<queue>.dlx` with an `x-warren-error` header, on a channel in
//! confirm mode; the original is acked only after the broker confirmed the copy. A crash in
//! between leaves the message both dead-lettered and redelivered: nothing is lost.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use crate::amqp::AmqpError;
use crate::amqp::topology::dead_letter_exchange;

/// Header that names why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-warren-error";

/// Header that names the queue a dead letter came from.
pub const SOURCE_QUEUE_HEADER: &str = "x-warren-source-queue";

/// Publishes dead letters for one source queue; cheap to clone.
#[derive(Clone)]
pub struct DeadLetterPublisher {
    channel: Channel,
    exchange: ShortString,
    source_queue: LongString,
}

impl DeadLetterPublisher {
    /// Opens a confirm-mode channel on `connection` for `queue`'s dead letters.
    pub async fn open(connection: &Connection, queue: &str) -> Result<Self, AmqpError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(DeadLetterPublisher {
            channel,
            exchange: ShortString::from(dead_letter_exchange(queue).as_str()),
            source_queue: LongString::from(queue),
        })
    }

    /// Publishes a copy of a message with `reason` and waits for the broker's confirm.
    pub async fn publish(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        reason: &str,
    ) -> Result<(), AmqpError> {
        let mut headers = properties.headers().clone().unwrap_or_default();
        headers.insert(
            ERROR_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        headers.insert(
            SOURCE_QUEUE_HEADER.into(),
            AMQPValue::LongString(self.source_queue.clone()),
        );
        let properties = properties
            .clone()
            .with_headers(headers)
            .with_delivery_mode(2);
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.clone(),
                ShortString::from(""),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await?;
        match confirm.await? {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(AmqpError::Returned {
                exchange: self.exchange.to_string(),
                reply: returned.reply_text.to_string(),
            }),
            Confirmation::Nack(_) => Err(AmqpError::Nacked),
            Confirmation::NotRequested => Err(AmqpError::NotConfirmed),
        }
    }
}
