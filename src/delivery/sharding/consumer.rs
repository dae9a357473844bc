//! The ShardingConsumerController core (Akka's, docs/protocol.md, "Sharding consumer controller"),
//! sans IO: the consumer side of one sharded entity. It keeps one ConsumerController per producer
//! (Akka keys them by producer id), so several producers, say one per node, can send to the same
//! entity; order and deduplication hold per producer. The entity gets a delivery from each producer
//! at a time and confirms each separately.
//!
//! Inputs: `handle_message`, `confirm`, `producer_gone`, `handle_timeout`. Outputs:
//! `poll_transmit` (frames for producers), `poll_event` (deliveries), `poll_timeout`.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;

use crate::delivery::codec::Codec;
use crate::delivery::consumer::{ConsumerController, ConsumerError, ConsumerEvent, Delivery};
use crate::delivery::protocol::{ConsumerFrame, ProducerId, ProducerRef, SequencedMessage};
use crate::delivery::settings::ConsumerSettings;

/// Sans-IO ShardingConsumerController for messages `M`.
pub struct ShardingConsumerController<M: 'static> {
    settings: ConsumerSettings,
    codec: Option<Arc<dyn Codec<M>>>,
    /// One controller per producer, in arrival order. A Vec, not a map: an entity has one
    /// or a few producers, and a B-tree's first node alone would hold room for eleven
    /// controllers (about 5 KiB) in every idle entity.
    controllers: Vec<(ProducerId, ConsumerController<M>)>,
    transmits: VecDeque<(ProducerRef, ConsumerFrame)>,
    events: VecDeque<Delivery<M>>,
}

impl<M: Clone + 'static> ShardingConsumerController<M> {
    /// A consumer side with these ConsumerController settings.
    pub fn new(settings: ConsumerSettings) -> Self {
        ShardingConsumerController {
            settings,
            codec: None,
            controllers: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Reassembles chunked messages with `codec`.
    pub fn with_codec(mut self, codec: Arc<dyn Codec<M>>) -> Self {
        self.codec = Some(codec);
        self
    }

    /// Producers this entity has a ConsumerController for.
    pub fn producers(&self) -> Vec<ProducerId> {
        self.controllers.iter().map(|(id, _)| id.clone()).collect()
    }

    /// A message from a producer; a producer seen for the first time gets its own controller.
    pub fn handle_message(&mut self, message: SequencedMessage<M>, now: Instant) {
        let index = match self
            .controllers
            .iter()
            .position(|(id, _)| *id == message.producer.id)
        {
            Some(index) => index,
            None => {
                tracing::debug!(producer = %message.producer.id, "starting a ConsumerController");
                let mut controller = ConsumerController::new(self.settings.clone(), now);
                if let Some(codec) = &self.codec {
                    controller = controller.with_codec(Arc::clone(codec));
                }
                controller.start(now);
                // Room for exactly one more: Vec would otherwise make room for four controllers.
                self.controllers.reserve_exact(1);
                self.controllers
                    .push((message.producer.id.clone(), controller));
                self.controllers.len() - 1
            }
        };
        self.controllers[index].1.handle_message(message, now);
        self.drain_at(index);
    }

    /// The entity processed the delivery it got from `producer`.
    pub fn confirm(&mut self, producer: &ProducerId, now: Instant) -> Result<(), ConsumerError> {
        let Some(controller) = self.controller(producer) else {
            return Err(ConsumerError::NothingToConfirm);
        };
        controller.confirm(now)?;
        self.drain(producer);
        Ok(())
    }

    /// The producer is gone (its node left or crashed): its controller delivers what it holds
    /// and stops (Akka: producer terminated → DeliverThenStop).
    pub fn producer_gone(&mut self, producer: &ProducerId) {
        if let Some(controller) = self.controller(producer) {
            controller.deliver_then_stop();
        }
        self.drain(producer);
    }

    /// Time passed: the controllers' retry timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due: Vec<ProducerId> = self
            .controllers
            .iter()
            .filter(|(_, c)| c.poll_timeout().is_some_and(|at| at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(controller) = self.controller(&id) {
                controller.handle_timeout(now);
            }
            self.drain(&id);
        }
    }

    /// The next frame for a producer.
    pub fn poll_transmit(&mut self) -> Option<(ProducerRef, ConsumerFrame)> {
        self.transmits.pop_front()
    }

    /// The next delivery for the entity.
    pub fn poll_event(&mut self) -> Option<Delivery<M>> {
        self.events.pop_front()
    }

    /// Every controller holds and owes nothing, and nothing waits to be polled.
    pub fn is_quiet(&self) -> bool {
        self.transmits.is_empty()
            && self.events.is_empty()
            && self.controllers.iter().all(|(_, c)| c.is_quiet())
    }

    /// When [`Self::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.controllers
            .iter()
            .filter_map(|(_, c)| c.poll_timeout())
            .min()
    }

    fn drain(&mut self, producer: &ProducerId) {
        if let Some(index) = self.controllers.iter().position(|(id, _)| id == producer) {
            self.drain_at(index);
        }
    }

    /// Moves the outputs of the controller at `index`; removes it once it stopped.
    fn drain_at(&mut self, index: usize) {
        let (producer, controller) = &mut self.controllers[index];
        while let Some(frame) = controller.poll_transmit() {
            self.transmits.push_back(frame);
        }
        let mut stopped = false;
        while let Some(event) = controller.poll_event() {
            match event {
                ConsumerEvent::Deliver(delivery) => self.events.push_back(delivery),
                ConsumerEvent::Stopped => stopped = true,
            }
        }
        if stopped {
            tracing::debug!(%producer, "ConsumerController stopped");
            self.controllers.remove(index);
        }
    }

    fn controller(&mut self, producer: &ProducerId) -> Option<&mut ConsumerController<M>> {
        self.controllers
            .iter_mut()
            .find(|(id, _)| id == producer)
            .map(|(_, c)| c)
    }
}
