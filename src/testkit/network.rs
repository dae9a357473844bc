//! An in-memory network of cluster nodes for multi-node tests in one process: every node gets
//! an inbox and an [`Outbox`]; messages between different nodes suffer seeded faults (the
//! delivery suite's [`Faults`]: drops, duplicates, delays that reorder), a crashed node
//! neither sends nor receives, and a partition cuts chosen pairs. A message to oneself is
//! never faulty, like the transport's short way.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use crate::cluster::member::NodeAddr;
use crate::cluster::transport::{Inbound, Outbox, SendOutcome};
use crate::delivery::driver::Faults;

struct State<M> {
    inboxes: HashMap<NodeAddr, mpsc::Sender<Inbound<M>>>,
    cut: HashSet<(NodeAddr, NodeAddr)>,
    faults: Faults,
    rng: SmallRng,
}

/// The network; cheap to clone.
pub struct SimNetwork<M> {
    state: Arc<Mutex<State<M>>>,
}

impl<M> Clone for SimNetwork<M> {
    fn clone(&self) -> Self {
        SimNetwork {
            state: Arc::clone(&self.state),
        }
    }
}

impl<M: Clone + Send + 'static> SimNetwork<M> {
    /// A network whose faults are drawn from `seed`.
    pub fn new(faults: Faults, seed: u64) -> Self {
        SimNetwork {
            state: Arc::new(Mutex::new(State {
                inboxes: HashMap::new(),
                cut: HashSet::new(),
                faults,
                rng: SmallRng::seed_from_u64(seed),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<M>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connects `node`; returns its inbox (capacity `capacity`) and outbox.
    pub fn join(
        &self,
        node: &NodeAddr,
        capacity: usize,
    ) -> (mpsc::Receiver<Inbound<M>>, Outbox<M>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.lock().inboxes.insert(node.clone(), tx);
        (rx, self.outbox(node.clone()))
    }

    /// An outbox for messages from `from`.
    pub fn outbox(&self, from: NodeAddr) -> Outbox<M> {
        let network = self.clone();
        Arc::new(move |to: &NodeAddr, message: M| network.send(&from, to, message))
    }

    /// The node is gone: nothing reaches it, nothing it sends arrives.
    pub fn crash(&self, node: &NodeAddr) {
        self.lock().inboxes.remove(node);
    }

    /// Cuts (or with `false`, mends) the link between `a` and `b`, both ways.
    pub fn partition(&self, a: &NodeAddr, b: &NodeAddr, cut: bool) {
        let mut state = self.lock();
        for pair in [(a.clone(), b.clone()), (b.clone(), a.clone())] {
            if cut {
                state.cut.insert(pair);
            } else {
                state.cut.remove(&pair);
            }
        }
    }

    fn send(&self, from: &NodeAddr, to: &NodeAddr, message: M) -> SendOutcome {
        let (inbox, lost, copies, delay) = {
            let mut state = self.lock();
            if !state.inboxes.contains_key(from) || state.cut.contains(&(from.clone(), to.clone()))
            {
                return SendOutcome::Queued;
            }
            let Some(inbox) = state.inboxes.get(to).cloned() else {
                return SendOutcome::NoRoute;
            };
            if from == to {
                (inbox, false, 1, None)
            } else {
                let faults = state.faults;
                let lost = state.rng.random_bool(faults.drop);
                let copies = if state.rng.random_bool(faults.duplicate) {
                    2
                } else {
                    1
                };
                let delay = state
                    .rng
                    .random_bool(faults.delay)
                    .then(|| faults.max_delay.mul_f64(state.rng.random::<f64>()));
                (inbox, lost, copies, delay)
            }
        };
        if lost {
            return SendOutcome::Queued;
        }
        for _ in 0..copies {
            let inbound = Inbound {
                from: from.clone(),
                message: message.clone(),
            };
            match delay {
                Some(pause) => {
                    let inbox = inbox.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(pause).await;
                        let _ = inbox.try_send(inbound);
                    });
                }
                None => {
                    if inbox.try_send(inbound).is_err() {
                        return SendOutcome::QueueFull;
                    }
                }
            }
        }
        SendOutcome::Queued
    }
}
