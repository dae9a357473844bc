//! Tokio drivers for the sharding cores: a region task per node that owns the [`Region`] core
//! and runs the entities it hosts as tasks, and the coordinator as a cluster singleton whose
//! instance owns a [`Coordinator`] core. Both talk to other nodes through an [`Outbox`]; what
//! arrives for them is handed in by the node's router ([`RegionHandle::handle_remote`],
//! [`CoordinatorSlot::deliver`]).
//!
//! An entity task gets its messages on a channel and ends `Ok` once that channel is closed and
//! it has finished what it holds (a stop: passivation or hand-off), or `Err` when it failed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::cluster::context::NodeContext;
use crate::cluster::member::{ClusterView, NodeAddr};
use crate::cluster::metrics::ClusterMetrics;
use crate::cluster::singleton::driver::SingletonSpec;
use crate::cluster::transport::Outbox;
use crate::eviction::shrink_when_mostly_empty;
use crate::ids::EntityId;
use crate::sharding::coordinator::{Coordinator, CoordinatorSettings};
use crate::sharding::messages::{FromCoordinator, ShardingMsg, ToCoordinator};
use crate::sharding::region::{EntityCommand, Region, RegionSettings};
use crate::sharding::shard::ShardId;
use crate::timer::sleep_until;

/// Why an entity's task failed; the region logs it and starts the entity again after a pause.
#[derive(Debug, thiserror::Error)]
pub enum EntityFailure {
    /// A newer incarnation of the entity claimed it in the store: this one's state may be
    /// stale, and the message it was processing goes to the newer one.
    #[error("a newer incarnation owns this entity: {0}")]
    Fenced(String),
}

/// An entity's task: it reads its messages until the channel closes, then finishes and returns
/// `Ok`; `Err` (or a panic) is a failure, after which the region restarts it with a pause.
pub type EntityRun = Pin<Box<dyn Future<Output = Result<(), EntityFailure>> + Send>>;

/// Starts the task of an entity of the region's type. Messages come boxed: an unbounded
/// channel allocates its slots in blocks of 32, and an idle entity should not keep 32
/// envelopes' worth of memory.
pub type EntitySpawner<P> =
    Arc<dyn Fn(EntityId, mpsc::UnboundedReceiver<Box<P>>) -> EntityRun + Send + Sync>;

/// What a region shows about itself, for `/cluster` pages and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionStatus {
    /// Shards hosted here.
    pub hosted: Vec<ShardId>,
    /// Entities running here.
    pub entities: usize,
    /// Messages waiting for a shard home.
    pub buffered: usize,
    /// Node the region takes for the coordinator's.
    pub coordinator: Option<NodeAddr>,
}

enum RegionInput<P> {
    Local(EntityId, P),
    Remote(NodeAddr, ShardingMsg<P>),
}

/// Sends to this node's region; cheap to clone.
pub struct RegionHandle<P> {
    input: mpsc::Sender<RegionInput<P>>,
    status: watch::Receiver<RegionStatus>,
    abort: CancellationToken,
}

impl<P> Clone for RegionHandle<P> {
    fn clone(&self) -> Self {
        RegionHandle {
            input: self.input.clone(),
            status: self.status.clone(),
            abort: self.abort.clone(),
        }
    }
}

/// The region task is gone (the node is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the shard region has stopped")]
pub struct RegionStopped;

impl<P: Send + 'static> RegionHandle<P> {
    /// Sends `message` to `entity`, wherever it lives; waits while the region's queue is full.
    pub async fn deliver(&self, entity: EntityId, message: P) -> Result<(), RegionStopped> {
        self.input
            .send(RegionInput::Local(entity, message))
            .await
            .map_err(|_| RegionStopped)
    }

    /// A sharding message from another node (or this node's coordinator).
    pub async fn handle_remote(
        &self,
        from: NodeAddr,
        message: ShardingMsg<P>,
    ) -> Result<(), RegionStopped> {
        self.input
            .send(RegionInput::Remote(from, message))
            .await
            .map_err(|_| RegionStopped)
    }

    /// The region's current status.
    pub fn status(&self) -> watch::Receiver<RegionStatus> {
        self.status.clone()
    }

    /// Stops the region and drops its entities where they stand, finishing nothing: for a
    /// node that downed itself, whose entities now run elsewhere.
    pub fn abort(&self) {
        self.abort.cancel();
    }
}

/// Starts the region of `node`: it hosts shards when the node has `role`, runs entities with
/// `spawner`, and stops its entities (letting them finish) when the node stops.
pub fn spawn_region<P>(
    node: &NodeContext,
    role: &str,
    settings: RegionSettings,
    outbox: Outbox<ShardingMsg<P>>,
    spawner: EntitySpawner<P>,
) -> RegionHandle<P>
where
    P: Clone + Send + 'static,
{
    let (input, input_rx) = mpsc::channel(1024);
    let (status_tx, status) = watch::channel(RegionStatus::default());
    let driver = RegionDriver {
        core: Region::new(settings, role, node.me.clone()),
        outbox,
        spawner,
        entities: HashMap::new(),
        running: FuturesUnordered::new(),
        status: status_tx,
        published: None,
        metrics: node.metrics.clone(),
    };
    let abort = CancellationToken::new();
    tokio::spawn(driver.run(
        node.view.clone(),
        input_rx,
        node.part_shutdown(),
        abort.clone(),
    ));
    RegionHandle {
        input,
        status,
        abort,
    }
}

type EntityEnd = Pin<Box<dyn Future<Output = (EntityId, u64, bool)> + Send>>;

struct RunningEntity<P> {
    /// `None` once asked to stop.
    inbox: Option<mpsc::UnboundedSender<Box<P>>>,
    /// Tells a stale end (of an earlier task of the same entity) from this task's.
    incarnation: u64,
    /// Stops the task where it stands (dropping a `JoinHandle` would only detach it).
    task: AbortHandle,
}

struct RegionDriver<P> {
    core: Region<P>,
    outbox: Outbox<ShardingMsg<P>>,
    spawner: EntitySpawner<P>,
    entities: HashMap<EntityId, RunningEntity<P>>,
    running: FuturesUnordered<EntityEnd>,
    status: watch::Sender<RegionStatus>,
    /// What the last published status was built from.
    published: Option<(u64, usize, usize)>,
    metrics: ClusterMetrics,
}

impl<P: Clone + Send + 'static> RegionDriver<P> {
    async fn run(
        mut self,
        mut view: watch::Receiver<ClusterView>,
        mut input: mpsc::Receiver<RegionInput<P>>,
        shutdown: CancellationToken,
        abort: CancellationToken,
    ) {
        let mut incarnations = 0_u64;
        let first = view.borrow_and_update().clone();
        self.core.handle_view(first, Instant::now());
        loop {
            self.drain(&mut incarnations);
            let wake_at = self.core.poll_timeout();
            tokio::select! {
                // A view change first: a message sent because of it (a producer waking the
                // entities of a node that went down) must not be routed by the old view.
                biased;
                _ = abort.cancelled() => break,
                _ = shutdown.cancelled() => break,
                changed = view.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = view.borrow_and_update().clone();
                    self.core.handle_view(current, Instant::now());
                }
                Some(message) = input.recv() => match message {
                    RegionInput::Local(entity, message) => {
                        self.core.deliver(entity, message, Instant::now());
                    }
                    RegionInput::Remote(from, message) => {
                        self.core.handle_message(from, message, Instant::now());
                    }
                },
                Some((entity, incarnation, ok)) = self.running.next(), if !self.running.is_empty() => {
                    self.on_entity_end(entity, incarnation, ok);
                }
                _ = sleep_until(wake_at) => {
                    self.core.handle_timeout(Instant::now());
                }
            }
        }
        self.stop_entities(abort.is_cancelled()).await;
        self.metrics.shards_hosted.set(0);
    }

    /// Closes every inbox, so entities finish what they hold and stop, and waits for them;
    /// with `abort`, stops every task where it stands first (it finishes nothing).
    async fn stop_entities(&mut self, abort: bool) {
        for (_, entity) in self.entities.drain() {
            if abort {
                entity.task.abort();
            }
        }
        while self.running.next().await.is_some() {}
    }

    fn on_entity_end(&mut self, entity: EntityId, incarnation: u64, ok: bool) {
        let current = self
            .entities
            .get(&entity)
            .is_some_and(|e| e.incarnation == incarnation);
        if !current {
            return;
        }
        self.entities.remove(&entity);
        shrink_when_mostly_empty(&mut self.entities);
        let now = Instant::now();
        if ok {
            self.core.handle_entity_stopped(&entity, now);
        } else {
            self.core.handle_entity_failed(&entity, now);
        }
    }

    /// Moves the core's outputs to where they go.
    fn drain(&mut self, incarnations: &mut u64) {
        loop {
            let mut moved = false;
            while let Some((to, message)) = self.core.poll_transmit() {
                (self.outbox)(&to, message);
            }
            while let Some(command) = self.core.poll_command() {
                moved = true;
                match command {
                    EntityCommand::Deliver { entity, message } => {
                        self.deliver(entity, message, incarnations);
                    }
                    EntityCommand::Stop { entity } => match self.entities.get_mut(&entity) {
                        Some(running) => running.inbox = None,
                        // Not running here (it never started): it is stopped already.
                        None => self.core.handle_entity_stopped(&entity, Instant::now()),
                    },
                }
            }
            if !moved {
                break;
            }
        }
        self.publish_status();
    }

    /// Republishes the status when it changed: a cheap comparison on every pass, the full
    /// status (a Vec of shards, an address) only when the layout or the counts moved.
    fn publish_status(&mut self) {
        let seen = (
            self.core.layout_version(),
            self.core.entity_count(),
            self.core.buffered(),
        );
        if self.published == Some(seen) {
            return;
        }
        self.published = Some(seen);
        let status = RegionStatus {
            hosted: self.core.hosted_shards(),
            entities: seen.1,
            buffered: seen.2,
            coordinator: self.core.coordinator().cloned(),
        };
        self.metrics
            .shards_hosted
            .set(i64::try_from(status.hosted.len()).unwrap_or(i64::MAX));
        self.status.send_replace(status);
    }

    fn deliver(&mut self, entity: EntityId, message: P, incarnations: &mut u64) {
        if let Some(inbox) = self.entities.get(&entity).and_then(|e| e.inbox.as_ref()) {
            if inbox.send(Box::new(message)).is_ok() {
                return;
            }
            // The task ended and its end is not processed yet: its failure will be reported;
            // this message is lost with it and resent by its producer.
            debug!(%entity, "message for an entity that just ended");
            return;
        }
        *incarnations += 1;
        let incarnation = *incarnations;
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let _ = inbox.send(Box::new(message));
        let task = tokio::spawn((self.spawner)(entity.clone(), inbox_rx));
        let abort = task.abort_handle();
        let id = entity.clone();
        self.running.push(Box::pin(async move {
            let ok = match task.await {
                Ok(Ok(())) => true,
                Ok(Err(failure)) => {
                    warn!(entity = %id, %failure, "entity failed");
                    false
                }
                Err(aborted) if aborted.is_cancelled() => false,
                Err(panic) => {
                    warn!(entity = %id, %panic, "entity panicked");
                    false
                }
            };
            (id, incarnation, ok)
        }));
        self.entities.insert(
            entity,
            RunningEntity {
                inbox: Some(inbox),
                incarnation,
                task: abort,
            },
        );
    }
}

/// Where the router hands messages for the coordinator: to the instance running on this
/// node, if one does; otherwise they are dropped (regions ask again).
#[derive(Clone, Default)]
pub struct CoordinatorSlot {
    instance: Arc<Mutex<Option<CoordinatorInbox>>>,
}

type CoordinatorInbox = mpsc::Sender<(NodeAddr, ToCoordinator)>;

impl CoordinatorSlot {
    /// Hands `message` to the coordinator running here; false when none runs (or it is busy).
    pub fn deliver(&self, from: NodeAddr, message: ToCoordinator) -> bool {
        let instance = self.instance.lock().unwrap_or_else(PoisonError::into_inner);
        instance
            .as_ref()
            .is_some_and(|tx| tx.try_send((from, message)).is_ok())
    }

    fn set(&self, sender: Option<CoordinatorInbox>) {
        *self.instance.lock().unwrap_or_else(PoisonError::into_inner) = sender;
    }
}

/// The coordinator of regions with `role`, as a singleton that runs on the oldest Up member
/// with that role (the node every region takes for the coordinator's).
pub fn coordinator_singleton(
    name: &str,
    role: &str,
    settings: CoordinatorSettings,
    view: watch::Receiver<ClusterView>,
    outbox: Outbox<FromCoordinator>,
    slot: CoordinatorSlot,
) -> SingletonSpec {
    let role_owned = role.to_owned();
    SingletonSpec::new(name, role, move |cancel| {
        let (tx, rx) = mpsc::channel(4096);
        slot.set(Some(tx));
        let instance = run_coordinator(
            Coordinator::new(settings.clone(), &role_owned, Instant::now()),
            view.clone(),
            rx,
            Arc::clone(&outbox),
            cancel,
        );
        let slot = slot.clone();
        async move {
            instance.await;
            slot.set(None);
        }
    })
}

async fn run_coordinator(
    mut core: Coordinator,
    mut view: watch::Receiver<ClusterView>,
    mut inbox: mpsc::Receiver<(NodeAddr, ToCoordinator)>,
    outbox: Outbox<FromCoordinator>,
    cancel: CancellationToken,
) {
    let first = view.borrow_and_update().clone();
    core.handle_view(first, Instant::now());
    loop {
        while let Some((to, message)) = core.poll_transmit() {
            outbox(&to, message);
        }
        let wake_at = core.poll_timeout();
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = view.changed() => {
                if changed.is_err() {
                    break;
                }
                let current = view.borrow_and_update().clone();
                core.handle_view(current, Instant::now());
            }
            Some((from, message)) = inbox.recv() => core.handle_message(from, message, Instant::now()),
            _ = tokio::time::sleep_until(wake_at) => core.handle_timeout(Instant::now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::cluster::member::NodeId;
    use crate::cluster::transport::SendOutcome;

    /// Set when the entity task's state is dropped: the task ended or was aborted.
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn an_aborted_region_stops_an_entity_stuck_in_its_work() {
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&dropped);
        // The entity takes its first message and never finishes it, inbox closed or not.
        let spawner: EntitySpawner<u32> = Arc::new(move |_, mut inbox| -> EntityRun {
            let guard = Dropped(Arc::clone(&flag));
            Box::pin(async move {
                let _guard = guard;
                let _ = inbox.recv().await;
                std::future::pending::<()>().await;
                Ok(())
            })
        });
        let me = NodeAddr {
            id: NodeId::new("a"),
            generation: 1,
        };
        let mut driver = RegionDriver {
            core: Region::new(RegionSettings::default(), "shard-host", me),
            outbox: Arc::new(|_: &NodeAddr, _| SendOutcome::Queued),
            spawner,
            entities: HashMap::new(),
            running: FuturesUnordered::new(),
            status: watch::channel(RegionStatus::default()).0,
            published: None,
            metrics: ClusterMetrics::unregistered(),
        };
        driver.deliver(EntityId::new("e"), 1, &mut 0);
        tokio::time::timeout(Duration::from_secs(5), driver.stop_entities(true))
            .await
            .expect("an aborted region does not wait for its entities' work");
        assert!(dropped.load(Ordering::SeqCst), "the entity task still runs");
    }
}
