//! Tokio drivers for the sharding cores: a region task per node that owns the [`Region`] core
//! and runs the entities it hosts as tasks, and the coordinator as a cluster singleton whose
//! instance owns a [`Coordinator`] core. Both talk to other nodes through an [`Outbox`]; what
//! arrives for them is handed in by the node's router ([`RegionHandle::handle_remote`],
//! [`CoordinatorSlot::deliver`]).
//!
//! An entity task gets its messages on a channel and ends `Ok` once that channel is closed and
//! it has finished what it holds (a stop: passivation or hand-off), `Ok` with its own state
//! when it went dormant (quiet for `hibernate_after`), or `Err` when it failed. A dormant
//! entity keeps no task, channel or protocol state, only what the entity itself holds; its next
//! message starts a task from that state, without recovering it from the store.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
/// [`Ended::Stopped`], or goes dormant; `Err` (or a panic) is a failure, after which the region
/// restarts it with a pause.
pub type EntityRun<P> = Pin<Box<dyn Future<Output = Result<Ended<P>, EntityFailure>> + Send>>;

/// An entity's inbox. Messages come boxed: an unbounded channel allocates its slots in blocks
/// of 32, and an entity should not keep 32 envelopes' worth of memory.
pub type Inbox<P> = mpsc::UnboundedReceiver<Box<P>>;

/// What an entity keeps while dormant: opaque to the region, given back to the spawner.
pub type DormantState = Box<dyn Any + Send>;

/// How an entity's task ended, when it did not fail.
pub enum Ended<P> {
    /// Its inbox closed and it finished what it held.
    Stopped,
    /// It was quiet for `hibernate_after`, with nothing held or owed: it gives back its inbox
    /// (a message may have arrived since) and its own state, to be started from on the next
    /// message.
    Dormant {
        /// The inbox it read.
        inbox: Inbox<P>,
        /// The entity's state.
        state: DormantState,
    },
}

/// What an entity's task starts with.
pub struct EntityStart<P> {
    /// The entity.
    pub id: EntityId,
    /// Its messages.
    pub inbox: Inbox<P>,
    /// What it kept when it went dormant; `None` for a new incarnation (it recovers).
    pub dormant: Option<DormantState>,
    /// Quiet for this long, it goes dormant (zero: never).
    pub hibernate_after: Duration,
}

/// Starts the task of an entity of the region's type.
pub type EntitySpawner<P> = Arc<dyn Fn(EntityStart<P>) -> EntityRun<P> + Send + Sync>;

/// What a region shows about itself, for `/cluster` pages and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionStatus {
    /// Shards hosted here.
    pub hosted: Vec<ShardId>,
    /// Entities here, running or dormant.
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
        hibernate_after: settings.hibernate_after,
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

/// An entity task's end as the driver sees it: which entity, which of its tasks, and how.
type TaskEnd<P> = Pin<Box<dyn Future<Output = (EntityId, u64, Outcome<P>)> + Send>>;

enum Outcome<P> {
    Ended(Ended<P>),
    Failed,
}

/// An entity the region has here: running as a task, or dormant.
enum HostedEntity<P> {
    Running(RunningEntity<P>),
    Dormant(DormantState),
}

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
    hibernate_after: Duration,
    entities: HashMap<EntityId, HostedEntity<P>>,
    running: FuturesUnordered<TaskEnd<P>>,
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
                Some((entity, incarnation, outcome)) = self.running.next(), if !self.running.is_empty() => {
                    self.on_task_end(entity, incarnation, outcome, &mut incarnations);
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
            if let (true, HostedEntity::Running(running)) = (abort, entity) {
                running.task.abort();
            }
        }
        // A task that goes dormant now is dropped with its state, unless messages reached its
        // inbox as it went: it finishes them first (its inbox is closed, so then it stops).
        while let Some((id, incarnation, outcome)) = self.running.next().await {
            if let Outcome::Ended(Ended::Dormant { inbox, state }) = outcome
                && !abort
                && !inbox.is_empty()
            {
                self.spawn(id, inbox, Some(state), incarnation);
            }
        }
    }

    fn on_task_end(
        &mut self,
        entity: EntityId,
        incarnation: u64,
        outcome: Outcome<P>,
        incarnations: &mut u64,
    ) {
        // Asked to stop since it started: its inbox sender is gone.
        let stopping = match self.entities.get(&entity) {
            Some(HostedEntity::Running(running)) if running.incarnation == incarnation => {
                running.inbox.is_none()
            }
            // The end of an earlier task, or of one the region forgot (it stopped).
            _ => return,
        };
        let now = Instant::now();
        match outcome {
            Outcome::Ended(Ended::Dormant { inbox, state }) if !inbox.is_empty() => {
                // Messages came while it went: it goes on from its state (and, if asked to
                // stop meanwhile, finishes them and stops). Its entry and inbox sender stay.
                *incarnations += 1;
                let task = self.spawn(entity.clone(), inbox, Some(state), *incarnations);
                if let Some(HostedEntity::Running(running)) = self.entities.get_mut(&entity) {
                    running.incarnation = *incarnations;
                    running.task = task;
                }
                return;
            }
            Outcome::Ended(Ended::Dormant { state, .. }) if !stopping => {
                self.entities.insert(entity, HostedEntity::Dormant(state));
                return;
            }
            // Asked to stop, with nothing left to do: stopped.
            Outcome::Ended(_) => self.core.handle_entity_stopped(&entity, now),
            Outcome::Failed => self.core.handle_entity_failed(&entity, now),
        }
        self.entities.remove(&entity);
        shrink_when_mostly_empty(&mut self.entities);
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
                    EntityCommand::Stop { entity } => self.stop(&entity),
                }
            }
            if !moved {
                break;
            }
        }
        self.publish_status();
    }

    /// Stops `entity`: a running one once it has finished what it holds.
    fn stop(&mut self, entity: &EntityId) {
        match self.entities.get_mut(entity) {
            Some(HostedEntity::Running(running)) => running.inbox = None,
            // Dormant, it holds nothing to finish.
            Some(HostedEntity::Dormant(_)) => {
                self.entities.remove(entity);
                self.core.handle_entity_stopped(entity, Instant::now());
            }
            // Not running here (it never started): it is stopped already.
            None => self.core.handle_entity_stopped(entity, Instant::now()),
        }
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
        if let Some(HostedEntity::Running(running)) = self.entities.get(&entity) {
            match &running.inbox {
                Some(inbox) => {
                    if inbox.send(Box::new(message)).is_err() {
                        // The task ended and its end is not processed yet: its failure will
                        // be reported; this message is lost with it and resent by its
                        // producer.
                        debug!(%entity, "message for an entity that just ended");
                    }
                }
                // The core keeps a stopping entity's messages until it has stopped.
                None => debug!(%entity, "message for a stopping entity"),
            }
            return;
        }
        let dormant = match self.entities.remove(&entity) {
            Some(HostedEntity::Dormant(state)) => Some(state),
            _ => None,
        };
        *incarnations += 1;
        let incarnation = *incarnations;
        let (inbox, inbox_rx) = mpsc::unbounded_channel();
        let _ = inbox.send(Box::new(message));
        let task = self.spawn(entity.clone(), inbox_rx, dormant, incarnation);
        self.entities.insert(
            entity,
            HostedEntity::Running(RunningEntity {
                inbox: Some(inbox),
                incarnation,
                task,
            }),
        );
    }

    /// Runs a task of `id` on `inbox`, from its `dormant` state if it kept one, and watches
    /// for its end.
    fn spawn(
        &mut self,
        id: EntityId,
        inbox: Inbox<P>,
        dormant: Option<DormantState>,
        incarnation: u64,
    ) -> AbortHandle {
        let start = EntityStart {
            id: id.clone(),
            inbox,
            dormant,
            hibernate_after: self.hibernate_after,
        };
        let task = tokio::spawn((self.spawner)(start));
        let abort = task.abort_handle();
        self.running.push(Box::pin(async move {
            let outcome = match task.await {
                Ok(Ok(ended)) => Outcome::Ended(ended),
                Ok(Err(failure)) => {
                    warn!(entity = %id, %failure, "entity failed");
                    Outcome::Failed
                }
                Err(aborted) if aborted.is_cancelled() => Outcome::Failed,
                Err(panic) => {
                    warn!(entity = %id, %panic, "entity panicked");
                    Outcome::Failed
                }
            };
            (id, incarnation, outcome)
        }));
        abort
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

    fn me() -> NodeAddr {
        NodeAddr {
            id: NodeId::new("a"),
            generation: 1,
        }
    }

    fn driver(spawner: EntitySpawner<u32>) -> RegionDriver<u32> {
        RegionDriver {
            core: Region::new(RegionSettings::default(), "shard-host", me()),
            outbox: Arc::new(|_: &NodeAddr, _| SendOutcome::Queued),
            spawner,
            hibernate_after: Duration::ZERO,
            entities: HashMap::new(),
            running: FuturesUnordered::new(),
            status: watch::channel(RegionStatus::default()).0,
            published: None,
            metrics: ClusterMetrics::unregistered(),
        }
    }

    /// An entity that adds up its messages, taking one per task run, and goes dormant after
    /// each (with whatever else waits in its inbox); `starts` records the state each run
    /// started from.
    fn summing(starts: Arc<Mutex<Vec<Option<u32>>>>) -> EntitySpawner<u32> {
        Arc::new(move |start: EntityStart<u32>| -> EntityRun<u32> {
            let kept = start.dormant.and_then(|s| s.downcast::<u32>().ok());
            let kept = kept.map(|sum| *sum);
            starts.lock().unwrap().push(kept);
            let mut inbox = start.inbox;
            Box::pin(async move {
                let sum = kept.unwrap_or(0) + *inbox.recv().await.unwrap();
                Ok(Ended::Dormant {
                    inbox,
                    state: Box::new(sum),
                })
            })
        })
    }

    /// A region driver running one [`summing`] entity, `e`.
    struct Summing {
        driver: RegionDriver<u32>,
        starts: Arc<Mutex<Vec<Option<u32>>>>,
        e: EntityId,
        incarnations: u64,
    }

    impl Summing {
        fn new() -> Self {
            let starts = Arc::new(Mutex::new(Vec::new()));
            Summing {
                driver: driver(summing(Arc::clone(&starts))),
                starts,
                e: EntityId::new("e"),
                incarnations: 0,
            }
        }

        fn deliver(&mut self, n: u32) {
            let e = self.e.clone();
            self.driver.deliver(e, n, &mut self.incarnations);
        }

        /// The state each of its tasks started from.
        fn starts(&self) -> Vec<Option<u32>> {
            self.starts.lock().unwrap().clone()
        }

        /// The next task end, as the driver's loop would take it.
        async fn next_end(&mut self) -> (EntityId, u64, Outcome<u32>) {
            let end = tokio::time::timeout(Duration::from_secs(5), self.driver.running.next());
            end.await.unwrap().unwrap()
        }

        /// Hands the driver each task's end until `e` is dormant; its sum.
        async fn until_dormant(&mut self) -> u32 {
            loop {
                if let Some(HostedEntity::Dormant(state)) = self.driver.entities.get(&self.e) {
                    return *state.downcast_ref::<u32>().unwrap();
                }
                let (id, incarnation, outcome) = self.next_end().await;
                self.driver
                    .on_task_end(id, incarnation, outcome, &mut self.incarnations);
            }
        }
    }

    #[tokio::test]
    async fn a_dormant_entity_starts_from_the_state_it_kept() {
        let mut region = Summing::new();
        region.deliver(1);
        assert_eq!(region.until_dormant().await, 1);
        region.deliver(2);
        assert_eq!(region.until_dormant().await, 3);
        assert_eq!(region.starts(), vec![None, Some(1)]);
        assert!(
            region.driver.running.is_empty(),
            "no task for a dormant entity"
        );
    }

    #[tokio::test]
    async fn a_message_that_arrives_as_its_entity_goes_dormant_is_processed() {
        let mut region = Summing::new();
        // The task takes 1 and goes dormant with 2 still in its inbox.
        region.deliver(1);
        region.deliver(2);
        assert_eq!(region.until_dormant().await, 3);
        assert_eq!(region.starts(), vec![None, Some(1)]);
    }

    #[tokio::test]
    async fn an_entity_asked_to_stop_as_it_goes_dormant_is_stopped_not_kept() {
        let mut region = Summing::new();
        region.deliver(1);
        // Asked to stop while its task is ending dormant (nothing left in its inbox).
        region.driver.stop(&region.e.clone());
        let (id, incarnation, outcome) = region.next_end().await;
        assert!(matches!(outcome, Outcome::Ended(Ended::Dormant { .. })));
        region
            .driver
            .on_task_end(id, incarnation, outcome, &mut region.incarnations);
        assert!(
            region.driver.entities.is_empty(),
            "a stopped entity kept dormant"
        );
        assert!(region.driver.running.is_empty());
    }

    #[tokio::test]
    async fn a_dormant_entity_asked_to_stop_is_dropped_at_once() {
        let mut region = Summing::new();
        region.deliver(1);
        region.until_dormant().await;
        region.driver.stop(&region.e.clone());
        assert!(region.driver.entities.is_empty() && region.driver.running.is_empty());
        // Gone, the next message starts a new incarnation, which recovers.
        region.deliver(5);
        assert_eq!(region.until_dormant().await, 5);
        assert_eq!(region.starts(), vec![None, None]);
    }

    #[tokio::test]
    async fn a_stopping_region_lets_an_entity_going_dormant_finish_what_reached_it() {
        let mut region = Summing::new();
        // The task takes 1 and goes dormant with 2 still in its inbox.
        region.deliver(1);
        region.deliver(2);
        tokio::time::timeout(Duration::from_secs(5), region.driver.stop_entities(false))
            .await
            .expect("the region stops");
        assert_eq!(region.starts(), vec![None, Some(1)], "2 was dropped");
    }

    #[tokio::test]
    async fn an_aborted_region_stops_an_entity_stuck_in_its_work() {
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&dropped);
        // The entity takes its first message and never finishes it, inbox closed or not.
        let spawner: EntitySpawner<u32> = Arc::new(move |start| -> EntityRun<u32> {
            let guard = Dropped(Arc::clone(&flag));
            let mut inbox = start.inbox;
            Box::pin(async move {
                let _guard = guard;
                let _ = inbox.recv().await;
                std::future::pending::<()>().await;
                Ok(Ended::Stopped)
            })
        });
        let mut driver = driver(spawner);
        driver.deliver(EntityId::new("e"), 1, &mut 0);
        tokio::time::timeout(Duration::from_secs(5), driver.stop_entities(true))
            .await
            .expect("an aborted region does not wait for its entities' work");
        assert!(dropped.load(Ordering::SeqCst), "the entity task still runs");
    }
}
