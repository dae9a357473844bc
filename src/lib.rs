//! Warren bridges a durable RabbitMQ queue into stateful entities with Akka-style reliable
//! delivery: each message reaches the one entity it belongs to, at least once, in order per
//! entity, and RabbitMQ is acked only after that entity confirmed.
//!
//! # Start here
//!
//! What a user writes, all re-exported at the crate root:
//! - an entity type: [`Entity`] (and [`EntityMessage`] for what it receives, [`EntityFactory`]
//!   to make one per id), storing what must survive in an [`entity::store::EntityStore`];
//! - a node: [`ClusterNode::start_with_singletons`] with [`ClusterSettings`] and
//!   [`DeliverySettings`], the entities' retries from [`BridgeSettings::runner`];
//! - the bridge from a queue into the entities: [`bridge_singletons`], one per partition
//!   queue, run by the node on members with the [`BRIDGE_ROLE`].
//!
//! `examples/ledger.rs` does all three for bank accounts; `docs/protocol.md` describes the
//! protocol underneath.
//!
//! # Layers
//!
//! Each module uses only the ones below it (`tests/layering.rs` checks it): [`node`] composes
//! everything; [`bridge`] (the stream stage) sits on [`metrics`], [`sharding`] (where entities
//! run) and [`entity`]; below them [`delivery`] (the protocol), [`cluster`] (membership, links,
//! singletons) and [`amqp`] (the broker), which know nothing of each other; below them
//! [`telemetry`] (logs and traces) and [`postgres`] (reaching the database as libpq would), and
//! at the bottom [`ids`], [`config`], [`series`], [`tls`] (PEM files, verifiers) and small
//! helpers. [`order`] is the message
//! contract of the two binaries.

#![warn(missing_docs, unreachable_pub)]

pub mod amqp;
pub mod backoff;
pub mod bridge;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod entity;
mod eviction;
pub mod ids;
pub mod metrics;
pub mod node;
pub mod order;
pub mod postgres;
pub mod series;
pub mod sharding;
pub mod shutdown;
pub mod telemetry;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
mod timer;
pub mod tls;

pub use amqp::{AmqpSettings, SourceSettings};
pub use bridge::{BRIDGE_ROLE, BridgeSettings, bridge_singleton_name, bridge_singletons};
pub use cluster::singleton::driver::SingletonSpec;
pub use delivery::DeliverySettings;
pub use delivery::sharding::driver::{AskError, AskOutcome, ShardingProducerHandle};
pub use entity::{
    Entity, EntityError, EntityFactory, EntityMessage, InvalidMessage, RunnerSettings,
};
pub use ids::{EntityId, NodeAddr, NodeId};
pub use metrics::Metrics;
pub use node::{ClusterNode, ClusterSettings, NodeError};
