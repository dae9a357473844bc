//! Reliable delivery to sharded entities: the ShardingProducerController ([`producer`]) sends
//! to any entity through one child ProducerController per entity, and the
//! ShardingConsumerController ([`consumer`]) is the consumer side of an entity, with one
//! ConsumerController per producer. Where an entity lives is sharding's business; these cores
//! only name entities.

pub mod consumer;
pub mod driver;
pub mod producer;

pub use consumer::ShardingConsumerController;
pub use producer::{ShardingProducerController, ShardingProducerError, ShardingProducerEvent};

#[cfg(test)]
mod tests;
