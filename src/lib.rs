//! Warren bridges a durable RabbitMQ queue into stateful entities with Akka-style reliable
//! delivery: each message reaches the one entity it belongs to, at least once, in order per
//! entity, and RabbitMQ is acked only after that entity confirmed.

pub mod config;
pub mod delivery;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
