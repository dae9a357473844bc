//! The bridge's part of a message's trace (see [`crate::telemetry::traces`]): one
//! `warren.delivery` span from receipt to settlement, continuing the trace a `traceparent`
//! header names, with a child span for each step (`warren.decode`, `warren.submit` until the
//! entity's outcome, then `warren.ack`, `warren.dead_letter` or `warren.requeue`). Every span is
//! disabled, and costs nothing, unless traces are exported.

use lapin::message::Delivery;
use tracing::{Span, field};

use crate::amqp::headers::header_text;
use crate::telemetry::traces::TRACEPARENT;
use crate::telemetry::{JOURNEY, continue_trace};

/// The `warren.delivery` span of `delivery`, taken from `queue`, in the trace its header names.
pub(crate) fn delivery_span(queue: &str, delivery: &Delivery) -> Span {
    let span = tracing::info_span!(
        target: JOURNEY,
        "warren.delivery",
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.destination.name = queue,
        messaging.rabbitmq.delivery_tag = delivery.delivery_tag,
        messaging.rabbitmq.redelivered = delivery.redelivered,
        entity = field::Empty,
        outcome = field::Empty,
        reason = field::Empty,
    );
    if !span.is_disabled() {
        continue_trace(&span, header_text(&delivery.properties, TRACEPARENT));
    }
    span
}

/// Decoding the body, under the delivery's span.
pub(crate) fn decode(delivery: &Span) -> Span {
    tracing::info_span!(target: JOURNEY, parent: delivery, "warren.decode")
}

/// From handing the message to the sharding producer until its entity's outcome arrives; the
/// message carries this span's context to wherever its entity runs.
pub(crate) fn submit(delivery: &Span, entity: &str) -> Span {
    tracing::info_span!(target: JOURNEY, parent: delivery, "warren.submit", entity)
}

/// Handing the ack to the ack writer (acks are batched; the frame may follow a moment later).
pub(crate) fn ack(delivery: &Span) -> Span {
    tracing::info_span!(target: JOURNEY, parent: delivery, "warren.ack")
}

/// Publishing the copy to the dead-letter exchange until the broker confirmed it.
pub(crate) fn dead_letter(delivery: &Span, reason: &str) -> Span {
    tracing::info_span!(target: JOURNEY, parent: delivery, "warren.dead_letter", reason)
}

/// Nacking the delivery back to its queue.
pub(crate) fn requeue(delivery: &Span) -> Span {
    tracing::info_span!(target: JOURNEY, parent: delivery, "warren.requeue")
}

/// Records how the delivery ended (and why, for a dead letter) on its span.
pub(crate) fn settled(delivery: &Span, outcome: &str, reason: Option<&str>) {
    delivery.record("outcome", outcome);
    if let Some(reason) = reason {
        delivery.record("reason", reason);
    }
}
