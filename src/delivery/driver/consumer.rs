//! The task that runs a [`ConsumerController`] core: it hands deliveries to the consumer
//! through a [`ConsumerHandle`] one at a time, takes its confirmations, and talks to the
//! producer over a [`Link`].

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::delivery::codec::Codec;
use crate::delivery::consumer::{ConsumerController, ConsumerError, ConsumerEvent, Delivery};
use crate::delivery::driver::link::{ChannelLink, Link};
use crate::delivery::driver::{FromConsumer, sleep_until};
use crate::delivery::protocol::{ConsumerFrame, ProducerRef, SequencedMessage};
use crate::delivery::settings::ConsumerSettings;

/// Where a consumer's frames go.
pub type ProducerLink<M> = Arc<dyn Link<FromConsumer<M>>>;

enum Command<M> {
    Confirm,
    RegisterToProducer(ProducerRef, ProducerLink<M>),
    DeliverThenStop,
}

/// The consumer's side of a ConsumerController task.
pub struct ConsumerHandle<M> {
    deliveries: mpsc::Receiver<Delivery<M>>,
    // Unbounded: the protocol allows one delivery outstanding, so at most one Confirm, plus
    // the rare register or stop command, can wait here.
    commands: mpsc::UnboundedSender<Command<M>>,
    stopped: mpsc::Receiver<Option<ConsumerError>>,
}

impl<M: Send + 'static> ConsumerHandle<M> {
    /// The next message, in order; `None` once the controller stopped. Confirm it before the
    /// next one comes.
    pub async fn next(&mut self) -> Option<Delivery<M>> {
        self.deliveries.recv().await
    }

    /// The outstanding delivery is processed (Akka's `Confirmed`).
    pub fn confirm(&self) {
        let _ = self.commands.send(Command::Confirm);
    }

    /// Connects to `producer`, whose frames arrive over `link` (Akka's
    /// `RegisterToProducerController`); retried until its first message arrives.
    pub fn register_to_producer(&self, producer: ProducerRef, link: ProducerLink<M>) {
        let _ = self
            .commands
            .send(Command::RegisterToProducer(producer, link));
    }

    /// Stops once everything received so far is delivered and confirmed.
    pub fn deliver_then_stop(&self) {
        let _ = self.commands.send(Command::DeliverThenStop);
    }

    /// Waits until the controller stopped; returns why, if it failed.
    pub async fn stopped(&mut self) -> Option<ConsumerError> {
        self.stopped.recv().await.flatten()
    }
}

/// Builds and starts a ConsumerController task.
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

    /// Starts the task; producers' messages arrive on `inbox`, whose sending side is `me`
    /// (passed along with RegisterConsumer so the producer can answer).
    pub fn spawn(
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
        let (deliveries_tx, deliveries) = mpsc::channel(2);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (stopped_tx, stopped) = mpsc::channel(1);
        let task = ConsumerTask {
            core,
            producer: self.producer,
            me: Arc::new(me),
            deliveries: deliveries_tx,
        };
        tokio::spawn(async move {
            let failure = task.run(inbox, commands_rx).await;
            let _ = stopped_tx.send(failure).await;
        });
        ConsumerHandle {
            deliveries,
            commands,
            stopped,
        }
    }
}

struct ConsumerTask<M> {
    core: ConsumerController<M>,
    producer: Option<ProducerLink<M>>,
    me: Arc<ChannelLink<SequencedMessage<M>>>,
    deliveries: mpsc::Sender<Delivery<M>>,
}

impl<M: Clone + Send + Sync + 'static> ConsumerTask<M> {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<SequencedMessage<M>>,
        mut commands: mpsc::UnboundedReceiver<Command<M>>,
    ) -> Option<ConsumerError> {
        loop {
            if self.drain() {
                return self.core.failure().cloned();
            }
            tokio::select! {
                Some(message) = inbox.recv() => self.core.handle_message(message, Instant::now()),
                command = commands.recv() => {
                    let now = Instant::now();
                    match command {
                        Some(Command::Confirm) => {
                            let _ = self.core.confirm(now);
                        }
                        Some(Command::RegisterToProducer(producer, link)) => {
                            self.producer = Some(link);
                            self.core.register_to_producer(producer, now);
                        }
                        Some(Command::DeliverThenStop) => self.core.deliver_then_stop(),
                        // The consumer is gone (Akka: consumer terminated).
                        None => self.core.stop(),
                    }
                }
                _ = sleep_until(self.core.poll_timeout()) => self.core.handle_timeout(Instant::now()),
            }
        }
    }

    /// Moves the core's outputs; returns true once it stopped.
    fn drain(&mut self) -> bool {
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
        let mut stopped = false;
        while let Some(event) = self.core.poll_event() {
            match event {
                ConsumerEvent::Deliver(delivery) => {
                    // Room for one outstanding delivery and one redelivery to a restarted
                    // consumer; more would be a protocol bug.
                    let _ = self.deliveries.try_send(delivery);
                }
                ConsumerEvent::Stopped => stopped = true,
            }
        }
        stopped
    }
}
