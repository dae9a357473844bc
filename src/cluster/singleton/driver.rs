//! Runs singleton instances as the cores decide: one task owns every singleton core of the
//! node, feeds them views, messages and timers, and starts or cancels the instances. An
//! instance is a future that runs until its cancellation token fires (handover, leave) and
//! then winds down; the next oldest node starts its own only after this one has returned.
//! An instance that ends on its own is restarted after a growing pause.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::cluster::context::NodeContext;
use crate::cluster::member::ClusterView;
use crate::cluster::metrics::ClusterMetrics;
use crate::cluster::singleton::core::{Placement, SingletonCore, SingletonEvent, SingletonMsg};
use crate::cluster::transport::{Inbound, Outbox};
use crate::timer::sleep_until;

/// Starts one instance of a singleton; it must return soon after its token is cancelled.
pub type SingletonFactory =
    Arc<dyn Fn(CancellationToken) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A singleton to run somewhere in the cluster.
#[derive(Clone)]
pub struct SingletonSpec {
    /// Unique in the cluster; a metric label, so keep it short.
    pub name: String,
    /// Which member runs it.
    pub placement: Placement,
    /// Starts the instance.
    pub factory: SingletonFactory,
}

impl SingletonSpec {
    /// A singleton named `name` that runs on the oldest Up member with `role`; each instance
    /// is `run(stop)`, which must return soon after `stop` is cancelled.
    pub fn new<F, Fut>(name: impl Into<String>, role: impl Into<String>, run: F) -> Self
    where
        F: Fn(CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        SingletonSpec {
            name: name.into(),
            placement: Placement::oldest(role),
            factory: Arc::new(move |stop| Box::pin(run(stop))),
        }
    }

    /// Runs on the member at `rank` among those with the role (oldest first) instead of the
    /// oldest: singletons of one role given ranks 0 … k−1 run on k different members while
    /// there are that many.
    pub fn at_rank(mut self, rank: usize) -> Self {
        self.placement.rank = rank;
        self
    }
}

/// How singletons hand over.
#[derive(Clone, Debug)]
pub struct SingletonSettings {
    /// Unanswered release requests are repeated this often.
    pub retry_interval: Duration,
    /// First pause before restarting an instance that ended on its own; doubles up to 30 s.
    pub restart_pause: Duration,
}

impl Default for SingletonSettings {
    fn default() -> Self {
        SingletonSettings {
            retry_interval: Duration::from_millis(500),
            restart_pause: Duration::from_secs(1),
        }
    }
}

/// What runs where, as seen from this node.
#[derive(Clone)]
pub struct SingletonHandle {
    running: watch::Receiver<BTreeSet<String>>,
    stopped: CancellationToken,
}

impl SingletonHandle {
    /// Singletons running on this node now, updated as they start and stop.
    pub fn running(&self) -> watch::Receiver<BTreeSet<String>> {
        self.running.clone()
    }

    /// Waits until the manager has stopped every instance and exited.
    pub async fn stopped(&self) {
        self.stopped.cancelled().await;
    }
}

struct Slot {
    spec: SingletonSpec,
    core: SingletonCore,
    cancel: Option<CancellationToken>,
    /// Consecutive ends on its own, for the restart pause.
    failures: u32,
    /// An unexpected end waits here until its restart pause has passed.
    stopped_at: Option<Instant>,
}

/// Starts the manager of `specs` on `node`, talking to the other nodes' managers through
/// `outbox` and `inbox`. It stops every instance and exits when the node stops.
pub fn spawn(
    node: &NodeContext,
    specs: Vec<SingletonSpec>,
    outbox: Outbox<SingletonMsg>,
    inbox: mpsc::Receiver<Inbound<SingletonMsg>>,
    settings: SingletonSettings,
) -> SingletonHandle {
    let (me, metrics) = (&node.me, node.metrics.clone());
    let (running_tx, running) = watch::channel(BTreeSet::new());
    let stopped = CancellationToken::new();
    let slots = specs
        .into_iter()
        .map(|spec| {
            let core = SingletonCore::new(
                &spec.name,
                spec.placement.clone(),
                me.clone(),
                settings.retry_interval,
            );
            metrics
                .singleton_active
                .with_label_values(&[spec.name.as_str()])
                .set(0);
            (
                spec.name.clone(),
                Slot {
                    spec,
                    core,
                    cancel: None,
                    failures: 0,
                    stopped_at: None,
                },
            )
        })
        .collect();
    let manager = Manager {
        slots,
        outbox,
        settings,
        metrics,
        running: running_tx,
        instances: FuturesUnordered::new(),
    };
    tokio::spawn(manager.run(
        node.view.clone(),
        inbox,
        node.part_shutdown(),
        stopped.clone(),
    ));
    SingletonHandle { running, stopped }
}

type InstanceEnd = Pin<Box<dyn Future<Output = (String, bool)> + Send>>;

struct Manager {
    slots: BTreeMap<String, Slot>,
    outbox: Outbox<SingletonMsg>,
    settings: SingletonSettings,
    metrics: ClusterMetrics,
    running: watch::Sender<BTreeSet<String>>,
    /// Running instances; each yields its name and whether it was asked to stop.
    instances: FuturesUnordered<InstanceEnd>,
}

impl Manager {
    async fn run(
        mut self,
        mut view: watch::Receiver<ClusterView>,
        mut inbox: mpsc::Receiver<Inbound<SingletonMsg>>,
        shutdown: CancellationToken,
        stopped: CancellationToken,
    ) {
        let now = Instant::now();
        let first = view.borrow_and_update().clone();
        for slot in self.slots.values_mut() {
            slot.core.handle_view(first.clone(), now);
        }
        self.drain();
        loop {
            let wake_at = self.wake_at();
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = view.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = view.borrow_and_update().clone();
                    let now = Instant::now();
                    for slot in self.slots.values_mut() {
                        slot.core.handle_view(current.clone(), now);
                    }
                }
                Some(inbound) = inbox.recv() => {
                    let name = match &inbound.message {
                        SingletonMsg::Ask { singleton } | SingletonMsg::Released { singleton } => singleton.clone(),
                    };
                    match (self.slots.get_mut(&name), inbound.message) {
                        (Some(slot), message) => {
                            slot.core.handle_message(inbound.from, message, Instant::now());
                        }
                        // A singleton this node does not have (another configuration, such as
                        // more partitions) never runs here: release it, or its candidate would
                        // wait for this node forever.
                        (None, SingletonMsg::Ask { singleton }) => {
                            (self.outbox)(&inbound.from, SingletonMsg::Released { singleton });
                        }
                        (None, SingletonMsg::Released { .. }) => {}
                    }
                }
                Some((name, asked)) = self.instances.next(), if !self.instances.is_empty() => {
                    self.on_instance_end(&name, asked);
                }
                _ = sleep_until(wake_at) => {
                    self.on_timeout();
                }
            }
            self.drain();
        }
        // Stop what runs here and wait for it: the next holder must not overlap with it.
        for slot in self.slots.values_mut() {
            if let Some(cancel) = slot.cancel.take() {
                cancel.cancel();
            }
        }
        while self.instances.next().await.is_some() {}
        for name in self.slots.keys() {
            self.metrics
                .singleton_active
                .with_label_values(&[name.as_str()])
                .set(0);
        }
        self.running.send_replace(BTreeSet::new());
        stopped.cancel();
    }

    fn wake_at(&self) -> Option<Instant> {
        self.slots
            .values()
            .flat_map(|slot| [slot.core.poll_timeout(), slot.stopped_at])
            .flatten()
            .min()
    }

    fn on_timeout(&mut self) {
        let now = Instant::now();
        for slot in self.slots.values_mut() {
            if slot.stopped_at.is_some_and(|at| at <= now) {
                slot.stopped_at = None;
                slot.core.handle_stopped(now);
            }
            slot.core.handle_timeout(now);
        }
    }

    fn on_instance_end(&mut self, name: &str, asked: bool) {
        let Some(slot) = self.slots.get_mut(name) else {
            return;
        };
        slot.cancel = None;
        self.metrics
            .singleton_active
            .with_label_values(&[name])
            .set(0);
        self.running.send_modify(|running| {
            running.remove(name);
        });
        let now = Instant::now();
        if asked {
            info!(singleton = name, "singleton stopped");
            slot.failures = 0;
            slot.core.handle_stopped(now);
        } else {
            // Ended on its own: the core still counts it as running until the pause is over,
            // so no other node starts one meanwhile either.
            slot.failures = slot.failures.saturating_add(1);
            let pause = self
                .settings
                .restart_pause
                .saturating_mul(1 << slot.failures.min(5))
                .min(Duration::from_secs(30));
            warn!(
                singleton = name,
                ?pause,
                "singleton ended on its own; restarting after a pause"
            );
            slot.stopped_at = Some(now + pause);
        }
    }

    /// Moves every core output to where it goes, until there is none.
    fn drain(&mut self) {
        while self.drain_once() {}
    }

    fn drain_once(&mut self) -> bool {
        let mut moved = false;
        for (name, slot) in self.slots.iter_mut() {
            while let Some((to, message)) = slot.core.poll_transmit() {
                (self.outbox)(&to, message);
            }
            while let Some(event) = slot.core.poll_event() {
                moved = true;
                match event {
                    SingletonEvent::Start => {
                        info!(singleton = %name, "singleton starting here");
                        let cancel = CancellationToken::new();
                        let instance = tokio::spawn((slot.spec.factory)(cancel.clone()));
                        let token = cancel.clone();
                        let name = name.clone();
                        self.instances.push(Box::pin(async move {
                            // A panic counts as ending on its own.
                            let _ = instance.await;
                            (name, token.is_cancelled())
                        }));
                        slot.cancel = Some(cancel);
                        self.metrics
                            .singleton_active
                            .with_label_values(&[slot.spec.name.as_str()])
                            .set(1);
                        self.running.send_modify(|running| {
                            running.insert(slot.spec.name.clone());
                        });
                    }
                    SingletonEvent::Stop => {
                        info!(singleton = %name, "singleton handing over");
                        match &slot.cancel {
                            Some(cancel) => cancel.cancel(),
                            // It already ended on its own and waits out its pause.
                            None => {
                                slot.stopped_at = None;
                                slot.core.handle_stopped(Instant::now());
                            }
                        }
                    }
                }
            }
        }
        moved
    }
}
