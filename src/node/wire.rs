//! What nodes send each other: one enum for everything a node's parts exchange, so one
//! authenticated link per pair of nodes carries it all and the router can hand each message to
//! the part it is for.

use serde::{Deserialize, Serialize};

use crate::cluster::singleton::SingletonMsg;
use crate::delivery::sharding::driver::ToProducer;
use crate::sharding::ShardingMsg;
use crate::sharding::entities::{EntityEnvelope, QueryReply};

/// Everything nodes send each other, for entities receiving `M`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum NodeMsg<M> {
    /// Singleton handover between the singleton managers.
    Singleton(SingletonMsg),
    /// Shard coordination, and messages on their way to entities.
    Sharding(ShardingMsg<EntityEnvelope<M>>),
    /// An entity's answer to the sending node's sharding producer (demand, confirmations).
    ToProducer(ToProducer),
    /// An entity's answer to a query for its snapshot.
    QueryReply(QueryReply),
    /// "Which shards do you host?", for `/cluster`; answered with [`NodeMsg::ShardsReply`].
    ShardsRequest {
        /// The asker's key for the answer.
        request: u64,
    },
    /// The shards the answering node hosts.
    ShardsReply {
        /// The asker's key.
        request: u64,
        /// Shard numbers hosted there.
        shards: Vec<u32>,
    },
}
