//! Warren bridges a durable RabbitMQ queue into stateful entities with Akka-style reliable
//! delivery: each message reaches the one entity it belongs to, at least once, in order per
//! entity, and RabbitMQ is acked only after that entity confirmed.
//!
//! Layers, each using the ones below it: [`bridge`] (the stream stage) over [`entity`] (where
//! entities run) and [`amqp`] (the broker), all built on [`delivery`] (the protocol);
//! [`metrics`], [`config`] and [`telemetry`] serve every layer. [`order`] is the message
//! contract of the two binaries.

pub mod amqp;
pub mod backoff;
pub mod bridge;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod entity;
pub mod ids;
pub mod metrics;
pub mod node;
pub mod order;
pub mod series;
pub mod sharding;
pub mod shutdown;
pub mod telemetry;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
mod timer;
