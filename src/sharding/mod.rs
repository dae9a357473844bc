//! Cluster sharding: entities grouped into shards ([`shard`]), shards placed on nodes by a
//! coordinator that runs as a cluster singleton ([`coordinator`]), and a region on every node
//! that routes messages to wherever an entity lives and runs the entities of the shards it
//! hosts ([`region`]), each entity in a task that drives its reliable-delivery consumer side
//! ([`entities`]). [`messages`] is what they say to each other.

pub mod coordinator;
pub mod driver;
pub mod entities;
pub mod messages;
pub mod region;
pub mod shard;

pub use coordinator::{Coordinator, CoordinatorSettings};
pub use messages::ShardingMsg;
pub use region::{EntityCommand, Region, RegionSettings};
pub use shard::{ShardId, shard_of};

#[cfg(test)]
mod tests;
