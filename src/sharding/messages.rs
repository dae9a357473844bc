//! What regions and the coordinator say to each other, and how entity messages travel between
//! regions. Every message may be lost, duplicated or reordered (links die, nodes crash), so
//! each is idempotent and the side waiting for an answer asks again on a timer.

use serde::{Deserialize, Serialize};

use crate::cluster::member::NodeAddr;
use crate::ids::EntityId;
use crate::sharding::shard::ShardId;

/// A region to the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// "I am a region and host these shards" (repeated until acknowledged).
    Register {
        /// Shards this region hosts now.
        hosted: Vec<ShardId>,
    },
    /// "Where does this shard live?"
    GetShardHome {
        /// The shard.
        shard: ShardId,
    },
    /// "I host this shard now."
    ShardStarted {
        /// The shard.
        shard: ShardId,
    },
    /// "I stopped routing to this shard's old home."
    BeginHandOffAck {
        /// The shard.
        shard: ShardId,
    },
    /// "Every entity of this shard has stopped here."
    ShardStopped {
        /// The shard.
        shard: ShardId,
    },
}

/// The coordinator to a region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromCoordinator {
    /// Registration accepted.
    RegisterAck,
    /// "I do not know you": register (with your shards) before anything else.
    RegisterFirst,
    /// The shard lives on `node`; when that is the receiver, it hosts the shard from now on.
    ShardHome {
        /// The shard.
        shard: ShardId,
        /// Its home.
        node: NodeAddr,
    },
    /// The shard is about to move: forget its home and buffer its messages.
    BeginHandOff {
        /// The shard.
        shard: ShardId,
    },
    /// Stop the shard's entities (they finish what they hold) and report when done.
    HandOff {
        /// The shard.
        shard: ShardId,
    },
}

/// An entity message on its way to the region that hosts its shard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deliver<P> {
    /// The entity.
    pub entity: EntityId,
    /// The message.
    pub message: P,
    /// Regions it passed through; a message bounced between stale caches is dropped after a
    /// few (the protocols above resend).
    pub hops: u8,
}

/// Everything sharding sends between nodes, for one entity type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardingMsg<P> {
    /// For the coordinator.
    ToCoordinator(ToCoordinator),
    /// For a region, from the coordinator.
    FromCoordinator(FromCoordinator),
    /// For a region, from a region.
    Deliver(Deliver<P>),
}
