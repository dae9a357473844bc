//! The task that runs a [`ProducerController`] core: it takes the producer's messages through a
//! [`ProducerHandle`], sends frames over a [`Link`], feeds back the consumer's frames, runs the
//! durable queue's requests with timeouts, and fires the core's timers.

use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::Rng;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::warn;

use crate::delivery::codec::Codec;
use crate::delivery::driver::link::Link;
use crate::delivery::driver::store::{self, NoQueue, StoreOp};
use crate::delivery::driver::{DeliveryError, FromConsumer};
use crate::delivery::durable::{DurableProducerQueue, StoreClient, StoreRequest};
use crate::delivery::producer::{ProducerController, ProducerEvent};
use crate::delivery::protocol::{ProducerId, ProducerRef, SeqNr, SequencedMessage};
use crate::delivery::settings::ProducerSettings;
use crate::timer::sleep_until;

/// Where a producer's frames go.
pub type ConsumerLink<M> = Arc<dyn Link<SequencedMessage<M>>>;

enum Command<M> {
    Send {
        message: M,
        confirm: Option<oneshot::Sender<SeqNr>>,
    },
    RegisterConsumer(ConsumerLink<M>),
    Close(oneshot::Sender<()>),
}

/// The producer's side of a ProducerController task: cheap to clone; every clone sends into
/// the same stream.
///
/// Dropping every clone stops the controller at once: what it has not had confirmed then
/// survives only in a durable queue. [`Self::close`] waits for the confirmations first.
pub struct ProducerHandle<M> {
    commands: mpsc::Sender<Command<M>>,
    demand: Arc<Semaphore>,
    producer: ProducerRef,
    failure: watch::Receiver<Option<DeliveryError>>,
}

impl<M> Clone for ProducerHandle<M> {
    fn clone(&self) -> Self {
        ProducerHandle {
            commands: self.commands.clone(),
            demand: Arc::clone(&self.demand),
            producer: self.producer.clone(),
            failure: self.failure.clone(),
        }
    }
}

impl<M: Send + 'static> ProducerHandle<M> {
    /// The controller's identity (what a consumer registers to).
    pub fn producer_ref(&self) -> &ProducerRef {
        &self.producer
    }

    /// Waits for demand (Akka's `RequestNext`), then sends `message`. Delivery is reliable
    /// from here on while the controller runs; use [`Self::ask`] to learn when it is
    /// confirmed, or [`Self::close`] to stop only once everything is.
    pub async fn send(&self, message: M) -> Result<(), DeliveryError> {
        self.acquire_demand().await?;
        self.commands
            .send(Command::Send {
                message,
                confirm: None,
            })
            .await
            .map_err(|_| self.stopped())
    }

    /// Like [`Self::send`], then waits until the message is confirmed: processed by the
    /// consumer, or stored when the controller has a durable queue. Returns its sequence number.
    pub async fn ask(&self, message: M) -> Result<SeqNr, DeliveryError> {
        self.acquire_demand().await?;
        let (confirm, confirmed) = oneshot::channel();
        self.commands
            .send(Command::Send {
                message,
                confirm: Some(confirm),
            })
            .await
            .map_err(|_| self.stopped())?;
        confirmed.await.map_err(|_| self.stopped())
    }

    /// Sends to a (new) consumer from now on (Akka's `RegisterConsumer`): unconfirmed messages
    /// are sent to it, the first marked `first`.
    pub async fn register_consumer(&self, consumer: ConsumerLink<M>) -> Result<(), DeliveryError> {
        self.commands
            .send(Command::RegisterConsumer(consumer))
            .await
            .map_err(|_| self.stopped())
    }

    /// Stops taking messages (from every clone), waits until everything sent is confirmed,
    /// makes the durable queue's write-behind confirmations durable, then stops the
    /// controller. Bound it with a timeout if the consumer may be gone.
    pub async fn close(self) -> Result<(), DeliveryError> {
        let (done, closed) = oneshot::channel();
        self.commands
            .send(Command::Close(done))
            .await
            .map_err(|_| self.stopped())?;
        closed.await.map_err(|_| self.stopped())
    }

    /// Why the controller stopped, if it did.
    pub fn failure(&self) -> Option<DeliveryError> {
        self.failure.borrow().clone()
    }

    async fn acquire_demand(&self) -> Result<(), DeliveryError> {
        let permit = self.demand.acquire().await.map_err(|_| self.stopped())?;
        // One RequestNext permits one message.
        permit.forget();
        Ok(())
    }

    fn stopped(&self) -> DeliveryError {
        self.failure().unwrap_or(DeliveryError::Stopped)
    }
}

/// Builds and starts a ProducerController task.
pub struct ProducerBuilder<M> {
    producer_id: ProducerId,
    settings: ProducerSettings,
    codec: Option<Arc<dyn Codec<M>>>,
    consumer: Option<ConsumerLink<M>>,
    incarnation: Option<u64>,
}

impl<M: Clone + Send + Sync + 'static> ProducerBuilder<M> {
    /// A producer stream named `producer_id`, with default settings.
    pub fn new(producer_id: ProducerId) -> Self {
        ProducerBuilder {
            producer_id,
            settings: ProducerSettings::default(),
            codec: None,
            consumer: None,
            incarnation: None,
        }
    }

    /// Protocol settings.
    pub fn settings(mut self, settings: ProducerSettings) -> Self {
        self.settings = settings;
        self
    }

    /// The codec for chunking (used when `chunk_large_messages` is set).
    pub fn codec(mut self, codec: Arc<dyn Codec<M>>) -> Self {
        self.codec = Some(codec);
        self
    }

    /// The consumer to send to from the start; without one the controller waits for a
    /// `RegisterConsumer` (from the handle, or from a consumer over the link).
    pub fn consumer(mut self, consumer: ConsumerLink<M>) -> Self {
        self.consumer = Some(consumer);
        self
    }

    /// Fixes the incarnation (tests); by default it is random.
    pub fn incarnation(mut self, incarnation: u64) -> Self {
        self.incarnation = Some(incarnation);
        self
    }

    /// Starts the task without a durable queue; consumer frames arrive on `inbox`.
    pub fn spawn(self, inbox: mpsc::Receiver<FromConsumer<M>>) -> ProducerHandle<M> {
        self.start(inbox, None::<NoQueue>)
    }

    /// Starts the task with a durable queue: it loads the stored state first and resends what
    /// was not confirmed.
    pub fn spawn_durable<Q: DurableProducerQueue<M>>(
        self,
        inbox: mpsc::Receiver<FromConsumer<M>>,
        queue: Q,
    ) -> ProducerHandle<M> {
        self.start(inbox, Some(queue))
    }

    fn start<Q: DurableProducerQueue<M>>(
        self,
        inbox: mpsc::Receiver<FromConsumer<M>>,
        queue: Option<Q>,
    ) -> ProducerHandle<M> {
        let incarnation = self.incarnation.unwrap_or_else(|| rand::rng().random());
        let mut core = if queue.is_some() {
            ProducerController::with_durable_queue(
                self.producer_id,
                incarnation,
                self.settings.clone(),
            )
        } else {
            ProducerController::new(self.producer_id, incarnation, self.settings.clone())
        };
        if let Some(codec) = self.codec {
            core = core.with_codec(codec);
        }
        let producer = core.producer_ref().clone();
        let now = Instant::now();
        core.start(now);
        if self.consumer.is_some() {
            core.register_consumer(now);
        }
        // Sends are bounded by demand permits (at most a flow-control window), not by this.
        let (commands, commands_rx) = mpsc::channel(64);
        let demand = Arc::new(Semaphore::new(0));
        let (failure_tx, failure) = watch::channel(None);
        let cleanup = store::CleanupSchedule::new(
            queue.is_some(),
            self.settings.durable_queue.cleanup_unused_after,
            now,
        );
        let task = ProducerTask {
            core,
            settings: self.settings,
            consumer: self.consumer,
            queue: queue.map(Arc::new),
            demand: Arc::clone(&demand),
            failure: failure_tx,
            store_ops: FuturesUnordered::new(),
            cleanup,
            granted_through: SeqNr::ZERO,
            closing: Vec::new(),
        };
        tokio::spawn(task.run(commands_rx, inbox));
        ProducerHandle {
            commands,
            demand,
            producer,
            failure,
        }
    }
}

struct ProducerTask<M, Q> {
    core: ProducerController<M, oneshot::Sender<SeqNr>>,
    settings: ProducerSettings,
    consumer: Option<ConsumerLink<M>>,
    queue: Option<Arc<Q>>,
    demand: Arc<Semaphore>,
    failure: watch::Sender<Option<DeliveryError>>,
    store_ops: FuturesUnordered<StoreOp<M>>,
    cleanup: store::CleanupSchedule,
    /// Highest sequence number the producer holds a permit for (whole-window granting).
    granted_through: SeqNr,
    /// Who waits in [`ProducerHandle::close`]; answered once everything is confirmed.
    closing: Vec<oneshot::Sender<()>>,
}

impl<M: Clone + Send + Sync + 'static, Q: DurableProducerQueue<M>> ProducerTask<M, Q> {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command<M>>,
        mut inbox: mpsc::Receiver<FromConsumer<M>>,
    ) {
        self.drain();
        let mut commands_open = true;
        loop {
            let wake_at = [self.core.poll_timeout(), self.cleanup.next()]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                command = commands.recv(), if commands_open => match command {
                    Some(command) => {
                        self.on_command(command);
                        // Take what else is already queued before draining once.
                        while let Ok(command) = commands.try_recv() {
                            self.on_command(command);
                        }
                    }
                    // Every handle is gone: nothing more will be sent.
                    None if self.closing.is_empty() => break,
                    None => commands_open = false,
                },
                Some(frame) = inbox.recv() => self.on_frame(frame),
                Some(outcome) = self.store_ops.next(), if !self.store_ops.is_empty() => {
                    store::apply(&mut self.core, outcome);
                }
                _ = sleep_until(wake_at) => self.on_timeout(),
            }
            self.drain();
            if let Some(error) = self.core.failure() {
                warn!(producer = %self.core.producer_ref().id, %error, "producer controller failed");
                let _ = self
                    .failure
                    .send(Some(DeliveryError::Failed(error.clone())));
                self.demand.close();
                self.closing.clear();
                break;
            }
            if !self.closing.is_empty() && self.core.is_settled() {
                break;
            }
        }
        store::flush_at_stop(self.queue.as_deref()).await;
        for done in self.closing.drain(..) {
            let _ = done.send(());
        }
    }

    fn on_command(&mut self, command: Command<M>) {
        let now = Instant::now();
        match command {
            Command::Send { message, confirm } => {
                // An error fails the core; `drain` reports it.
                let _ = match confirm {
                    Some(confirm) => self.core.send_with_confirmation(message, confirm, now),
                    None => self.core.send(message, now),
                };
            }
            Command::RegisterConsumer(consumer) => {
                self.consumer = Some(consumer);
                self.core.register_consumer(now);
            }
            Command::Close(done) => {
                self.demand.close();
                self.closing.push(done);
            }
        }
    }

    fn on_frame(&mut self, frame: FromConsumer<M>) {
        // Frames for an earlier controller of this producer are not ours.
        if &frame.to != self.core.producer_ref() {
            return;
        }
        if let Some(reply_to) = frame.reply_to {
            self.consumer = Some(reply_to);
        }
        let _ = self.core.handle_frame(frame.frame, Instant::now());
    }

    fn on_timeout(&mut self) {
        let now = Instant::now();
        self.core.handle_timeout(now);
        if let Some(cleanup) = self.cleanup.due(self.queue.as_ref(), now) {
            self.store_ops.push(cleanup);
        }
    }

    /// Moves every output of the core to where it goes.
    fn drain(&mut self) {
        while let Some(message) = self.core.poll_transmit() {
            if let Some(consumer) = &self.consumer {
                consumer.send(message);
            }
        }
        let whole_window = self.core.grants_whole_window();
        while let Some(event) = self.core.poll_event() {
            match event {
                ProducerEvent::RequestNext { .. } if !whole_window => self.demand.add_permits(1),
                ProducerEvent::RequestNext { .. } => {}
                ProducerEvent::Confirmed { seq_nr, token } => {
                    let _ = token.send(seq_nr);
                }
            }
        }
        if whole_window && let Some(up_to) = self.core.requested_up_to() {
            // One permit per sequence number up to the window's end: the producer need not
            // wait for this task between messages.
            let first_ungranted = self
                .granted_through
                .max(self.core.current_seq_nr().minus(1));
            if let Some(more) = up_to.distance_from(first_ungranted).filter(|n| *n > 0) {
                self.demand.add_permits(more as usize);
                self.granted_through = up_to;
            }
        }
        while let Some(request) = self.core.poll_store() {
            self.run_store(request);
        }
    }

    fn run_store(&mut self, request: StoreRequest<M>) {
        if let Some(queue) = &self.queue {
            let op = store::store_op(queue, request, &self.settings.durable_queue);
            self.store_ops.push(op);
        }
    }
}
