//! One singleton's decisions on one node, sans IO. The singleton runs where its [`Placement`]
//! puts it: the oldest Up member with its role, or for a ranked singleton the member at its
//! rank in age order, so several singletons of one role spread over the members. A node that
//! sees itself there is the candidate: before it starts the instance it asks every other live
//! member with the role to release it, and starts once all of them said so (or went Down). A
//! node that is no longer the candidate stops its instance if it runs one, and releases once it
//! has stopped. A candidate releases to nobody, so within one view
//! two instances never run: the new one starts only after the old one stopped (graceful
//! handover) or its node is Down (takeover).
//!
//! Inputs: [`SingletonCore::handle_view`], [`SingletonCore::handle_message`],
//! [`SingletonCore::handle_stopped`], [`SingletonCore::handle_timeout`]. Outputs, drained after
//! every input: [`SingletonCore::poll_transmit`] (messages to nodes),
//! [`SingletonCore::poll_event`] (start or stop the instance), [`SingletonCore::poll_timeout`].

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::cluster::member::{ClusterView, Member, MemberStatus, NodeAddr};

/// Which member runs a singleton: the Up member with `role` at `rank` in age order (oldest
/// first, counting round). Every node computes it from its own view, so all agree once their
/// views do; when members join or leave, ranked singletons may move, each with a handover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Members that may run it (empty: any member).
    pub role: String,
    /// Position among them, oldest first; 0 is the oldest.
    pub rank: usize,
}

impl Placement {
    /// On the oldest Up member with `role`.
    pub fn oldest(role: impl Into<String>) -> Self {
        Placement {
            role: role.into(),
            rank: 0,
        }
    }

    /// The member that should run the singleton in `view`, if any may.
    pub fn host<'v>(&self, view: &'v ClusterView) -> Option<&'v Member> {
        view.nth_oldest_up(&self.role, self.rank)
    }
}

/// What singleton managers say to each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SingletonMsg {
    /// "It is mine to run: release the singleton (stop it if you run it)."
    Ask {
        /// Which singleton.
        singleton: String,
    },
    /// "I do not run it, and will not while it is yours."
    Released {
        /// Which singleton.
        singleton: String,
    },
}

/// What the owner must do with the instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SingletonEvent {
    /// Start the instance here.
    Start,
    /// Stop the instance; report [`SingletonCore::handle_stopped`] once it has.
    Stop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Instance {
    Idle,
    Running,
    Stopping,
}

/// One singleton's state machine on one node.
pub struct SingletonCore {
    name: String,
    placement: Placement,
    me: NodeAddr,
    retry_interval: Duration,
    view: Option<ClusterView>,
    instance: Instance,
    /// Members that released to this node since it became the candidate.
    released: BTreeSet<NodeAddr>,
    /// Members that asked while this node was stopping: they get a release once stopped.
    asked_while_stopping: BTreeSet<NodeAddr>,
    next_ask: Option<Instant>,
    transmits: VecDeque<(NodeAddr, SingletonMsg)>,
    events: VecDeque<SingletonEvent>,
}

impl SingletonCore {
    /// The singleton `name`, placed by `placement`, on node `me`.
    pub fn new(name: &str, placement: Placement, me: NodeAddr, retry_interval: Duration) -> Self {
        SingletonCore {
            name: name.to_owned(),
            placement,
            me,
            retry_interval,
            view: None,
            instance: Instance::Idle,
            released: BTreeSet::new(),
            asked_while_stopping: BTreeSet::new(),
            next_ask: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// This node is where the singleton belongs in its current view.
    pub fn is_candidate(&self) -> bool {
        self.view
            .as_ref()
            .and_then(|v| self.placement.host(v))
            .is_some_and(|m| m.addr == self.me)
    }

    /// The membership view changed.
    pub fn handle_view(&mut self, view: ClusterView, now: Instant) {
        let was_candidate = self.is_candidate();
        self.view = Some(view);
        let candidate = self.is_candidate();
        if candidate && !was_candidate {
            self.released.clear();
            self.next_ask = Some(now);
        }
        if !candidate {
            self.next_ask = None;
            if self.instance == Instance::Running {
                self.stop();
            }
        }
        self.step(now);
    }

    /// A message from another node's manager.
    pub fn handle_message(&mut self, from: NodeAddr, message: SingletonMsg, now: Instant) {
        match message {
            SingletonMsg::Ask { singleton } if singleton == self.name => {
                if self.is_candidate() {
                    // Views disagree for a moment; the asker retries until they agree.
                    return;
                }
                match self.instance {
                    Instance::Idle => self.release_to(from),
                    Instance::Running => {
                        self.stop();
                        self.asked_while_stopping.insert(from);
                    }
                    Instance::Stopping => {
                        self.asked_while_stopping.insert(from);
                    }
                }
            }
            SingletonMsg::Released { singleton }
                if singleton == self.name && self.is_candidate() =>
            {
                self.released.insert(from);
                self.step(now);
            }
            _ => {}
        }
    }

    /// The instance stopped after a [`SingletonEvent::Stop`] (or ended on its own).
    pub fn handle_stopped(&mut self, now: Instant) {
        self.instance = Instance::Idle;
        let asked: Vec<NodeAddr> = std::mem::take(&mut self.asked_while_stopping)
            .into_iter()
            .collect();
        if !self.is_candidate() {
            for asker in asked {
                self.release_to(asker);
            }
        }
        self.step(now);
    }

    /// Time passed: repeat the questions not answered yet.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_ask.is_some_and(|at| at <= now) {
            self.step(now);
        }
    }

    /// The next message to send.
    pub fn poll_transmit(&mut self) -> Option<(NodeAddr, SingletonMsg)> {
        self.transmits.pop_front()
    }

    /// The next thing to do with the instance.
    pub fn poll_event(&mut self) -> Option<SingletonEvent> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_ask
    }

    /// Members that must release before this node may start: every live member with the
    /// role except this one.
    fn holders_to_hear_from(&self) -> Vec<NodeAddr> {
        let Some(view) = &self.view else {
            return Vec::new();
        };
        view.members
            .values()
            .filter(|m| {
                m.addr != self.me
                    && m.status != MemberStatus::Down
                    && m.has_role(&self.placement.role)
            })
            .map(|m| m.addr.clone())
            .filter(|addr| !self.released.contains(addr))
            .collect()
    }

    fn step(&mut self, now: Instant) {
        if !self.is_candidate() || self.instance != Instance::Idle {
            if self.instance == Instance::Running {
                self.next_ask = None;
            }
            return;
        }
        let waiting = self.holders_to_hear_from();
        if waiting.is_empty() {
            self.instance = Instance::Running;
            self.next_ask = None;
            self.events.push_back(SingletonEvent::Start);
            return;
        }
        if self.next_ask.is_none_or(|at| at <= now) {
            for holder in waiting {
                self.transmits.push_back((
                    holder,
                    SingletonMsg::Ask {
                        singleton: self.name.clone(),
                    },
                ));
            }
            self.next_ask = Some(now + self.retry_interval);
        }
    }

    fn stop(&mut self) {
        self.instance = Instance::Stopping;
        self.events.push_back(SingletonEvent::Stop);
    }

    fn release_to(&mut self, to: NodeAddr) {
        self.transmits.push_back((
            to,
            SingletonMsg::Released {
                singleton: self.name.clone(),
            },
        ));
    }
}
