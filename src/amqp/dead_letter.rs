//! Dead-lettering with a reason. `basic.reject` cannot add headers, so a message the bridge
//! gives up on is republished to `<queue>.dlx` with an `x-warren-error` header, on a channel in
//! confirm mode; the original is acked only after the broker confirmed the copy. A crash in
//! between leaves the message both dead-lettered and redelivered: nothing is lost.

use lapin::options::ConfirmSelectOptions;
use lapin::types::{AMQPValue, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use crate::amqp::AmqpError;
use crate::amqp::publisher::publish_confirmed;
use crate::amqp::topology::dead_letter_exchange;

/// Header that names why a message was dead-lettered.
pub const ERROR_HEADER: &str = "x-warren-error";

/// Header that names the queue a dead letter came from.
pub const SOURCE_QUEUE_HEADER: &str = "x-warren-source-queue";

/// The original's properties for a copy (a dead letter, or a dead letter's replay), persistent,
/// less two that would hurt: `expiration` (the copy would silently vanish from its queue once
/// the original is acked) and `user_id` (the broker refuses a publish whose user id is not the
/// publishing connection's). Headers are the caller's to set.
pub fn copy_properties(original: &BasicProperties) -> BasicProperties {
    let mut copy = BasicProperties::default().with_delivery_mode(2);
    let short = |value: &Option<ShortString>| value.clone();
    if let Some(v) = short(original.content_type()) {
        copy = copy.with_content_type(v);
    }
    if let Some(v) = short(original.content_encoding()) {
        copy = copy.with_content_encoding(v);
    }
    if let Some(v) = *original.priority() {
        copy = copy.with_priority(v);
    }
    if let Some(v) = short(original.correlation_id()) {
        copy = copy.with_correlation_id(v);
    }
    if let Some(v) = short(original.reply_to()) {
        copy = copy.with_reply_to(v);
    }
    if let Some(v) = short(original.message_id()) {
        copy = copy.with_message_id(v);
    }
    if let Some(v) = *original.timestamp() {
        copy = copy.with_timestamp(v);
    }
    if let Some(v) = short(original.kind()) {
        copy = copy.with_type(v);
    }
    if let Some(v) = short(original.app_id()) {
        copy = copy.with_app_id(v);
    }
    copy
}

/// Publishes dead letters for one source queue; cheap to clone.
#[derive(Clone)]
pub struct DeadLetterPublisher {
    channel: Channel,
    exchange: ShortString,
    source_queue: LongString,
}

impl DeadLetterPublisher {
    /// Opens a confirm-mode channel on `connection` for the dead letters of `source_queue`,
    /// one of the queues (or partition queues) of `queue`, which share its dead-letter queue.
    pub async fn open(
        connection: &Connection,
        queue: &str,
        source_queue: &str,
    ) -> Result<Self, AmqpError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(DeadLetterPublisher {
            channel,
            exchange: ShortString::from(dead_letter_exchange(queue).as_str()),
            source_queue: LongString::from(source_queue),
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
        let properties = copy_properties(properties).with_headers(headers);
        publish_confirmed(
            &self.channel,
            self.exchange.clone(),
            ShortString::from(""),
            body,
            properties,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_keeps_identity_but_not_expiry_or_user() {
        let original = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_content_type("application/json".into())
            .with_expiration("60000".into())
            .with_user_id("someone-else".into())
            .with_delivery_mode(1);
        let copy = copy_properties(&original);
        assert_eq!(copy.message_id(), &Some("m-1".into()));
        assert_eq!(copy.content_type(), &Some("application/json".into()));
        assert_eq!(copy.delivery_mode(), &Some(2));
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.user_id(), &None);
    }
}
