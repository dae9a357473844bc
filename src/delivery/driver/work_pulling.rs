//! The task that runs a [`WorkPullingProducerController`] core, and where it finds workers: a
//! [`WorkerRegistry`] (in-process here; cluster membership provides one later). A worker is an
//! ordinary ConsumerController task whose frames go to this task's inbox.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rand::Rng;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::warn;

use crate::delivery::driver::consumer::{ConsumerBuilder, ConsumerHandle};
use crate::delivery::driver::link::{ChannelLink, channel_link};
use crate::delivery::driver::producer::ConsumerLink;
use crate::delivery::driver::store::{self, NoQueue, StoreOp};
use crate::delivery::driver::{DeliveryError, FromConsumer, LINK_CAPACITY};
use crate::delivery::durable::{DurableProducerQueue, StoreClient};
use crate::delivery::protocol::ProducerId;
use crate::delivery::settings::{DeliverySettings, ProducerSettings};
use crate::delivery::work_pulling::{WorkPullingEvent, WorkPullingProducerController};
use crate::timer::sleep_until;

/// Names a registered worker.
pub type WorkerId = u64;

/// The workers known now, each with the link that reaches it.
pub type Workers<M> = BTreeMap<WorkerId, ConsumerLink<M>>;

/// Where a work-pulling producer finds its workers.
pub trait WorkerRegistry<M>: Send + Sync + 'static {
    /// The current workers, updated as they come and go.
    fn subscribe(&self) -> watch::Receiver<Workers<M>>;
}

/// Workers in this process.
pub struct LocalWorkerRegistry<M> {
    workers: Arc<watch::Sender<Workers<M>>>,
    next_id: Arc<AtomicU64>,
}

impl<M> Clone for LocalWorkerRegistry<M> {
    fn clone(&self) -> Self {
        LocalWorkerRegistry {
            workers: Arc::clone(&self.workers),
            next_id: Arc::clone(&self.next_id),
        }
    }
}

impl<M> Default for LocalWorkerRegistry<M> {
    fn default() -> Self {
        LocalWorkerRegistry {
            workers: Arc::new(watch::channel(BTreeMap::new()).0),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }
}

/// A worker's place in a registry; dropping it deregisters the worker.
pub struct WorkerRegistration<M> {
    id: WorkerId,
    workers: Arc<watch::Sender<Workers<M>>>,
}

impl<M> WorkerRegistration<M> {
    /// The worker's id.
    pub fn id(&self) -> WorkerId {
        self.id
    }
}

impl<M> Drop for WorkerRegistration<M> {
    fn drop(&mut self) {
        self.workers.send_modify(|workers| {
            workers.remove(&self.id);
        });
    }
}

impl<M: Send + Sync + 'static> LocalWorkerRegistry<M> {
    /// Adds a worker reachable over `link`.
    pub fn register(&self, link: ConsumerLink<M>) -> WorkerRegistration<M> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.workers.send_modify(|workers| {
            workers.insert(id, link);
        });
        WorkerRegistration {
            id,
            workers: Arc::clone(&self.workers),
        }
    }

    /// Starts a worker (a ConsumerController task) that talks to the producer whose inbox is
    /// `producer`, and registers it.
    pub fn spawn_worker(
        &self,
        producer: ChannelLink<FromConsumer<M>>,
        consumer: ConsumerBuilder<M>,
    ) -> (ConsumerHandle<M>, WorkerRegistration<M>)
    where
        M: Clone,
    {
        let (link, inbox) = channel_link(LINK_CAPACITY);
        let handle = consumer
            .producer(Arc::new(producer))
            .start(inbox, link.clone());
        let registration = self.register(Arc::new(link));
        (handle, registration)
    }
}

impl<M: Send + Sync + 'static> WorkerRegistry<M> for LocalWorkerRegistry<M> {
    fn subscribe(&self) -> watch::Receiver<Workers<M>> {
        self.workers.subscribe()
    }
}

enum Command<M> {
    Send {
        message: M,
        confirm: Option<oneshot::Sender<()>>,
    },
    Close(oneshot::Sender<()>),
}

/// The producer's side of a work-pulling task; cheap to clone. Dropping every clone stops the
/// controller at once (what is unconfirmed then survives only in a durable queue);
/// [`Self::close`] waits for the confirmations first.
pub struct WorkPullingHandle<M> {
    commands: mpsc::Sender<Command<M>>,
    demand: Arc<Semaphore>,
    failure: watch::Receiver<Option<DeliveryError>>,
    workers: watch::Receiver<usize>,
}

impl<M> Clone for WorkPullingHandle<M> {
    fn clone(&self) -> Self {
        WorkPullingHandle {
            commands: self.commands.clone(),
            demand: Arc::clone(&self.demand),
            failure: self.failure.clone(),
            workers: self.workers.clone(),
        }
    }
}

impl<M: Send + 'static> WorkPullingHandle<M> {
    /// Waits for demand, then hands `message` over to be routed to some worker.
    pub async fn send(&self, message: M) -> Result<(), DeliveryError> {
        self.acquire().await?;
        self.commands
            .send(Command::Send {
                message,
                confirm: None,
            })
            .await
            .map_err(|_| self.stopped())
    }

    /// Like [`Self::send`], then waits until a worker confirmed it (or it is stored, with a
    /// durable queue).
    pub async fn ask(&self, message: M) -> Result<(), DeliveryError> {
        self.acquire().await?;
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

    /// Stops taking messages (from every clone), waits until workers confirmed everything
    /// handed over, then stops the controller. Bound it with a timeout if workers may be gone.
    pub async fn close(self) -> Result<(), DeliveryError> {
        let (done, closed) = oneshot::channel();
        self.commands
            .send(Command::Close(done))
            .await
            .map_err(|_| self.stopped())?;
        closed.await.map_err(|_| self.stopped())
    }

    /// Workers known to the controller now (Akka's `GetWorkerStats`).
    pub fn worker_count(&self) -> usize {
        *self.workers.borrow()
    }

    /// Waits until the controller knows `count` workers.
    pub async fn wait_for_workers(&mut self, count: usize) -> Result<(), DeliveryError> {
        self.workers
            .wait_for(|n| *n == count)
            .await
            .map(|_| ())
            .map_err(|_| DeliveryError::Stopped)
    }

    async fn acquire(&self) -> Result<(), DeliveryError> {
        let permit = self.demand.acquire().await.map_err(|_| self.stopped())?;
        permit.forget();
        Ok(())
    }

    fn stopped(&self) -> DeliveryError {
        self.failure
            .borrow()
            .clone()
            .unwrap_or(DeliveryError::Stopped)
    }
}

/// Builds and starts a work-pulling task.
pub struct WorkPullingBuilder {
    producer_id: ProducerId,
    settings: ProducerSettings,
    buffer_size: usize,
}

impl WorkPullingBuilder {
    /// A work-pulling producer named `producer_id`; Akka's default buffer of 1000.
    pub fn new(producer_id: ProducerId) -> Self {
        WorkPullingBuilder {
            producer_id,
            settings: ProducerSettings::default(),
            buffer_size: 1000,
        }
    }

    /// The `[delivery]` settings: the child controllers' and the buffer size.
    pub fn delivery_settings(mut self, delivery: &DeliverySettings) -> Self {
        self.settings = delivery.producer_controller.clone();
        self.buffer_size = delivery.work_pulling.producer_controller.buffer_size;
        self
    }

    /// The child controllers' settings (chunking must stay off).
    pub fn settings(mut self, settings: ProducerSettings) -> Self {
        self.settings = settings;
        self
    }

    /// Most messages waiting for a worker before a new one fails the controller.
    pub fn buffer_size(mut self, buffer_size: usize) -> Self {
        self.buffer_size = buffer_size;
        self
    }

    /// Starts the task without a durable queue; workers' frames arrive on `inbox`.
    pub fn spawn<M: Clone + Send + Sync + 'static>(
        self,
        inbox: mpsc::Receiver<FromConsumer<M>>,
        registry: &impl WorkerRegistry<M>,
    ) -> Result<WorkPullingHandle<M>, DeliveryError> {
        self.start(inbox, registry, None::<NoQueue>)
    }

    /// Starts the task with a durable queue.
    pub fn spawn_durable<M: Clone + Send + Sync + 'static, Q: DurableProducerQueue<M>>(
        self,
        inbox: mpsc::Receiver<FromConsumer<M>>,
        registry: &impl WorkerRegistry<M>,
        queue: Q,
    ) -> Result<WorkPullingHandle<M>, DeliveryError> {
        self.start(inbox, registry, Some(queue))
    }

    fn start<M: Clone + Send + Sync + 'static, Q: DurableProducerQueue<M>>(
        self,
        inbox: mpsc::Receiver<FromConsumer<M>>,
        registry: &impl WorkerRegistry<M>,
        queue: Option<Q>,
    ) -> Result<WorkPullingHandle<M>, DeliveryError> {
        let seed = rand::rng().random();
        let build = if queue.is_some() {
            WorkPullingProducerController::with_durable_queue
        } else {
            WorkPullingProducerController::new
        };
        let mut core = build(
            self.producer_id,
            self.settings.clone(),
            self.buffer_size,
            seed,
        )
        .map_err(DeliveryError::WorkPulling)?;
        core.start(Instant::now());
        let (commands, commands_rx) = mpsc::channel(1);
        let demand = Arc::new(Semaphore::new(0));
        let (failure_tx, failure) = watch::channel(None);
        let (workers_tx, workers) = watch::channel(0);
        let cleanup = store::CleanupSchedule::new(
            queue.is_some(),
            self.settings.durable_queue.cleanup_unused_after,
            Instant::now(),
        );
        let task = WorkPullingTask {
            core,
            cleanup,
            closing: Vec::new(),
            settings: self.settings,
            links: BTreeMap::new(),
            queue: queue.map(Arc::new),
            demand: Arc::clone(&demand),
            failure: failure_tx,
            worker_count: workers_tx,
            store_ops: FuturesUnordered::new(),
        };
        tokio::spawn(task.run(commands_rx, inbox, registry.subscribe()));
        Ok(WorkPullingHandle {
            commands,
            demand,
            failure,
            workers,
        })
    }
}

struct WorkPullingTask<M, Q> {
    core: WorkPullingProducerController<M, oneshot::Sender<()>, WorkerId>,
    settings: ProducerSettings,
    links: Workers<M>,
    queue: Option<Arc<Q>>,
    demand: Arc<Semaphore>,
    failure: watch::Sender<Option<DeliveryError>>,
    worker_count: watch::Sender<usize>,
    store_ops: FuturesUnordered<StoreOp<M>>,
    cleanup: store::CleanupSchedule,
    /// Who waits in [`WorkPullingHandle::close`]; answered once everything is confirmed.
    closing: Vec<oneshot::Sender<()>>,
}

impl<M: Clone + Send + Sync + 'static, Q: DurableProducerQueue<M>> WorkPullingTask<M, Q> {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command<M>>,
        mut inbox: mpsc::Receiver<FromConsumer<M>>,
        mut workers: watch::Receiver<Workers<M>>,
    ) {
        self.on_workers(&workers.borrow_and_update().clone());
        self.drain();
        let mut registry_open = true;
        let mut commands_open = true;
        loop {
            let wake_at = [self.core.poll_timeout(), self.cleanup.next()]
                .into_iter()
                .flatten()
                .min();
            tokio::select! {
                command = commands.recv(), if commands_open => match command {
                    Some(Command::Send { message, confirm }) => {
                        let now = Instant::now();
                        let _ = match confirm {
                            Some(confirm) => self.core.send_with_confirmation(message, confirm, now),
                            None => self.core.send(message, now),
                        };
                    }
                    Some(Command::Close(done)) => {
                        self.demand.close();
                        self.closing.push(done);
                    }
                    // Every handle is gone: nothing more will be sent.
                    None if self.closing.is_empty() => break,
                    None => commands_open = false,
                },
                Some(frame) = inbox.recv() => {
                    self.core.handle_frame(&frame.to, frame.frame, Instant::now());
                }
                changed = workers.changed(), if registry_open => match changed {
                    Ok(()) => {
                        let current = workers.borrow_and_update().clone();
                        self.on_workers(&current);
                    }
                    // The registry is gone: keep the workers we have.
                    Err(_) => registry_open = false,
                },
                Some(outcome) = self.store_ops.next(), if !self.store_ops.is_empty() => {
                    store::apply(&mut self.core, outcome);
                }
                _ = sleep_until(wake_at) => self.on_timeout(),
            }
            self.drain();
            if let Some(error) = self.core.failure() {
                warn!(%error, "work-pulling producer controller failed");
                let _ = self
                    .failure
                    .send(Some(DeliveryError::WorkPulling(error.clone())));
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

    fn on_timeout(&mut self) {
        let now = Instant::now();
        self.core.handle_timeout(now);
        if let Some(cleanup) = self.cleanup.due(self.queue.as_ref(), now) {
            self.store_ops.push(cleanup);
        }
    }

    fn on_workers(&mut self, current: &Workers<M>) {
        self.links = current.clone();
        self.core
            .workers_changed(current.keys().copied(), Instant::now());
        let _ = self.worker_count.send(self.core.worker_count());
    }

    fn drain(&mut self) {
        while let Some((worker, message)) = self.core.poll_transmit() {
            if let Some(link) = self.links.get(&worker) {
                link.send(message);
            }
        }
        while let Some(event) = self.core.poll_event() {
            match event {
                WorkPullingEvent::RequestNext => self.demand.add_permits(1),
                WorkPullingEvent::Confirmed { token } => {
                    let _ = token.send(());
                }
            }
        }
        while let Some(request) = self.core.poll_store() {
            if let Some(queue) = &self.queue {
                self.store_ops.push(store::store_op(
                    queue,
                    request,
                    &self.settings.durable_queue,
                ));
            }
        }
    }
}
