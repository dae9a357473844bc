//! The consumer's side: a [`ConsumerHandle`] owns its [`ConsumerController`] core and drives it
//! from the consumer's own task. [`ConsumerHandle::next`] reads the link and fires timers
//! until a delivery is ready; [`ConsumerHandle::confirm`] sends the resulting frames at once.
//! There is no separate task, so no hand-off per message. Timers only run while the consumer
//! waits in `next`; while it processes, the core is waiting for a confirmation and retries
//! nothing anyway (Akka does the same).

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::delivery::codec::Codec;
use crate::delivery::consumer::{ConsumerController, ConsumerError, ConsumerEvent, Delivery};
use crate::delivery::driver::FromConsumer;
use crate::delivery::driver::link::{ChannelLink, Link};
use crate::delivery::protocol::{ConsumerFrame, ProducerRef, SequencedMessage};
use crate::delivery::settings::ConsumerSettings;
use crate::timer::sleep_until;

/// Where a consumer's frames go.
pub type ProducerLink<M> = Arc<dyn Link<FromConsumer<M>>>;

/// A ConsumerController and the consumer that uses it, in one place. The controller only
/// makes progress while the consumer calls [`Self::next`]: a producer waits for the consumer's
/// first poll before it sends more than its first message.
pub struct ConsumerHandle<M: 'static> {
    core: ConsumerController<M>,
    inbox: mpsc::Receiver<SequencedMessage<M>>,
    producer: Option<ProducerLink<M>>,
    me: Arc<ChannelLink<SequencedMessage<M>>>,
    stopped: bool,
}

impl<M: Clone + Send + Sync + 'static> ConsumerHandle<M> {
    /// The next message, in order; `None` once the controller stopped. Confirm it before
    /// asking for the next one.
    pub async fn next(&mut self) -> Option<Delivery<M>> {
        loop {
            self.send_frames();
            match self.core.poll_event() {
                Some(ConsumerEvent::Deliver(delivery)) => return Some(delivery),
                Some(ConsumerEvent::Stopped) => self.stopped = true,
                None => {}
            }
            if self.stopped {
                return None;
            }
            tokio::select! {
                message = self.inbox.recv() => match message {
                    Some(message) => {
                        self.core.handle_message(message, Instant::now());
                        // Take what else already arrived, without waiting.
                        while let Ok(message) = self.inbox.try_recv() {
                            self.core.handle_message(message, Instant::now());
                        }
                    }
                    // Every link to us is gone: nothing more can arrive.
                    None => self.core.stop(),
                },
                _ = sleep_until(self.core.poll_timeout()) => self.core.handle_timeout(Instant::now()),
            }
        }
    }

    /// The delivery last returned by [`Self::next`] is processed (Akka's `Confirmed`).
    pub fn confirm(&mut self) {
        let _ = self.core.confirm(Instant::now());
        self.send_frames();
    }

    /// Connects to `producer`, whose frames go over `link` (Akka's
    /// `RegisterToProducerController`); retried until its first message arrives.
    pub fn register_to_producer(&mut self, producer: ProducerRef, link: ProducerLink<M>) {
        self.producer = Some(link);
        self.core.register_to_producer(producer, Instant::now());
        self.send_frames();
    }

    /// Stops once everything received so far is delivered and confirmed; `next` then returns
    /// `None`.
    pub fn deliver_then_stop(&mut self) {
        self.core.deliver_then_stop();
        self.send_frames();
    }

    /// Why the controller stopped, when it stopped on an error.
    pub fn failure(&self) -> Option<&ConsumerError> {
        self.core.failure()
    }

    fn send_frames(&mut self) {
        while let Some((to, frame)) = self.core.poll_transmit() {
            let reply_to = matches!(frame, ConsumerFrame::RegisterConsumer)
                .then(|| Arc::clone(&self.me) as Arc<dyn Link<SequencedMessage<M>>>);
            if let Some(producer) = &self.producer {
                producer.send(FromConsumer {
                    to,
                    frame,
                    reply_to,
                });
            }
        }
    }
}

impl<M: 'static> Drop for ConsumerHandle<M> {
    /// The consumer is gone (Akka: consumer terminated): a last best-effort Ack.
    fn drop(&mut self) {
        self.core.stop();
        while let Some((to, frame)) = self.core.poll_transmit() {
            if let Some(producer) = &self.producer {
                producer.send(FromConsumer {
                    to,
                    frame,
                    reply_to: None,
                });
            }
        }
    }
}

/// Builds a ConsumerController and its handle.
pub struct ConsumerBuilder<M> {
    settings: ConsumerSettings,
    codec: Option<Arc<dyn Codec<M>>>,
    producer: Option<ProducerLink<M>>,
}

impl<M: Clone + Send + Sync + 'static> Default for ConsumerBuilder<M> {
    fn default() -> Self {
        ConsumerBuilder {
            settings: ConsumerSettings::default(),
            codec: None,
            producer: None,
        }
    }
}

impl<M: Clone + Send + Sync + 'static> ConsumerBuilder<M> {
    /// Protocol settings.
    pub fn settings(mut self, settings: ConsumerSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The codec to reassemble chunked messages.
    pub fn codec(mut self, codec: Arc<dyn Codec<M>>) -> Self {
        self.codec = Some(codec);
        self
    }

    /// Where frames for producers go (until a `register_to_producer` names another link).
    pub fn producer(mut self, producer: ProducerLink<M>) -> Self {
        self.producer = Some(producer);
        self
    }

    /// The handle; producers' messages arrive on `inbox`, whose sending side is `me` (passed
    /// along with RegisterConsumer so a producer can answer).
    pub fn start(
        self,
        inbox: mpsc::Receiver<SequencedMessage<M>>,
        me: ChannelLink<SequencedMessage<M>>,
    ) -> ConsumerHandle<M> {
        let now = Instant::now();
        let mut core = ConsumerController::new(self.settings, now);
        if let Some(codec) = self.codec {
            core = core.with_codec(codec);
        }
        // The handle is the consumer, and it exists from the start.
        core.start(now);
        ConsumerHandle {
            core,
            inbox,
            producer: self.producer,
            me: Arc::new(me),
            stopped: false,
        }
    }
}
