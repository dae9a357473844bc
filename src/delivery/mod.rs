//! Akka-style reliable delivery between a producer and a consumer: sequence numbers, a
//! flow-control window, resending of lost messages, deduplication and confirmation
//! (docs/protocol.md).
//!
//! The controllers are sans-IO state machines; whoever owns one moves its frames over a link
//! (in-process channels, TCP, or a fault-injecting link in tests) and feeds it the time. Only
//! the producer↔consumer link may lose, duplicate or reorder frames; a producer and its
//! controller, and a consumer and its controller, are assumed to talk losslessly.

pub(crate) mod child_timers;
pub mod codec;
pub mod consumer;
pub mod driver;
pub mod durable;
pub mod producer;
pub mod protocol;
pub mod settings;
pub mod sharding;
pub mod work_pulling;

pub use codec::{Codec, CodecError, JsonCodec};
pub use consumer::{ConsumerController, ConsumerError, ConsumerEvent, Delivery};
pub use durable::{DurableProducerQueue, DurableState, MessageSent, StoreError};
pub use producer::{ProducerController, ProducerError, ProducerEvent};
pub use protocol::{
    Chunk, ConsumerFrame, Payload, ProducerId, ProducerRef, SeqNr, SequencedMessage,
};
pub use settings::{
    ConsumerSettings, DeliverySettings, ProducerSettings, ShardingProducerSettings,
    ShardingSettings, WorkPullingProducerSettings, WorkPullingSettings,
};
