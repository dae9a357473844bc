//! Work-pulling scenarios (docs/protocol.md, Test scenarios: WP-*, DWP-*, ESWP-*, D-10, D-14), with
//! the workers played by real ConsumerController cores.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::*;
use crate::delivery::consumer::{ConsumerController, ConsumerEvent};
use crate::delivery::durable::{accept_confirmed, accept_message_sent};
use crate::delivery::settings::ConsumerSettings;

type Wp = WorkPullingProducerController<u32, u32, &'static str>;

struct Harness {
    wp: Wp,
    workers: BTreeMap<&'static str, ConsumerController<u32>>,
    /// Workers that confirm each delivery at once.
    auto_confirm: HashSet<&'static str>,
    /// Deliveries waiting for a manual confirmation, per worker.
    outstanding: BTreeMap<&'static str, u32>,
    store: Option<DurableState<u32>>,
    now: Instant,
    received: Vec<(&'static str, u32)>,
    replies: Vec<u32>,
    request_nexts: usize,
    wire_acks: Vec<bool>,
    /// Store requests wait here instead of being answered, while set.
    hold_stores: bool,
    held: Vec<StoreRequest<u32>>,
}

impl Harness {
    fn new(buffer_size: usize) -> Self {
        Self::with(
            Wp::new(
                ProducerId::new("wp"),
                ProducerSettings::default(),
                buffer_size,
                7,
            )
            .unwrap(),
            None,
        )
    }

    fn durable(store: DurableState<u32>) -> Self {
        let wp = Wp::with_durable_queue(ProducerId::new("wp"), ProducerSettings::default(), 100, 7)
            .unwrap();
        Self::with(wp, Some(store))
    }

    fn with(mut wp: Wp, store: Option<DurableState<u32>>) -> Self {
        let now = Instant::now();
        wp.start(now);
        let mut harness = Harness {
            wp,
            workers: BTreeMap::new(),
            auto_confirm: HashSet::new(),
            outstanding: BTreeMap::new(),
            store,
            now,
            received: Vec::new(),
            replies: Vec::new(),
            request_nexts: 0,
            wire_acks: Vec::new(),
            hold_stores: false,
            held: Vec::new(),
        };
        harness.pump();
        harness
    }

    fn join(&mut self, worker: &'static str, auto: bool, window: u32) {
        let settings = ConsumerSettings {
            flow_control_window: window,
            ..ConsumerSettings::default()
        };
        let mut cc = ConsumerController::new(settings, self.now);
        cc.start(self.now);
        self.workers.insert(worker, cc);
        if auto {
            self.auto_confirm.insert(worker);
        }
        let names: Vec<&'static str> = self.workers.keys().copied().collect();
        self.wp.workers_changed(names, self.now);
        self.pump();
    }

    fn leave(&mut self, worker: &'static str) {
        self.workers.remove(worker);
        self.outstanding.remove(worker);
        let names: Vec<&'static str> = self.workers.keys().copied().collect();
        self.wp.workers_changed(names, self.now);
        self.pump();
    }

    fn send(&mut self, n: u32) {
        self.wp.send_with_confirmation(n, n, self.now).unwrap();
        self.pump();
    }

    fn confirm(&mut self, worker: &'static str) {
        if self.outstanding.remove(worker).is_some()
            && let Some(cc) = self.workers.get_mut(worker)
        {
            cc.confirm(self.now).unwrap();
        }
        self.pump();
    }

    /// Moves frames, events and store requests until nothing moves.
    fn pump(&mut self) {
        loop {
            let mut moved = false;
            while let Some((worker, message)) = self.wp.poll_transmit() {
                moved = true;
                self.wire_acks.push(message.ack);
                if let Some(cc) = self.workers.get_mut(worker) {
                    cc.handle_message(message, self.now);
                }
            }
            let names: Vec<&'static str> = self.workers.keys().copied().collect();
            for worker in names {
                let Some(cc) = self.workers.get_mut(worker) else {
                    continue;
                };
                let mut frames = Vec::new();
                while let Some(frame) = cc.poll_transmit() {
                    frames.push(frame);
                }
                while let Some(event) = cc.poll_event() {
                    if let ConsumerEvent::Deliver(delivery) = event {
                        self.received.push((worker, delivery.message));
                        if self.auto_confirm.contains(worker) {
                            let _ = cc.confirm(self.now);
                            while let Some(frame) = cc.poll_transmit() {
                                frames.push(frame);
                            }
                        } else {
                            self.outstanding.insert(worker, delivery.message);
                        }
                    }
                }
                for (to, frame) in frames {
                    moved = true;
                    self.wp.handle_frame(&to, frame, self.now);
                }
            }
            while let Some(event) = self.wp.poll_event() {
                moved = true;
                match event {
                    WorkPullingEvent::RequestNext => self.request_nexts += 1,
                    WorkPullingEvent::Confirmed { token } => self.replies.push(token),
                }
            }
            while let Some(request) = self.wp.poll_store() {
                moved = true;
                if self.hold_stores {
                    self.held.push(request);
                    continue;
                }
                let store = self.store.as_mut().expect("a durable harness");
                match request {
                    StoreRequest::LoadState { .. } => {
                        let state = store.clone();
                        self.wp.handle_state_loaded(state, self.now);
                    }
                    StoreRequest::StoreMessageSent { sent, .. } => {
                        let seq_nr = sent.seq_nr;
                        accept_message_sent(store, sent).unwrap();
                        self.wp.handle_message_stored(seq_nr, self.now);
                    }
                    StoreRequest::StoreMessageConfirmed { seq_nr, qualifier } => {
                        accept_confirmed(store, seq_nr, &qualifier, 0);
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    /// A new controller from the stored state, with the same workers (and their consumers).
    fn restart(&mut self) {
        let mut wp =
            Wp::with_durable_queue(ProducerId::new("wp"), ProducerSettings::default(), 100, 8)
                .unwrap();
        wp.start(self.now);
        self.wp = wp;
        self.request_nexts = 0;
        self.pump();
        let names: Vec<&'static str> = self.workers.keys().copied().collect();
        self.wp.workers_changed(names, self.now);
        self.pump();
    }

    /// Answers the held store requests, in order, and stops holding.
    fn release_stores(&mut self) {
        self.hold_stores = false;
        let store = self.store.as_mut().expect("a durable harness");
        for request in std::mem::take(&mut self.held) {
            if let StoreRequest::StoreMessageSent { sent, .. } = request {
                let seq_nr = sent.seq_nr;
                accept_message_sent(store, sent).unwrap();
                self.wp.handle_message_stored(seq_nr, self.now);
            }
        }
        self.pump();
    }

    fn messages_for(&self, worker: &str) -> Vec<u32> {
        self.received
            .iter()
            .filter(|(w, _)| *w == worker)
            .map(|(_, m)| *m)
            .collect()
    }

    fn store(&self) -> &DurableState<u32> {
        self.store.as_ref().expect("a durable harness")
    }
}

fn stored(seq_nr: u64, message: u32, qualifier: &str) -> MessageSent<u32> {
    MessageSent {
        seq_nr: SeqNr(seq_nr),
        payload: Payload::Message(message),
        ack: false,
        qualifier: qualifier.into(),
        timestamp_millis: 0,
    }
}

// WP-01
#[test]
fn two_workers_share_the_work_and_every_message_is_processed_once() {
    let mut h = Harness::new(100);
    h.join("w1", true, 20);
    h.join("w2", true, 20);
    for n in 1..=84 {
        assert!(h.request_nexts >= n as usize, "demand before message {n}");
        h.send(n);
    }
    let mut all: Vec<u32> = h.received.iter().map(|(_, m)| *m).collect();
    all.sort();
    assert_eq!(all, (1..=84).collect::<Vec<_>>());
    assert!(!h.messages_for("w1").is_empty() && !h.messages_for("w2").is_empty());
    assert_eq!(h.replies.len(), 84);
    h.leave("w1");
    h.leave("w2");
    assert_eq!(h.wp.worker_count(), 0);
}

// WP-02
#[test]
fn a_departing_worker_hands_its_unconfirmed_messages_to_another() {
    let mut h = Harness::new(100);
    h.join("w1", false, 20);
    h.send(1);
    h.confirm("w1");
    h.send(2);
    h.send(3);
    h.join("w2", false, 20);
    h.leave("w1");
    // w2 gets message 2 as its first, then 3 once it confirmed 2.
    assert_eq!(h.messages_for("w2"), vec![2]);
    h.confirm("w2");
    assert_eq!(h.messages_for("w2"), vec![2, 3]);
    h.confirm("w2");
    h.send(4);
    assert_eq!(h.messages_for("w2"), vec![2, 3, 4]);
}

// WP-03
#[test]
fn replies_come_only_after_the_worker_confirmed_and_every_frame_asks_for_an_ack() {
    let mut h = Harness::new(100);
    h.join("w1", false, 20);
    h.send(1);
    assert!(h.replies.is_empty());
    h.confirm("w1");
    assert_eq!(h.replies, vec![1]);
    h.send(2);
    h.send(3);
    h.confirm("w1");
    h.confirm("w1");
    assert_eq!(h.replies, vec![1, 2, 3]);
    assert!(h.wire_acks.iter().all(|ack| *ack));
}

// WP-04
#[test]
fn replies_for_a_departed_workers_messages_come_from_the_next_worker() {
    let mut h = Harness::new(100);
    h.join("w1", false, 20);
    for n in 1..=2 {
        h.send(n);
        h.confirm("w1");
    }
    h.send(3);
    h.send(4);
    h.join("w2", false, 20);
    h.leave("w1");
    assert_eq!(h.replies, vec![1, 2], "no reply for 3 and 4 yet");
    h.confirm("w2");
    assert_eq!(h.replies, vec![1, 2, 3]);
    h.confirm("w2");
    assert_eq!(h.replies, vec![1, 2, 3, 4]);
}

// WP-05
#[test]
fn a_restarted_producer_gets_the_pending_request_again() {
    let mut h = Harness::new(100);
    h.join("w1", true, 20);
    let before = h.request_nexts;
    h.wp.start(h.now);
    h.pump();
    assert_eq!(h.request_nexts, before + 1);
    h.send(1);
    assert_eq!(h.messages_for("w1"), vec![1]);
}

// D-10: a departed worker's messages wait in the buffer beyond its size (failing would lose
// them); a new message that finds the buffer full fails the controller.
#[test]
fn more_waiting_messages_than_the_buffer_holds_fails_the_controller() {
    let mut h = Harness::new(2);
    h.join("w1", false, 20);
    for n in 1..=3 {
        h.send(n);
    }
    h.leave("w1");
    assert_eq!(h.wp.failure(), None, "re-routed messages are kept");
    assert_eq!(h.wp.buffered(), 3);
    assert_eq!(
        h.wp.send(4, h.now),
        Err(WorkPullingError::BufferFull(2)),
        "the producer still held a RequestNext"
    );
}

// D-14
#[test]
fn a_message_without_demand_fails_the_controller() {
    let mut h = Harness::new(100);
    assert_eq!(h.wp.send(1, h.now), Err(WorkPullingError::NoDemand));
    assert!(h.wp.failure().is_some());
}

// D-14: worker stats follow the registry
#[test]
fn worker_stats_follow_the_registry() {
    let mut h = Harness::new(100);
    h.join("w1", true, 20);
    h.join("w2", true, 20);
    assert_eq!(h.wp.worker_count(), 2);
    h.leave("w1");
    assert_eq!(h.wp.worker_count(), 1);
}

#[test]
fn chunking_is_refused() {
    let settings = ProducerSettings {
        chunk_large_messages: Some(8),
        ..ProducerSettings::default()
    };
    assert!(matches!(
        Wp::new(ProducerId::new("wp"), settings, 10, 1),
        Err(WorkPullingError::ChunkingUnsupported)
    ));
}

// DWP-01
#[test]
fn a_durable_controller_resends_stored_messages_before_asking_for_more() {
    let mut store = DurableState {
        current_seq_nr: SeqNr(5),
        highest_confirmed_seq_nr: SeqNr(2),
        ..DurableState::default()
    };
    store
        .unconfirmed
        .extend([stored(3, 3, "wp-old"), stored(4, 4, "wp-old")]);
    let mut h = Harness::durable(store);
    assert_eq!(
        h.request_nexts, 0,
        "nothing before the stored messages went out"
    );
    h.join("w1", false, 20);
    // Message 3 first; 4 goes out when the worker's Request opens its window, and only then
    // does the producer get demand.
    assert_eq!(h.messages_for("w1"), vec![3]);
    assert_eq!(h.wire_acks.len(), 2);
    assert_eq!(h.request_nexts, 1);
    h.confirm("w1");
    assert_eq!(h.messages_for("w1"), vec![3, 4]);
    h.confirm("w1");
    // The hand-over: re-stored under the new worker, the old records confirmed.
    assert!(h.store().unconfirmed.is_empty());
    assert_eq!(h.store().current_seq_nr, SeqNr(7));
}

// DWP-02
#[test]
fn with_a_durable_queue_the_reply_comes_after_storage() {
    let mut h = Harness::durable(DurableState::default());
    h.join("w1", false, 20);
    h.hold_stores = true;
    h.send(1);
    assert_eq!(h.held.len(), 1, "message 1 is being stored");
    assert!(h.replies.is_empty(), "no reply before it is stored");
    assert!(
        h.messages_for("w1").is_empty(),
        "not sent before it is stored"
    );
    h.release_stores();
    assert_eq!(h.store().current_seq_nr, SeqNr(2), "stored");
    assert_eq!(h.messages_for("w1"), vec![1]);
    assert_eq!(h.replies, vec![1], "before the worker confirmed");
    assert!(h.wire_acks.iter().all(|ack| *ack));
    h.confirm("w1");
    assert_eq!(h.replies, vec![1], "no second reply");
}

// DWP-03
#[test]
fn a_durable_controller_stores_confirmations_per_worker() {
    let mut h = Harness::durable(DurableState::default());
    h.join("w1", false, 20);
    for n in 1..=3 {
        h.send(n);
    }
    assert_eq!(h.store().unconfirmed.len(), 3);
    h.confirm("w1");
    h.confirm("w1");
    let store = h.store();
    assert_eq!(store.highest_confirmed_seq_nr, SeqNr(2));
    assert_eq!(
        store
            .unconfirmed
            .iter()
            .map(|m| m.seq_nr.0)
            .collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(store.confirmed.len(), 1, "one qualifier: w1's controller");
}

// DWP-04
#[test]
fn a_departing_workers_messages_are_handed_over_in_the_durable_queue() {
    let mut h = Harness::durable(DurableState::default());
    h.join("w1", false, 20);
    for n in 1..=5 {
        h.send(n);
    }
    h.confirm("w1");
    let w1_qualifier = h.store().unconfirmed[0].qualifier.clone();
    h.join("w2", true, 20);
    h.leave("w1");
    let mut moved = h.messages_for("w2");
    moved.sort();
    assert!(moved.starts_with(&[2, 3, 4, 5]), "w2 got {moved:?}");
    let store = h.store();
    assert!(
        store
            .unconfirmed
            .iter()
            .all(|m| m.qualifier != w1_qualifier),
        "w1's records were confirmed once re-stored: {:?}",
        store.unconfirmed
    );
    assert!(store.unconfirmed.is_empty(), "w2 confirmed everything");
    assert_eq!(store.current_seq_nr, SeqNr(10), "2..5 re-stored as 6..9");
}

// A worker that leaves and comes back at the same address while its message is being stored
// is a new incarnation: the message is handed over (stored again under the new qualifier, the
// old record confirmed), so no record is left behind to be redelivered after a restart.
#[test]
fn a_worker_back_at_the_same_address_gets_its_stored_message_as_a_hand_over() {
    let mut h = Harness::durable(DurableState::default());
    h.join("w1", true, 20);
    h.hold_stores = true;
    h.send(1);
    assert_eq!(h.held.len(), 1, "message 1 is being stored");
    h.leave("w1");
    h.join("w1", true, 20);
    h.release_stores();
    assert_eq!(h.messages_for("w1"), vec![1]);
    assert_eq!(h.replies, vec![1]);
    assert!(
        h.store().unconfirmed.is_empty(),
        "no record left behind: {:?}",
        h.store().unconfirmed
    );
}

// ESWP-01 and ESWP-03: a restart with several workers resends everything, one RequestNext.
#[test]
fn after_a_restart_several_workers_get_everything_and_the_producer_one_request() {
    let mut h = Harness::durable(DurableState::default());
    h.join("w1", false, 20);
    h.join("w2", false, 20);
    h.join("w3", true, 20);
    for n in 1..=15 {
        h.send(n);
    }
    for _ in 0..3 {
        h.confirm("w1");
        h.confirm("w2");
    }
    let store = h.store().clone();
    let pending: HashSet<u32> = store
        .unconfirmed
        .iter()
        .filter_map(|m| match &m.payload {
            Payload::Message(n) => Some(*n),
            Payload::Chunk(_) => None,
        })
        .collect();
    assert!(!pending.is_empty(), "w1 and w2 still held messages");
    let mut h = Harness::durable(store);
    h.join("w4", true, 20);
    h.join("w5", true, 20);
    assert_eq!(h.request_nexts, 1, "exactly one RequestNext (akka #29854)");
    for n in 16..=20 {
        h.send(n);
    }
    let got: HashSet<u32> = h.received.iter().map(|(_, m)| *m).collect();
    assert!(
        got.is_superset(&pending),
        "everything unconfirmed is delivered again: {got:?}"
    );
    assert!(
        got.is_superset(&(16..=20).collect()),
        "and the new ones: {got:?}"
    );
    assert!(h.store().unconfirmed.is_empty());
}

#[test]
fn a_lost_frame_to_a_worker_is_recovered_by_its_controllers_timers() {
    let mut h = Harness::new(100);
    h.join("w1", true, 20);
    h.wp.send_with_confirmation(1, 1, h.now).unwrap();
    // Lose the frame.
    assert!(h.wp.poll_transmit().is_some());
    h.pump();
    assert!(h.received.is_empty());
    h.now += Duration::from_secs(1);
    h.wp.handle_timeout(h.now);
    h.pump();
    assert_eq!(h.messages_for("w1"), vec![1]);
}

// ESWP-02
#[test]
fn after_a_restart_the_same_worker_gets_the_old_messages_again_then_the_new() {
    let mut h = Harness::durable(DurableState::default());
    h.join("w1", false, 20);
    for n in 1..=3 {
        h.send(n);
    }
    assert_eq!(
        h.messages_for("w1"),
        vec![1],
        "2 and 3 wait in w1's consumer"
    );
    h.restart();
    // w1 works through what the old controller sent (those confirmations reach nobody and
    // are not stored), then the new controller's copies (1 again: at-least-once).
    for _ in 0..6 {
        h.confirm("w1");
    }
    assert_eq!(h.request_nexts, 1, "one RequestNext after the restart");
    h.send(4);
    h.confirm("w1");
    h.send(5);
    h.confirm("w1");
    let got = h.messages_for("w1");
    assert_eq!(&got[..3], &[1, 2, 3]);
    assert_eq!(
        got.iter().filter(|m| **m == 1).count(),
        2,
        "1 again after the restart: {got:?}"
    );
    assert!(got.ends_with(&[4, 5]), "{got:?}");
    assert!(h.store().unconfirmed.is_empty());
}
