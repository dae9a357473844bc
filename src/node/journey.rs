//! The cluster link's part of a message's trace (see [`crate::telemetry::traces`]): a
//! `warren.link.send` span where an entity's message leaves for the node hosting its shard, and
//! a `warren.link.receive` span around its hand-over to the region on arrival, both in the
//! trace the message carries. Disabled, and free, unless traces are exported; chunks of a
//! large message carry no context and get neither.

use tracing::Span;

use crate::delivery::protocol::Payload;
use crate::entity::EntityMessage;
use crate::node::wire::NodeMsg;
use crate::sharding::ShardingMsg;
use crate::sharding::entities::EntityEnvelope;
use crate::telemetry::{JOURNEY, continue_trace};

/// The entity and trace context of a whole entity message, if that is what `message` is.
fn traced<M: EntityMessage>(message: &ShardingMsg<EntityEnvelope<M>>) -> Option<(&str, &str)> {
    let ShardingMsg::Deliver(deliver) = message else {
        return None;
    };
    let EntityEnvelope::Sequenced { message, .. } = &deliver.message else {
        return None;
    };
    let Payload::Message(payload) = &message.payload else {
        return None;
    };
    Some((deliver.entity.as_str(), payload.trace_context()?))
}

/// Wraps sharding traffic for the transport, marking each traced entity message that leaves.
pub(crate) fn send_sharding<M: EntityMessage>(
    message: ShardingMsg<EntityEnvelope<M>>,
) -> NodeMsg<M> {
    if let Some((entity, context)) = traced(&message) {
        let span = tracing::info_span!(target: JOURNEY, "warren.link.send", otel.kind = "producer", entity);
        continue_trace(&span, Some(context));
    }
    NodeMsg::Sharding(message)
}

/// The span for handing an arrived message to the region (none for untraced ones).
pub(crate) fn receive_span<M: EntityMessage>(message: &ShardingMsg<EntityEnvelope<M>>) -> Span {
    let Some((entity, context)) = traced(message) else {
        return Span::none();
    };
    let span =
        tracing::info_span!(target: JOURNEY, "warren.link.receive", otel.kind = "consumer", entity);
    continue_trace(&span, Some(context));
    span
}
