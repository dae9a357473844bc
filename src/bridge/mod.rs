//! The stream stage between RabbitMQ and the entities: delivery → decode → entity id → the
//! node's ShardingProducerController (reliable delivery to wherever the entity lives) → ack
//! once it confirmed. Malformed input is dead-lettered at once
//! with a reason; messages an entity gives up on are dead-lettered with its error; work is
//! bounded by `max_in_flight`, and acks are batched only over a contiguous confirmed prefix.

pub mod acks;
pub mod driver;
pub mod inflight;
mod journey;
pub mod redrive;
pub mod settings;
pub mod singleton;

pub use driver::{Bridge, BridgeError};
pub use settings::BridgeSettings;
pub use singleton::{BRIDGE_ROLE, BRIDGE_SINGLETON, bridge_singleton_name, bridge_singletons};
