//! Work pulling across the cluster: a worker registry (Akka's receptionist, for work pulling)
//! whose workers may live on any node. Every node announces its local workers of each service
//! to the live members, on every change and once a second; a node that is no longer alive in
//! the membership view loses its workers at once, so a work-pulling producer re-routes what
//! they held. Messages to a remote worker and its frames back travel over the transport.
//!
//! Use: on a worker node, [`ClusterWorkers::spawn_worker`]; on the producer's node,
//! `WorkPullingBuilder::spawn(workers.producer_inbox(service), &workers.registry(service))`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use crate::cluster::member::{ClusterView, NodeAddr};
use crate::cluster::transport::Outbox;
use crate::delivery::driver::consumer::{ConsumerBuilder, ConsumerHandle};
use crate::delivery::driver::link::{ChannelLink, Link, channel_link};
use crate::delivery::driver::work_pulling::Workers;
use crate::delivery::driver::{FromConsumer, LINK_CAPACITY, WorkerId, WorkerRegistry};
use crate::delivery::protocol::{ConsumerFrame, ProducerId, ProducerRef, SequencedMessage};

/// What nodes say to each other about workers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkMsg<M> {
    /// "These are all my workers of `service`" (replaces what the sender said before).
    Workers {
        /// The service.
        service: String,
        /// The sender's local worker numbers.
        workers: Vec<u64>,
    },
    /// A message for a worker.
    ToWorker {
        /// The service.
        service: String,
        /// The receiver's local worker number.
        worker: u64,
        /// The message.
        message: SequencedMessage<M>,
    },
    /// A worker's frame for a producer's controller.
    ToProducer {
        /// The service.
        service: String,
        /// The controller.
        to: ProducerRef,
        /// The frame.
        frame: ConsumerFrame,
    },
}

struct Service<M> {
    local: BTreeMap<u64, ChannelLink<SequencedMessage<M>>>,
    remote: BTreeMap<NodeAddr, Vec<u64>>,
    /// The work-pulling producer of this service on this node, if any.
    producer_inbox: Option<ChannelLink<FromConsumer<M>>>,
    /// Where producers live, learned from their messages; workers answer there.
    producer_nodes: HashMap<ProducerId, NodeAddr>,
    published: watch::Sender<Workers<M>>,
}

impl<M> Service<M> {
    fn new() -> Self {
        Service {
            local: BTreeMap::new(),
            remote: BTreeMap::new(),
            producer_inbox: None,
            producer_nodes: HashMap::new(),
            published: watch::channel(BTreeMap::new()).0,
        }
    }
}

struct Hub<M> {
    services: BTreeMap<String, Service<M>>,
    view: Option<ClusterView>,
}

impl<M: Send + 'static> Hub<M> {
    /// Hands a producer's message to a worker here, noting where the producer lives.
    fn deliver_to_local_worker(
        &mut self,
        service: &str,
        worker: u64,
        from: NodeAddr,
        message: SequencedMessage<M>,
    ) {
        let Some(entry) = self.services.get_mut(service) else {
            return;
        };
        entry
            .producer_nodes
            .insert(message.producer.id.clone(), from);
        if let Some(link) = entry.local.get(&worker) {
            link.send(message);
        }
    }
}

/// This node's part of the cluster-wide worker registry; cheap to clone.
pub struct ClusterWorkers<M> {
    me: NodeAddr,
    hub: Arc<Mutex<Hub<M>>>,
    outbox: Outbox<WorkMsg<M>>,
    next_worker: Arc<AtomicU64>,
}

impl<M> Clone for ClusterWorkers<M> {
    fn clone(&self) -> Self {
        ClusterWorkers {
            me: self.me.clone(),
            hub: Arc::clone(&self.hub),
            outbox: Arc::clone(&self.outbox),
            next_worker: Arc::clone(&self.next_worker),
        }
    }
}

/// A worker's id in a producer's view: the same on every node, different for every worker.
fn global_id(node: &NodeAddr, local: u64) -> WorkerId {
    xxh3_64(format!("{node}/{local}").as_bytes())
}

impl<M: Clone + Send + Sync + 'static> ClusterWorkers<M> {
    /// The registry of node `me`, announcing through `outbox`; follows `view` (forgetting
    /// the workers of members that are no longer alive) and re-announces every
    /// `announce_interval` until `shutdown`.
    pub fn start(
        me: NodeAddr,
        outbox: Outbox<WorkMsg<M>>,
        view: watch::Receiver<ClusterView>,
        announce_interval: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let workers = ClusterWorkers {
            me,
            hub: Arc::new(Mutex::new(Hub {
                services: BTreeMap::new(),
                view: None,
            })),
            outbox,
            next_worker: Arc::new(AtomicU64::new(1)),
        };
        tokio::spawn(workers.clone().follow(view, announce_interval, shutdown));
        workers
    }

    fn lock(&self) -> MutexGuard<'_, Hub<M>> {
        self.hub.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn follow(
        self,
        mut view: watch::Receiver<ClusterView>,
        announce_interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(announce_interval);
        loop {
            let current = view.borrow_and_update().clone();
            self.handle_view(current);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = view.changed() => if changed.is_err() { return },
                _ = ticks.tick() => self.announce_all(),
            }
        }
    }

    fn handle_view(&self, view: ClusterView) {
        let mut hub = self.lock();
        for (name, service) in hub.services.iter_mut() {
            let before = service.remote.len();
            service.remote.retain(|node, _| view.is_alive(node));
            if service.remote.len() != before {
                self.publish(name, service);
            }
        }
        hub.view = Some(view);
    }

    /// The registry a work-pulling producer of `service` subscribes to.
    pub fn registry(&self, service: &str) -> ServiceRegistry<M> {
        let mut hub = self.lock();
        let service = hub
            .services
            .entry(service.to_owned())
            .or_insert_with(Service::new);
        ServiceRegistry {
            published: service.published.subscribe(),
        }
    }

    /// The inbox of this node's work-pulling producer of `service`: workers' frames arrive
    /// there. One producer per service and node.
    pub fn producer_inbox(&self, service: &str) -> mpsc::Receiver<FromConsumer<M>> {
        let (link, inbox) = channel_link(LINK_CAPACITY);
        let mut hub = self.lock();
        hub.services
            .entry(service.to_owned())
            .or_insert_with(Service::new)
            .producer_inbox = Some(link);
        inbox
    }

    /// Starts a worker of `service` on this node and announces it; dropping the registration
    /// withdraws it.
    pub fn spawn_worker(
        &self,
        service: &str,
        consumer: ConsumerBuilder<M>,
    ) -> (ConsumerHandle<M>, ClusterWorkerRegistration<M>) {
        let (link, inbox) = channel_link(LINK_CAPACITY);
        let to_producer = WorkerToProducer {
            workers: self.clone(),
            service: service.to_owned(),
        };
        let handle = consumer
            .producer(Arc::new(to_producer))
            .start(inbox, link.clone());
        let worker = self.next_worker.fetch_add(1, Ordering::Relaxed);
        {
            let mut hub = self.lock();
            let entry = hub
                .services
                .entry(service.to_owned())
                .or_insert_with(Service::new);
            entry.local.insert(worker, link);
            self.publish(service, entry);
        }
        self.announce(service);
        let registration = ClusterWorkerRegistration {
            workers: self.clone(),
            service: service.to_owned(),
            worker,
        };
        (handle, registration)
    }

    /// A message from node `from`.
    pub fn handle(&self, from: NodeAddr, message: WorkMsg<M>) {
        let mut hub = self.lock();
        let alive = hub.view.as_ref().is_some_and(|v| v.is_alive(&from));
        match message {
            WorkMsg::Workers { service, workers } => {
                if !alive || from == self.me {
                    return;
                }
                let entry = hub
                    .services
                    .entry(service.clone())
                    .or_insert_with(Service::new);
                if entry.remote.get(&from) != Some(&workers) {
                    if workers.is_empty() {
                        entry.remote.remove(&from);
                    } else {
                        entry.remote.insert(from, workers);
                    }
                    self.publish(&service, entry);
                }
            }
            WorkMsg::ToWorker {
                service,
                worker,
                message,
            } => hub.deliver_to_local_worker(&service, worker, from, message),
            WorkMsg::ToProducer { service, to, frame } => {
                if let Some(inbox) = hub
                    .services
                    .get(&service)
                    .and_then(|s| s.producer_inbox.as_ref())
                {
                    inbox.send(FromConsumer {
                        to,
                        frame,
                        reply_to: None,
                    });
                }
            }
        }
    }

    fn publish(&self, name: &str, service: &Service<M>) {
        let mut workers: Workers<M> = BTreeMap::new();
        for &local in service.local.keys() {
            let link = LocalWorker {
                hub: Arc::downgrade(&self.hub),
                me: self.me.clone(),
                service: name.to_owned(),
                worker: local,
            };
            workers.insert(global_id(&self.me, local), Arc::new(link));
        }
        for (node, ids) in &service.remote {
            for &remote in ids {
                let link = RemoteWorker {
                    outbox: Arc::clone(&self.outbox),
                    node: node.clone(),
                    service: name.to_owned(),
                    worker: remote,
                };
                workers.insert(global_id(node, remote), Arc::new(link));
            }
        }
        service.published.send_replace(workers);
    }

    fn announce(&self, service: &str) {
        let (targets, workers) = {
            let hub = self.lock();
            let Some(view) = &hub.view else { return };
            let targets: Vec<NodeAddr> = view
                .members
                .values()
                .filter(|m| m.addr != self.me && view.is_alive(&m.addr))
                .map(|m| m.addr.clone())
                .collect();
            let workers: Vec<u64> = hub
                .services
                .get(service)
                .map(|s| s.local.keys().copied().collect())
                .unwrap_or_default();
            (targets, workers)
        };
        for node in targets {
            let message = WorkMsg::Workers {
                service: service.to_owned(),
                workers: workers.clone(),
            };
            (self.outbox)(&node, message);
        }
    }

    fn announce_all(&self) {
        let services: Vec<String> = self.lock().services.keys().cloned().collect();
        for service in services {
            self.announce(&service);
        }
    }

    fn withdraw(&self, service: &str, worker: u64) {
        {
            let mut hub = self.lock();
            if let Some(entry) = hub.services.get_mut(service) {
                entry.local.remove(&worker);
                self.publish(service, entry);
            }
        }
        self.announce(service);
    }
}

/// Where a producer of one service finds its workers, on every node.
pub struct ServiceRegistry<M> {
    published: watch::Receiver<Workers<M>>,
}

impl<M: Send + Sync + 'static> WorkerRegistry<M> for ServiceRegistry<M> {
    fn subscribe(&self) -> watch::Receiver<Workers<M>> {
        self.published.clone()
    }
}

/// A worker's registration; dropping it withdraws the worker everywhere.
pub struct ClusterWorkerRegistration<M: Clone + Send + Sync + 'static> {
    workers: ClusterWorkers<M>,
    service: String,
    worker: u64,
}

impl<M: Clone + Send + Sync + 'static> Drop for ClusterWorkerRegistration<M> {
    fn drop(&mut self) {
        self.workers.withdraw(&self.service, self.worker);
    }
}

/// A producer's way to a worker on this node: it notes that the producer is local, so the
/// worker's answers stay on this node. It holds the hub weakly: the hub's own published map
/// holds it.
struct LocalWorker<M> {
    hub: Weak<Mutex<Hub<M>>>,
    me: NodeAddr,
    service: String,
    worker: u64,
}

impl<M: Send + Sync + 'static> Link<SequencedMessage<M>> for LocalWorker<M> {
    fn send(&self, message: SequencedMessage<M>) {
        if let Some(hub) = self.hub.upgrade() {
            let mut hub = hub.lock().unwrap_or_else(PoisonError::into_inner);
            hub.deliver_to_local_worker(&self.service, self.worker, self.me.clone(), message);
        }
    }
}

/// A producer's way to a worker on another node.
struct RemoteWorker<M> {
    outbox: Outbox<WorkMsg<M>>,
    node: NodeAddr,
    service: String,
    worker: u64,
}

impl<M: Send + Sync + 'static> Link<SequencedMessage<M>> for RemoteWorker<M> {
    fn send(&self, message: SequencedMessage<M>) {
        let message = WorkMsg::ToWorker {
            service: self.service.clone(),
            worker: self.worker,
            message,
        };
        (self.outbox)(&self.node, message);
    }
}

/// A worker's way back to whichever producer sent to it.
struct WorkerToProducer<M> {
    workers: ClusterWorkers<M>,
    service: String,
}

impl<M: Clone + Send + Sync + 'static> Link<FromConsumer<M>> for WorkerToProducer<M> {
    fn send(&self, frame: FromConsumer<M>) {
        let node = {
            let hub = self.workers.lock();
            hub.services
                .get(&self.service)
                .and_then(|s| s.producer_nodes.get(&frame.to.id))
                .cloned()
        };
        // A producer not heard from yet cannot be answered; it resends.
        let Some(node) = node else { return };
        let message = WorkMsg::ToProducer {
            service: self.service.clone(),
            to: frame.to,
            frame: frame.frame,
        };
        if node == self.workers.me {
            self.workers.handle(node, message);
        } else {
            (self.workers.outbox)(&node, message);
        }
    }
}

#[cfg(test)]
mod tests;
