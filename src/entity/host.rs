//! Keeps this node's entities: starts an entity's task on its first message, hands it
//! protocol messages, and answers queries. The bridge owns the host and calls it from its own
//! task; queries come from elsewhere (HTTP) through [`EntityQueries`].

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::SequencedMessage;
use crate::entity::runner::{self, EntityMetrics, EntityReply, Envelope, Input, RunnerSettings};
use crate::entity::{Entity, EntityFactory, EntityId};

/// Room in each entity's inbox: a full flow-control window plus resends and queries. When it is
/// full the frame is dropped and the protocol resends it, so a slow entity cannot stall the
/// bridge.
const INBOX_SLACK: usize = 16;

/// Room for entity replies on their way to the bridge; entities wait when it is full.
const REPLY_CAPACITY: usize = 4096;

type Inbox<E> = mpsc::Sender<Input<E>>;
type Directory<E> = Arc<RwLock<HashMap<EntityId, Inbox<E>>>>;

/// The entities of this node.
pub struct LocalEntityHost<F: EntityFactory> {
    factory: Arc<F>,
    settings: Arc<RunnerSettings>,
    metrics: EntityMetrics,
    /// The bridge's own copy, so delivering takes no lock.
    inboxes: HashMap<EntityId, Inbox<F::Entity>>,
    /// Shared with queries; written only when an entity starts.
    directory: Directory<F::Entity>,
    replies: mpsc::Sender<EntityReply>,
    inbox_capacity: usize,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// Answers queries about this node's entities from any task.
pub struct EntityQueries<E: Entity> {
    directory: Directory<E>,
}

impl<E: Entity> Clone for EntityQueries<E> {
    fn clone(&self) -> Self {
        EntityQueries {
            directory: Arc::clone(&self.directory),
        }
    }
}

impl<E: Entity> EntityQueries<E> {
    /// The entity's current state, or `None` if it was never started here.
    pub async fn query(&self, id: &EntityId) -> Option<E::Snapshot> {
        let inbox = self
            .directory
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()?;
        let (reply, answer) = oneshot::channel();
        inbox.send(Input::Query(reply)).await.ok()?;
        answer.await.ok()
    }
}

impl<F: EntityFactory> LocalEntityHost<F> {
    /// A host with no entities yet, and the channel their replies arrive on.
    pub fn new(
        factory: F,
        settings: RunnerSettings,
        metrics: EntityMetrics,
    ) -> (Self, mpsc::Receiver<EntityReply>) {
        let (replies, replies_rx) = mpsc::channel(REPLY_CAPACITY);
        let inbox_capacity = settings.consumer.flow_control_window as usize + INBOX_SLACK;
        let host = LocalEntityHost {
            factory: Arc::new(factory),
            settings: Arc::new(settings),
            metrics,
            inboxes: HashMap::new(),
            directory: Arc::new(RwLock::new(HashMap::new())),
            replies,
            inbox_capacity,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        };
        (host, replies_rx)
    }

    /// A handle for queries.
    pub fn queries(&self) -> EntityQueries<F::Entity> {
        EntityQueries {
            directory: Arc::clone(&self.directory),
        }
    }

    /// Hands a protocol message to an entity, starting the entity if needed. Never waits: a
    /// message for a full inbox is dropped and later resent by the protocol.
    pub fn deliver(
        &mut self,
        id: &EntityId,
        message: SequencedMessage<Arc<Envelope<<F::Entity as Entity>::Message>>>,
    ) {
        let inbox = match self.inboxes.get(id) {
            Some(inbox) if !inbox.is_closed() => inbox,
            _ => self.start(id),
        };
        match inbox.try_send(Input::Message(message)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.metrics.inbox_drops.inc(),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // The task ended (it panicked, or shutdown began); the next message restarts it
                // and the protocol resends this one.
                self.metrics.inbox_drops.inc();
            }
        }
    }

    /// Stops every entity (each sends a last Ack) and waits for their tasks.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    fn start(&mut self, id: &EntityId) -> &Inbox<F::Entity> {
        let (inbox, inbox_rx) = mpsc::channel(self.inbox_capacity);
        let entity = self.factory.create(id);
        self.tasks.spawn(runner::run(
            id.clone(),
            entity,
            inbox_rx,
            self.replies.clone(),
            Arc::clone(&self.settings),
            self.metrics.clone(),
            self.shutdown.child_token(),
        ));
        self.directory
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), inbox.clone());
        self.inboxes
            .entry(id.clone())
            .insert_entry(inbox)
            .into_mut()
    }
}
