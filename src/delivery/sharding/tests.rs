//! Sharded delivery scenarios (docs/protocol.md, Test scenarios: SH-*, DSH-*) on the cores: a
//! ShardingProducerController and one ShardingConsumerController per entity, the region
//! played by the harness (it hands each message to its entity), on the harness's own clock.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::delivery::durable::{DurableState, accept_confirmed, accept_message_sent};
use crate::delivery::durable::{StoreClient, StoreRequest};
use crate::delivery::protocol::{ConsumerFrame, ProducerId, SeqNr, SequencedMessage};
use crate::delivery::settings::{ConsumerSettings, ProducerSettings, ShardingProducerSettings};
use crate::ids::EntityId;
use crate::testkit::Clock;

type Spc = ShardingProducerController<u32, u32>;
/// A RequestNext as names: entities with demand, and (entity, waiting) for the others.
type DemandInfo = (Vec<String>, Vec<(String, usize)>);
type Scc = ShardingConsumerController<u32>;

fn entity(n: u32) -> EntityId {
    EntityId::new(format!("entity-{n}"))
}

fn sharding() -> ShardingProducerSettings {
    ShardingProducerSettings {
        buffer_size: 100,
        cleanup_unused_after: Duration::from_secs(120),
        max_entity_controllers: 100_000,
        resend_first_unconfirmed_idle_timeout: Duration::from_secs(10),
    }
}

fn consumer_settings() -> ConsumerSettings {
    ConsumerSettings {
        flow_control_window: 20,
        ..ConsumerSettings::default()
    }
}

/// What the durable queue does with one store request: it stores at once.
fn answer_store(
    spc: &mut Spc,
    store: &mut DurableState<u32>,
    request: StoreRequest<u32>,
    now: Instant,
) {
    match request {
        StoreRequest::LoadState { .. } => spc.handle_state_loaded(store.clone(), now),
        StoreRequest::StoreMessageSent { sent, .. } => {
            let seq_nr = sent.seq_nr;
            accept_message_sent(store, sent).unwrap();
            spc.handle_message_stored(seq_nr, now);
        }
        StoreRequest::StoreMessageConfirmed { seq_nr, qualifier } => {
            accept_confirmed(store, seq_nr, &qualifier, 0);
        }
    }
}

/// One or more producers, the entities, and what each entity got.
struct Harness {
    producers: BTreeMap<String, Spc>,
    entities: BTreeMap<EntityId, Scc>,
    /// Entities that confirm each delivery at once.
    auto_confirm: bool,
    /// Deliveries not confirmed yet, per entity: (producer id, message).
    outstanding: BTreeMap<EntityId, Vec<(ProducerId, u32)>>,
    received: BTreeMap<EntityId, Vec<(ProducerId, u32)>>,
    events: BTreeMap<String, Vec<ShardingProducerEvent<u32>>>,
    store: Option<DurableState<u32>>,
    /// Messages the region drops (an entity that is not running).
    stopped: BTreeSet<EntityId>,
    /// Store requests wait here instead of being answered, while set.
    hold_stores: bool,
    /// The held requests, with the producer that made each.
    held: Vec<(String, StoreRequest<u32>)>,
    clock: Clock,
}

impl Harness {
    fn new() -> Self {
        Harness {
            producers: BTreeMap::new(),
            entities: BTreeMap::new(),
            auto_confirm: true,
            outstanding: BTreeMap::new(),
            received: BTreeMap::new(),
            events: BTreeMap::new(),
            store: None,
            stopped: BTreeSet::new(),
            hold_stores: false,
            held: Vec::new(),
            clock: Clock::new(),
        }
    }

    fn add_producer(&mut self, id: &str, sharding: ShardingProducerSettings) {
        let mut spc = Spc::new(
            ProducerId::new(id),
            ProducerSettings::default(),
            sharding,
            1,
        )
        .unwrap();
        spc.start(self.clock.now());
        self.producers.insert(id.to_owned(), spc);
        self.pump();
    }

    fn add_durable_producer(&mut self, id: &str, incarnation: u64) {
        let mut spc = Spc::with_durable_queue(
            ProducerId::new(id),
            ProducerSettings::default(),
            sharding(),
            incarnation,
        )
        .unwrap();
        spc.start(self.clock.now());
        self.producers.insert(id.to_owned(), spc);
        self.pump();
    }

    fn spc(&mut self, id: &str) -> &mut Spc {
        self.producers.get_mut(id).unwrap()
    }

    fn send(&mut self, producer: &str, to: u32, message: u32) {
        let now = self.clock.now();
        self.spc(producer).send(entity(to), message, now).unwrap();
        self.pump();
    }

    fn ask(&mut self, producer: &str, to: u32, message: u32) {
        let now = self.clock.now();
        self.spc(producer)
            .send_with_confirmation(entity(to), message, message, now)
            .unwrap();
        self.pump();
    }

    fn confirm(&mut self, to: u32) {
        let e = entity(to);
        let Some(list) = self.outstanding.get_mut(&e) else {
            return;
        };
        if list.is_empty() {
            return;
        }
        let (producer, _) = list.remove(0);
        self.entities
            .get_mut(&e)
            .unwrap()
            .confirm(&producer, self.clock.now())
            .unwrap();
        self.pump();
    }

    /// The entity's consumer side stops (rebalance, crash); the next message starts a new one.
    fn stop_entity(&mut self, to: u32) {
        self.entities.remove(&entity(to));
        self.outstanding.remove(&entity(to));
    }

    fn pump(&mut self) {
        let now = self.clock.now();
        loop {
            let mut moved = false;
            let mut wire: Vec<(String, EntityId, SequencedMessage<u32>)> = Vec::new();
            for (id, spc) in self.producers.iter_mut() {
                while let Some((e, message)) = spc.poll_transmit() {
                    wire.push((id.clone(), e, message));
                }
                while let Some(event) = spc.poll_event() {
                    moved = true;
                    self.events.entry(id.clone()).or_default().push(event);
                }
                while let Some(request) = spc.poll_store() {
                    moved = true;
                    if self.hold_stores {
                        self.held.push((id.clone(), request));
                        continue;
                    }
                    let store = self.store.as_mut().expect("a durable harness");
                    answer_store(spc, store, request, now);
                }
            }
            for (_, e, message) in wire {
                moved = true;
                if self.stopped.contains(&e) {
                    continue;
                }
                let scc = self
                    .entities
                    .entry(e.clone())
                    .or_insert_with(|| Scc::new(consumer_settings()));
                scc.handle_message(message, now);
            }
            for (e, scc) in self.entities.iter_mut() {
                while let Some(delivery) = scc.poll_event() {
                    moved = true;
                    let record = (delivery.producer_id.clone(), delivery.message);
                    self.received
                        .entry(e.clone())
                        .or_default()
                        .push(record.clone());
                    if self.auto_confirm {
                        scc.confirm(&delivery.producer_id, now).unwrap();
                    } else {
                        self.outstanding.entry(e.clone()).or_default().push(record);
                    }
                }
                while let Some((to, frame)) = scc.poll_transmit() {
                    moved = true;
                    for spc in self.producers.values_mut() {
                        spc.handle_frame(e, &to, frame, now);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    /// Answers the held store requests, in order, and stops holding.
    fn release_stores(&mut self) {
        self.hold_stores = false;
        let now = self.clock.now();
        let store = self.store.as_mut().expect("a durable harness");
        for (id, request) in std::mem::take(&mut self.held) {
            let spc = self.producers.get_mut(&id).unwrap();
            answer_store(spc, store, request, now);
        }
        self.pump();
    }

    fn advance(&mut self, by: Duration) {
        let end = self.clock.now() + by;
        while self.clock.now() < end {
            self.clock.advance(Duration::from_millis(100));
            let now = self.clock.now();
            for spc in self.producers.values_mut() {
                spc.handle_timeout(now);
            }
            for scc in self.entities.values_mut() {
                scc.handle_timeout(now);
            }
            self.pump();
        }
    }

    fn got(&self, to: u32) -> Vec<u32> {
        self.received
            .get(&entity(to))
            .map(|r| r.iter().map(|(_, m)| *m).collect())
            .unwrap_or_default()
    }

    fn last_request_next(&self, producer: &str) -> Option<(Vec<String>, BTreeMap<String, usize>)> {
        self.events[producer].iter().rev().find_map(|e| match e {
            ShardingProducerEvent::RequestNext {
                entities_with_demand,
                buffered_for_entities_without_demand,
            } => Some((
                entities_with_demand.iter().map(|e| e.to_string()).collect(),
                buffered_for_entities_without_demand
                    .iter()
                    .map(|(e, n)| (e.to_string(), *n))
                    .collect(),
            )),
            _ => None,
        })
    }

    fn replies(&self, producer: &str) -> Vec<u32> {
        self.events[producer]
            .iter()
            .filter_map(|e| match e {
                ShardingProducerEvent::Confirmed { token } => Some(*token),
                _ => None,
            })
            .collect()
    }
}

// SH-01
#[test]
fn each_entity_processes_its_messages_in_order() {
    let mut h = Harness::new();
    h.add_producer("p", sharding());
    for n in 0..126 {
        h.send("p", n % 3, n);
    }
    for e in 0..3 {
        let expected: Vec<u32> = (0..126).filter(|n| n % 3 == e).collect();
        assert_eq!(h.got(e), expected);
    }
}

// SH-02
#[test]
fn several_producers_reach_the_same_entities_each_through_its_own_controller() {
    let mut h = Harness::new();
    h.add_producer("p1", sharding());
    h.add_producer("p2", sharding());
    for n in 0..3 {
        h.send("p1", n, 100 + n);
        h.send("p2", n, 200 + n);
    }
    for n in 0..3 {
        let producers: BTreeSet<String> = h.received[&entity(n)]
            .iter()
            .map(|(p, _)| p.to_string())
            .collect();
        assert_eq!(
            producers,
            BTreeSet::from([format!("p1-entity-{n}"), format!("p2-entity-{n}")])
        );
        assert_eq!(h.entities[&entity(n)].producers().len(), 2);
    }
}

// SH-03
#[test]
fn asks_are_answered_once_their_entity_confirmed() {
    let mut h = Harness::new();
    h.auto_confirm = false;
    h.add_producer("p", sharding());
    for n in 1..=3 {
        h.ask("p", 0, n);
        h.ask("p", 1, 10 + n);
    }
    assert!(h.replies("p").is_empty());
    for _ in 0..3 {
        h.confirm(0);
    }
    assert_eq!(h.replies("p"), vec![1, 2, 3], "entity-0 finished first");
    for _ in 0..3 {
        h.confirm(1);
    }
    assert_eq!(h.replies("p"), vec![1, 2, 3, 11, 12, 13]);
}

// SH-04: the region is a probe here, so Requests are written by hand.
#[test]
fn request_next_says_which_entities_have_demand_and_what_waits() {
    let now = Instant::now();
    let mut spc = Spc::new(
        ProducerId::new("p"),
        ProducerSettings::default(),
        sharding(),
        1,
    )
    .unwrap();
    spc.start(now);
    let request_nexts = |spc: &mut Spc| -> Vec<DemandInfo> {
        std::iter::from_fn(|| spc.poll_event())
            .filter_map(|e| match e {
                ShardingProducerEvent::RequestNext {
                    entities_with_demand,
                    buffered_for_entities_without_demand,
                } => Some((
                    entities_with_demand.iter().map(|e| e.to_string()).collect(),
                    buffered_for_entities_without_demand
                        .iter()
                        .map(|(e, n)| (e.to_string(), *n))
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    };
    // 1. The initial RequestNext: nothing known.
    assert_eq!(request_nexts(&mut spc), vec![(vec![], vec![])]);
    // 2. To entity-1: pushed at once (first message), no RequestNext until its Request.
    spc.send(entity(1), 1, now).unwrap();
    let (_, first) = spc.poll_transmit().unwrap();
    assert!(request_nexts(&mut spc).is_empty());
    let child = first.producer.clone();
    let request = |confirmed: u64, up_to: u64| ConsumerFrame::Request {
        confirmed: SeqNr(confirmed),
        request_up_to: SeqNr(up_to),
        support_resend: true,
        via_timeout: false,
    };
    // 3. Request(0, 5): demand.
    spc.handle_frame(&entity(1), &child, request(0, 5), now);
    assert_eq!(
        request_nexts(&mut spc),
        vec![(vec!["entity-1".into()], vec![])]
    );
    // 4. 2, 3, 4 keep the demand; 5 uses up the window: no RequestNext.
    for n in 2..=4 {
        spc.send(entity(1), n, now).unwrap();
        assert_eq!(
            request_nexts(&mut spc),
            vec![(vec!["entity-1".into()], vec![])]
        );
    }
    spc.send(entity(1), 5, now).unwrap();
    assert!(request_nexts(&mut spc).is_empty());
    // 5. 6 anyway: buffered.
    spc.send(entity(1), 6, now).unwrap();
    assert_eq!(
        request_nexts(&mut spc),
        vec![(vec![], vec![("entity-1".into(), 1)])]
    );
    // 6. To entity-2: its Request gives it demand.
    spc.send(entity(2), 1, now).unwrap();
    let (_, to_2) = std::iter::from_fn(|| spc.poll_transmit()).last().unwrap();
    assert!(request_nexts(&mut spc).is_empty());
    spc.handle_frame(&entity(2), &to_2.producer, request(0, 5), now);
    assert_eq!(
        request_nexts(&mut spc),
        vec![(vec!["entity-2".into()], vec![("entity-1".into(), 1)])]
    );
    // 7. Request(5, 10) for entity-1: 6 goes out; both have demand, nothing waits.
    spc.handle_frame(&entity(1), &child, request(5, 10), now);
    assert_eq!(
        request_nexts(&mut spc),
        vec![(vec!["entity-1".into(), "entity-2".into()], vec![])]
    );
    assert!(
        std::iter::from_fn(|| spc.poll_transmit())
            .any(|(_, m)| m.payload == crate::delivery::protocol::Payload::Message(6))
    );
}

// SH-05
#[test]
fn a_restarted_producer_gets_a_request_next_and_delivery_continues() {
    let mut h = Harness::new();
    h.add_producer("p", sharding());
    h.send("p", 1, 1);
    h.send("p", 1, 2);
    h.events.clear();
    let now = h.clock.now();
    h.spc("p").start(now);
    h.pump();
    assert!(h.last_request_next("p").is_some());
    h.send("p", 1, 3);
    assert_eq!(h.got(1), vec![1, 2, 3]);
}

// SH-06
#[test]
fn unconfirmed_messages_reach_a_new_incarnation_of_a_stopped_entity() {
    let mut h = Harness::new();
    h.auto_confirm = false;
    h.add_producer(
        "p",
        ShardingProducerSettings {
            resend_first_unconfirmed_idle_timeout: Duration::from_millis(1500),
            ..sharding()
        },
    );
    for n in 1..=2 {
        h.send("p", 1, n);
        h.confirm(1);
    }
    h.send("p", 1, 3);
    assert_eq!(h.got(1), vec![1, 2, 3], "3 is delivered and not confirmed");
    h.received.clear();
    h.stop_entity(1);
    // 1. A new message recreates the entity: it asks for everything unconfirmed, so it gets
    // 3 again, then 4.
    h.send("p", 1, 4);
    assert_eq!(h.got(1), vec![3]);
    h.confirm(1);
    assert_eq!(h.got(1), vec![3, 4]);
    // 2. Incarnation 1 stops with 4 unconfirmed and nothing new sent: the idle resend wakes
    // incarnation 2.
    h.received.clear();
    h.stop_entity(1);
    h.advance(Duration::from_secs(3));
    assert_eq!(h.got(1), vec![4]);
}

#[test]
fn wake_idle_resends_to_a_lost_entity_before_the_idle_timeout() {
    let mut h = Harness::new();
    h.auto_confirm = false;
    h.add_producer("p", sharding());
    h.send("p", 1, 1);
    h.confirm(1);
    h.send("p", 1, 2);
    assert_eq!(h.got(1), vec![1, 2]);
    h.received.clear();
    // The entity's node died with message 2 unconfirmed.
    h.stop_entity(1);
    h.advance(Duration::from_secs(2));
    assert!(
        h.got(1).is_empty(),
        "the idle timeout (10 s) has not passed"
    );
    // Entities silent for longer than asked are woken; a busier threshold wakes nobody.
    let now = h.clock.now();
    h.spc("p").wake_idle(Duration::from_secs(5), now);
    h.pump();
    assert!(h.got(1).is_empty());
    assert_eq!(h.spc("p").resent(), 0);
    h.spc("p").wake_idle(Duration::from_secs(1), now);
    h.pump();
    assert_eq!(h.got(1), vec![2]);
    // Counted for warren_delivery_resends_total: the wake-up, then the copy the new
    // incarnation asked for (it takes the first message it sees only when marked first).
    assert_eq!(h.spc("p").resent(), 2);
}

// SH-07
#[test]
fn unused_controllers_are_cleaned_up_and_recreated_on_demand() {
    let mut h = Harness::new();
    h.auto_confirm = false;
    h.add_producer(
        "p",
        ShardingProducerSettings {
            cleanup_unused_after: Duration::from_secs(1),
            ..sharding()
        },
    );
    h.send("p", 1, 1);
    h.confirm(1);
    h.send("p", 2, 1);
    h.advance(Duration::from_secs(2));
    assert_eq!(
        h.spc("p").entity_count(),
        1,
        "entity-1's controller is gone"
    );
    let now = h.clock.now();
    h.spc("p").start(now);
    h.pump();
    let (demand, _) = h.last_request_next("p").unwrap();
    assert_eq!(demand, vec!["entity-2".to_owned()]);
    h.auto_confirm = true;
    h.send("p", 1, 2);
    assert_eq!(h.got(1), vec![1, 2]);
}

// SH-07b
/// With more entities than `max_entity_controllers`, the least recently used child that owes
/// nothing goes (never one with unconfirmed messages), and a message for it later gets a new
/// one and arrives.
#[test]
fn beyond_the_controller_limit_the_least_recently_used_unowing_child_goes() {
    let mut h = Harness::new();
    h.add_producer(
        "p",
        ShardingProducerSettings {
            max_entity_controllers: 3,
            ..sharding()
        },
    );
    h.auto_confirm = false;
    h.send("p", 1, 1); // the oldest, and it owes its entity a confirmation
    h.auto_confirm = true;
    // Steps shorter than the consumers' Request resend (2 s), whose frames also count as use.
    for to in [2, 3] {
        h.advance(Duration::from_millis(100));
        h.send("p", to, 1);
    }
    assert_eq!(h.spc("p").entity_count(), 3);
    h.advance(Duration::from_millis(100));
    h.send("p", 4, 1);
    assert_eq!(h.spc("p").entity_count(), 3, "one child went");
    let now = h.clock.now();
    h.spc("p").start(now);
    h.pump();
    let (demand, _) = h.last_request_next("p").unwrap();
    let demand: BTreeSet<String> = demand.into_iter().collect();
    let kept: BTreeSet<String> = ["entity-1", "entity-3", "entity-4"]
        .map(str::to_owned)
        .into();
    assert_eq!(demand, kept, "entity-2 went, not entity-1 that owes");
    h.send("p", 2, 2);
    assert_eq!(h.got(2), vec![1, 2]);
    h.confirm(1);
    assert_eq!(h.got(1), vec![1]);
}

// SH-08
#[test]
fn a_gone_producer_s_controller_stops_and_a_new_producer_gets_a_new_one() {
    let mut h = Harness::new();
    h.add_producer("p", sharding());
    h.send("p", 1, 1);
    h.send("p", 1, 2);
    let old_child = ProducerId::new("p-entity-1");
    h.entities
        .get_mut(&entity(1))
        .unwrap()
        .producer_gone(&old_child);
    assert!(h.entities[&entity(1)].producers().is_empty(), "stopped");
    // A new ShardingProducerController with the same id.
    h.producers.clear();
    h.add_producer("p", sharding());
    h.send("p", 1, 3);
    h.send("p", 1, 4);
    assert_eq!(h.got(1), vec![1, 2, 3, 4]);
    assert_eq!(h.entities[&entity(1)].producers(), vec![old_child]);
}

// DSH-01
#[test]
fn a_restarted_durable_producer_resends_what_was_not_confirmed_with_new_numbers() {
    let mut h = Harness::new();
    h.store = Some(DurableState::default());
    h.auto_confirm = false;
    h.add_durable_producer("p", 1);
    for n in 1..=4 {
        h.send("p", 1, n);
    }
    let store = h.store.clone().unwrap();
    assert_eq!(store.unconfirmed.len(), 4, "each stored");
    h.confirm(1);
    h.confirm(1);
    assert_eq!(h.store.as_ref().unwrap().confirmed["entity-1"].0, SeqNr(2));
    // The controller stops with 3 and 4 held by the consumer; a new one starts from the store.
    h.producers.clear();
    h.add_durable_producer("p", 100);
    // The old 3 and 4 are confirmed to the old controller: nothing is stored.
    h.confirm(1);
    h.confirm(1);
    assert_eq!(h.store.as_ref().unwrap().confirmed["entity-1"].0, SeqNr(2));
    // They come again from the new child, one at a time.
    let last = |h: &Harness| h.received[&entity(1)].last().map(|(_, m)| *m);
    assert_eq!(h.received[&entity(1)].len(), 5);
    assert_eq!(last(&h), Some(3));
    h.confirm(1);
    assert_eq!(h.store.as_ref().unwrap().confirmed["entity-1"].0, SeqNr(3));
    assert_eq!(last(&h), Some(4));
    h.confirm(1);
    assert_eq!(h.store.as_ref().unwrap().confirmed["entity-1"].0, SeqNr(4));
    // 5 is stored as total 5 and confirmed as such.
    h.send("p", 1, 5);
    h.confirm(1);
    let store = h.store.clone().unwrap();
    assert_eq!(store.confirmed["entity-1"].0, SeqNr(5));
    assert!(store.unconfirmed.is_empty());
}

// DSH-02
#[test]
fn with_a_durable_queue_asks_are_answered_after_storage() {
    let mut h = Harness::new();
    h.store = Some(DurableState::default());
    h.auto_confirm = false;
    h.add_durable_producer("p", 1);
    h.hold_stores = true;
    h.ask("p", 1, 1);
    h.ask("p", 2, 2);
    assert!(!h.held.is_empty(), "the first ask is being stored");
    assert!(h.replies("p").is_empty(), "no answer before it is stored");
    assert!(h.store.as_ref().unwrap().unconfirmed.is_empty());
    h.release_stores();
    assert_eq!(h.replies("p"), vec![1, 2], "before any entity confirmed");
    assert_eq!(h.store.as_ref().unwrap().unconfirmed.len(), 2);
    assert_eq!(
        (h.got(1), h.got(2)),
        (vec![1], vec![2]),
        "delivered, not confirmed"
    );
}

// An entity that gives up on a message reports it before confirming; the ask's answer says so.
#[test]
fn a_message_the_entity_gave_up_on_is_answered_as_rejected() {
    let mut h = Harness::new();
    h.auto_confirm = false;
    h.add_producer("p", sharding());
    h.ask("p", 1, 7);
    // The harness's first child has incarnation 1; the message is its seq 1.
    let child = crate::delivery::protocol::ProducerRef {
        id: ProducerId::new("p-entity-1"),
        incarnation: 1,
    };
    h.spc("p")
        .reject(&entity(1), &child, SeqNr(1), "bad".to_owned());
    h.confirm(1);
    assert_eq!(
        h.events["p"].last(),
        Some(&ShardingProducerEvent::Rejected {
            token: 7,
            reason: "bad".to_owned()
        })
    );
}

// D-10 for sharding: more waiting than buffer_size fails the controller.
#[test]
fn more_waiting_messages_than_the_buffer_holds_fail_the_controller() {
    let now = Instant::now();
    let mut spc = Spc::new(
        ProducerId::new("p"),
        ProducerSettings::default(),
        ShardingProducerSettings {
            buffer_size: 2,
            ..sharding()
        },
        1,
    )
    .unwrap();
    spc.start(now);
    spc.send(entity(1), 1, now).unwrap(); // pushed as the first message
    spc.send(entity(1), 2, now).unwrap();
    spc.send(entity(1), 3, now).unwrap();
    assert_eq!(
        spc.send(entity(1), 4, now),
        Err(ShardingProducerError::BufferFull(2))
    );
}
