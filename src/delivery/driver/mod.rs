//! Thin tokio drivers for the reliable-delivery cores: one task per controller, handles for the
//! producer and the consumer, and links between the two (in-process channels here; the cluster
//! transport and the fault-injecting link in tests implement the same [`Link`] trait).
//!
//! ```text
//! ProducerHandle ─send/ask─► [ProducerController task] ──SequencedMessage──► link ─┐
//!                                      ▲                                           │
//!                                      └── link ◄──FromConsumer (Request, Ack…)── [ConsumerController task] ─next/confirm─► ConsumerHandle
//! ```

pub mod consumer;
pub mod link;
pub mod producer;
pub mod store;
pub mod work_pulling;

use std::sync::Arc;

pub use consumer::{ConsumerBuilder, ConsumerHandle, ProducerLink};
pub use link::{ChannelLink, Faults, FaultyLink, Link, channel_link};
pub use producer::{ConsumerLink, ProducerBuilder, ProducerHandle};
pub use work_pulling::{
    LocalWorkerRegistry, WorkPullingBuilder, WorkPullingHandle, WorkerId, WorkerRegistration,
    WorkerRegistry,
};

use crate::delivery::producer::ProducerError;
use crate::delivery::protocol::{ConsumerFrame, ProducerRef, SequencedMessage};
use crate::delivery::work_pulling::WorkPullingError;

/// A frame from a ConsumerController, addressed to one ProducerController.
pub struct FromConsumer<M> {
    /// The controller it is for; others ignore it.
    pub to: ProducerRef,
    /// The frame.
    pub frame: ConsumerFrame,
    /// With `RegisterConsumer`: where the producer should send from now on.
    pub reply_to: Option<Arc<dyn Link<SequencedMessage<M>>>>,
}

impl<M> Clone for FromConsumer<M> {
    fn clone(&self) -> Self {
        FromConsumer {
            to: self.to.clone(),
            frame: self.frame,
            reply_to: self.reply_to.clone(),
        }
    }
}

/// Why a handle's call did not go through.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    /// The controller stopped on a protocol violation or a durable-queue failure.
    #[error("producer controller failed: {0}")]
    Failed(ProducerError),
    /// The work-pulling controller stopped on a full buffer, a durable-queue failure or a
    /// protocol violation.
    #[error("work-pulling producer controller failed: {0}")]
    WorkPulling(WorkPullingError),
    /// The controller's task is gone.
    #[error("controller stopped")]
    Stopped,
}

/// Room in an in-process link: a full flow-control window plus resends.
pub const LINK_CAPACITY: usize = 256;

/// A producer and a consumer connected in this process.
pub fn connect_in_process<M: Clone + Send + Sync + 'static>(
    producer: ProducerBuilder<M>,
    consumer: ConsumerBuilder<M>,
) -> (ProducerHandle<M>, ConsumerHandle<M>) {
    let (to_consumer, consumer_inbox) = channel_link(LINK_CAPACITY);
    let (to_producer, producer_inbox) = channel_link(LINK_CAPACITY);
    let producer = producer
        .consumer(Arc::new(to_consumer.clone()))
        .spawn(producer_inbox);
    let consumer = consumer
        .producer(Arc::new(to_producer))
        .start(consumer_inbox, to_consumer);
    (producer, consumer)
}

#[cfg(test)]
mod tests;
