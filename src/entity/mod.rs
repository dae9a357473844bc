//! Stateful entities and where they run. An application implements [`Entity`] (and
//! [`EntityMessage`] for what it receives); cluster sharding starts each entity on the node
//! that owns its shard, in a task ([`crate::sharding::entities`]) that drives its
//! ShardingConsumerController and retries failures ([`runner`]). What an entity must keep across restarts and moves goes to an
//! [`store::EntityStore`].

pub mod runner;
pub mod store;

use std::future::Future;

pub use crate::ids::EntityId;
pub use runner::{EntityMetrics, RunnerSettings};

/// Why an incoming message cannot be processed at all; it is dead-lettered with this text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    /// Not decodable (bad JSON, wrong types, missing fields).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The field that names the entity is missing or empty.
    #[error("missing {0}")]
    MissingEntityId(&'static str),
    /// Decodable but semantically invalid.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// Bigger than the configured limit; not even decoded.
    #[error("message of {size} bytes exceeds max_message_bytes ({limit})")]
    Oversize {
        /// The body's size.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
}

impl InvalidMessage {
    /// Every value [`Self::kind`] returns.
    pub const KINDS: [&'static str; 4] = ["malformed", "missing_entity_id", "invalid", "oversize"];

    /// A short, bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            InvalidMessage::Malformed(_) => "malformed",
            InvalidMessage::MissingEntityId(_) => "missing_entity_id",
            InvalidMessage::Invalid(_) => "invalid",
            InvalidMessage::Oversize { .. } => "oversize",
        }
    }
}

/// A message type the bridge can decode and route.
pub trait EntityMessage: Send + Sync + Sized + 'static {
    /// Decodes a message body, or says precisely why it is unusable.
    fn decode(body: &[u8]) -> Result<Self, InvalidMessage>;
    /// The entity that must process it.
    fn entity_id(&self) -> EntityId;
    /// The W3C `traceparent` this message carries to wherever its entity runs, so the hosting
    /// node's spans join the trace it arrived with. Only a message type with a field for it
    /// (one its cluster wire format carries) keeps one; by default none is kept, and the
    /// entity's spans start traces of their own.
    fn trace_context(&self) -> Option<&str> {
        None
    }
    /// Keeps `traceparent` for [`Self::trace_context`]; the bridge calls it while traces are
    /// exported.
    fn set_trace_context(&mut self, traceparent: String) {
        let _ = traceparent;
    }
}

/// A processing failure. The runner retries it with backoff; a failure of the message counts
/// toward `max_attempts` (then it is dead-lettered), while [`EntityError::unavailable`] (a
/// dependency such as the entity store is down, which is not the message's fault) is retried
/// for as long as it lasts: the message waits unconfirmed, and its producer's deadline applies.
/// [`EntityError::fenced`] stops the incarnation at once, the message unconfirmed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct EntityError {
    reason: String,
    kind: ErrorKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ErrorKind {
    Failed,
    Rejected,
    Unavailable,
    Fenced,
}

impl EntityError {
    /// The message could not be processed this time.
    pub fn new(reason: impl Into<String>) -> Self {
        EntityError {
            reason: reason.into(),
            kind: ErrorKind::Failed,
        }
    }

    /// The message is refused for good (a business rule said no, e.g. an overdraft): it is
    /// not retried, and the bridge dead-letters it at once with this reason. Retrying would
    /// only hold the entity's later messages back for the same answer.
    pub fn rejected(reason: impl Into<String>) -> Self {
        EntityError {
            reason: reason.into(),
            kind: ErrorKind::Rejected,
        }
    }

    /// Something the entity depends on is unavailable; retried without counting attempts.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        EntityError {
            reason: reason.into(),
            kind: ErrorKind::Unavailable,
        }
    }

    /// A newer incarnation of this entity owns it now (the store refused a stale claim): this
    /// incarnation stops without confirming the message; its producer sends it again, to
    /// wherever the entity then runs (it starts there with a new claim).
    pub fn fenced(reason: impl Into<String>) -> Self {
        EntityError {
            reason: reason.into(),
            kind: ErrorKind::Fenced,
        }
    }

    /// True for [`Self::rejected`].
    pub fn is_rejected(&self) -> bool {
        self.kind == ErrorKind::Rejected
    }

    /// True for [`Self::unavailable`].
    pub fn is_unavailable(&self) -> bool {
        self.kind == ErrorKind::Unavailable
    }

    /// True for [`Self::fenced`].
    pub fn is_fenced(&self) -> bool {
        self.kind == ErrorKind::Fenced
    }
}

/// One stateful entity. It processes its messages one at a time, in order.
pub trait Entity: Send + 'static {
    /// What it processes.
    type Message: EntityMessage;
    /// What a query returns.
    type Snapshot: Send + 'static;

    /// Processes one message. `Ok` means it is applied (or was already: entities must be
    /// idempotent, since delivery is at-least-once); only then is it confirmed.
    fn handle(
        &mut self,
        message: &Self::Message,
    ) -> impl Future<Output = Result<(), EntityError>> + Send;

    /// The entity's current state, for queries.
    fn snapshot(&self) -> Self::Snapshot;

    /// Loads what the entity stored before (on another node, or before a crash); runs before
    /// its first message and is retried with backoff until it succeeds.
    fn recover(&mut self) -> impl Future<Output = Result<(), EntityError>> + Send {
        async { Ok(()) }
    }
}

/// Creates entities on their first message.
pub trait EntityFactory: Send + Sync + 'static {
    /// The entity type it creates.
    type Entity: Entity;
    /// A fresh entity for `id`.
    fn create(&self, id: &EntityId) -> Self::Entity;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_invalid_message_is_a_listed_metric_label() {
        let all = [
            InvalidMessage::Malformed(String::new()),
            InvalidMessage::MissingEntityId("id"),
            InvalidMessage::Invalid(String::new()),
            InvalidMessage::Oversize { size: 2, limit: 1 },
        ];
        for invalid in all {
            assert!(
                InvalidMessage::KINDS.contains(&invalid.kind()),
                "{invalid:?}"
            );
        }
    }
}
