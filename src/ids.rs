//! The names everything else is keyed by: an entity, a node, one run of a node. They sit at
//! the bottom so that every layer (the protocol, the cluster, sharding, entities) can use them
//! without importing another layer.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Names one entity (for orders, the product id); shards and routes are derived from it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntityId(Arc<str>);

impl EntityId {
    /// Wraps an id.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        EntityId(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for EntityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A node's configured name; stable across restarts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// Wraps a name.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        NodeId(id.into())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One run of a node: its name and a generation that grows with every start, so a restarted
/// node is never mistaken for the one that crashed (Akka's `UniqueAddress`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeAddr {
    /// The node's name.
    pub id: NodeId,
    /// Which start of it (milliseconds since the epoch at start).
    pub generation: u64,
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.id, self.generation)
    }
}
