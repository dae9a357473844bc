//! Routes decoded messages into reliable delivery: one ProducerController per entity, a line of
//! messages waiting for that entity's demand, and the confirmations coming back. This is the
//! single-node precursor of the ShardingProducerController (entities with demand, messages
//! buffered for entities without it); sharding replaces it.
//!
//! Sans-IO: inputs with `now`, outputs drained with `poll_transmit`, `poll_confirmed` and
//! `poll_timeout`. Buffering is bounded by the caller, which admits at most `max_in_flight`
//! deliveries.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::time::Instant;
use tracing::error;

use crate::delivery::child_timers::ChildTimers;
use crate::delivery::{
    ConsumerFrame, ProducerController, ProducerEvent, ProducerId, ProducerRef, ProducerSettings,
    SequencedMessage, ShardingProducerSettings,
};
use crate::entity::{EntityId, Envelope};

type Message<M> = Arc<Envelope<M>>;

struct EntityProducer<M> {
    controller: ProducerController<Message<M>, u64>,
    /// Messages for this entity that wait for its demand, in arrival order.
    waiting: VecDeque<Message<M>>,
    /// The timer deadline last pushed onto the heap for this entity.
    armed: Option<Instant>,
    /// Last time a message went to the entity or a frame came from it.
    last_activity: Instant,
}

/// Per-entity ProducerControllers.
pub struct Dispatcher<M> {
    settings: ProducerSettings,
    idle: ShardingProducerSettings,
    /// Next scan for idle entities (Akka runs both idle checks at half their timeouts).
    next_idle_check: Option<Instant>,
    producer_id: ProducerId,
    next_incarnation: u64,
    producers: HashMap<EntityId, EntityProducer<M>>,
    /// Timer deadlines by entity; stale entries are skipped when they come due.
    timers: ChildTimers<EntityId>,
    transmits: VecDeque<(EntityId, SequencedMessage<Message<M>>)>,
    confirmed: VecDeque<u64>,
}

impl<M: 'static> Dispatcher<M> {
    /// A dispatcher whose controllers are named `producer_id`; `first_incarnation` should be
    /// random so that controllers of a restarted bridge never look like old ones.
    pub fn new(
        producer_id: ProducerId,
        first_incarnation: u64,
        settings: ProducerSettings,
        idle: ShardingProducerSettings,
    ) -> Self {
        Dispatcher {
            settings,
            idle,
            next_idle_check: None,
            producer_id,
            next_incarnation: first_incarnation,
            producers: HashMap::new(),
            timers: ChildTimers::new(),
            transmits: VecDeque::new(),
            confirmed: VecDeque::new(),
        }
    }

    /// Messages waiting for an entity's demand, all entities together.
    pub fn waiting_len(&self) -> usize {
        self.producers.values().map(|p| p.waiting.len()).sum()
    }

    /// Sends `message` to `entity` now if it has demand, or queues it behind the entity's
    /// earlier messages. Its correlation key comes back from [`Self::poll_confirmed`] once the
    /// entity confirmed it.
    pub fn offer(&mut self, entity: EntityId, message: Message<M>, now: Instant) {
        let producer = match self.producers.get_mut(&entity) {
            Some(producer) => producer,
            None => {
                let incarnation = self.next_incarnation;
                self.next_incarnation = self.next_incarnation.wrapping_add(1);
                let mut controller = ProducerController::new(
                    self.producer_id.clone(),
                    incarnation,
                    self.settings.clone(),
                );
                controller.start(now);
                controller.register_consumer(now);
                if self.next_idle_check.is_none() {
                    self.next_idle_check = Some(now + idle_check_interval(&self.idle));
                }
                self.producers
                    .entry(entity.clone())
                    .or_insert(EntityProducer {
                        controller,
                        waiting: VecDeque::new(),
                        armed: None,
                        last_activity: now,
                    })
            }
        };
        producer.last_activity = now;
        producer.waiting.push_back(message);
        self.after_input(&entity, now);
    }

    /// A frame from an entity's ConsumerController; frames for an older controller incarnation
    /// are ignored.
    pub fn handle_frame(
        &mut self,
        entity: &EntityId,
        to: &ProducerRef,
        frame: ConsumerFrame,
        now: Instant,
    ) {
        let Some(producer) = self.producers.get_mut(entity) else {
            return;
        };
        if producer.controller.producer_ref() != to {
            return;
        }
        producer.last_activity = now;
        if let Err(error) = producer.controller.handle_frame(frame, now) {
            // A misbehaving consumer: drop its controller; the bridge's deadline requeues what
            // it held, and the next message starts a fresh session.
            error!(%entity, %error, "reliable delivery to entity failed; dropping its producer");
            self.producers.remove(entity);
            return;
        }
        self.after_input(entity, now);
    }

    /// Takes a message that has not been sent yet out of its entity's line (its delivery was
    /// requeued). Returns whether it was still waiting.
    pub fn cancel(&mut self, entity: &EntityId, correlation: u64) -> bool {
        let Some(producer) = self.producers.get_mut(entity) else {
            return false;
        };
        let before = producer.waiting.len();
        producer.waiting.retain(|m| m.correlation != correlation);
        producer.waiting.len() != before
    }

    /// Fires the controllers' timers that are due, and the idle checks.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_idle_check.is_some_and(|at| at <= now) {
            self.check_idle(now);
        }
        while let Some((at, entity)) = self.timers.pop_due(now) {
            let Some(producer) = self.producers.get_mut(&entity) else {
                continue;
            };
            if producer.armed != Some(at) {
                continue;
            }
            producer.armed = None;
            producer.controller.handle_timeout(now);
            self.after_input(&entity, now);
        }
    }

    /// The next protocol message for an entity.
    pub fn poll_transmit(&mut self) -> Option<(EntityId, SequencedMessage<Message<M>>)> {
        self.transmits.pop_front()
    }

    /// The correlation key of the next message its entity confirmed.
    pub fn poll_confirmed(&mut self) -> Option<u64> {
        self.confirmed.pop_front()
    }

    /// When [`Self::handle_timeout`] must be called next (possibly early, never late).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers
            .next()
            .into_iter()
            .chain(self.next_idle_check)
            .min()
    }

    /// Wakes idle entities that hold unconfirmed messages (one that stopped, or whose task
    /// died, would otherwise never ask for more) and forgets controllers nobody uses.
    fn check_idle(&mut self, now: Instant) {
        let mut wake = Vec::new();
        let cleanup_after = self.idle.cleanup_unused_after;
        let resend_after = self.idle.resend_first_unconfirmed_idle_timeout;
        self.producers.retain(|entity, producer| {
            let idle = now.saturating_duration_since(producer.last_activity);
            let unconfirmed = producer.controller.unconfirmed_len() > 0;
            if unconfirmed && idle >= resend_after {
                wake.push(entity.clone());
            }
            unconfirmed || !producer.waiting.is_empty() || idle < cleanup_after
        });
        for entity in wake {
            if let Some(producer) = self.producers.get_mut(&entity) {
                producer.controller.resend_first_unconfirmed();
                producer.last_activity = now;
            }
            self.after_input(&entity, now);
        }
        self.next_idle_check =
            (!self.producers.is_empty()).then(|| now + idle_check_interval(&self.idle));
    }

    /// Drains one controller's outputs and feeds it waiting messages while it has demand.
    fn after_input(&mut self, entity: &EntityId, now: Instant) {
        let Some(producer) = self.producers.get_mut(entity) else {
            return;
        };
        loop {
            while let Some(event) = producer.controller.poll_event() {
                if let ProducerEvent::Confirmed { token, .. } = event {
                    self.confirmed.push_back(token);
                }
                // RequestNext needs no bookkeeping: `has_demand` says the same.
            }
            if !producer.controller.has_demand() {
                break;
            }
            let Some(message) = producer.waiting.pop_front() else {
                break;
            };
            let correlation = message.correlation;
            if let Err(error) =
                producer
                    .controller
                    .send_with_confirmation(message, correlation, now)
            {
                error!(%entity, %error, "reliable delivery refused a message; dropping its producer");
                self.producers.remove(entity);
                return;
            }
        }
        while let Some(message) = producer.controller.poll_transmit() {
            self.transmits.push_back((entity.clone(), message));
        }
        let deadline = producer.controller.poll_timeout();
        self.timers.arm(entity, &mut producer.armed, deadline);
    }
}

/// How often the idle checks run: half the shorter of their timeouts, as Akka does.
fn idle_check_interval(idle: &ShardingProducerSettings) -> std::time::Duration {
    idle.cleanup_unused_after
        .min(idle.resend_first_unconfirmed_idle_timeout)
        / 2
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testkit::request;

    fn envelope(correlation: u64) -> Message<&'static str> {
        Arc::new(Envelope {
            correlation,
            message: "order",
        })
    }

    fn dispatcher() -> Dispatcher<&'static str> {
        Dispatcher::new(
            ProducerId::new("bridge"),
            7,
            ProducerSettings::default(),
            ShardingProducerSettings::default(),
        )
    }

    fn pc(incarnation: u64) -> ProducerRef {
        ProducerRef {
            id: ProducerId::new("bridge"),
            incarnation,
        }
    }

    fn sent(d: &mut Dispatcher<&'static str>) -> Vec<(String, u64, u64)> {
        std::iter::from_fn(|| d.poll_transmit())
            .map(|(e, m)| {
                let correlation = match &m.payload {
                    crate::delivery::Payload::Message(envelope) => envelope.correlation,
                    crate::delivery::Payload::Chunk(_) => u64::MAX,
                };
                (e.to_string(), m.seq_nr.0, correlation)
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn each_entity_gets_its_first_message_at_once_and_the_rest_on_demand() {
        let now = Instant::now();
        let mut d = dispatcher();
        let a = EntityId::new("a");
        d.offer(a.clone(), envelope(1), now);
        d.offer(a.clone(), envelope(2), now);
        d.offer(EntityId::new("b"), envelope(3), now);
        assert_eq!(
            sent(&mut d),
            vec![("a".into(), 1, 1), ("b".into(), 1, 3)],
            "message 2 waits for entity a's Request"
        );
        assert_eq!(d.waiting_len(), 1);

        let pc_a = ProducerRef {
            id: ProducerId::new("bridge"),
            incarnation: 7,
        };
        d.handle_frame(&a, &pc_a, request(1, 10), now);
        assert_eq!(sent(&mut d), vec![("a".into(), 2, 2)]);
        assert_eq!(d.poll_confirmed(), Some(1));
        assert_eq!(d.poll_confirmed(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn frames_for_another_incarnation_are_ignored() {
        let now = Instant::now();
        let mut d = dispatcher();
        let a = EntityId::new("a");
        d.offer(a.clone(), envelope(1), now);
        sent(&mut d);
        let stranger = ProducerRef {
            id: ProducerId::new("bridge"),
            incarnation: 999,
        };
        d.handle_frame(&a, &stranger, request(1, 10), now);
        assert_eq!(d.poll_confirmed(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unconfirmed_first_message_is_resent_when_its_timer_fires() {
        let now = Instant::now();
        let mut d = dispatcher();
        d.offer(EntityId::new("a"), envelope(1), now);
        sent(&mut d);
        let due = d.poll_timeout().unwrap();
        assert_eq!(due, now + Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        d.handle_timeout(Instant::now());
        assert_eq!(sent(&mut d), vec![("a".into(), 1, 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_message_can_be_cancelled_but_a_sent_one_cannot() {
        let now = Instant::now();
        let mut d = dispatcher();
        let a = EntityId::new("a");
        d.offer(a.clone(), envelope(1), now);
        d.offer(a.clone(), envelope(2), now);
        assert!(!d.cancel(&a, 1));
        assert!(d.cancel(&a, 2));
        assert_eq!(d.waiting_len(), 0);
    }

    // D-11: only idle entities with unconfirmed messages are woken.
    #[tokio::test(start_paused = true)]
    async fn an_idle_entity_with_unconfirmed_messages_gets_its_first_one_again() {
        let now = Instant::now();
        let mut d = dispatcher();
        let (a, b) = (EntityId::new("a"), EntityId::new("b"));
        d.offer(a.clone(), envelope(1), now);
        d.handle_frame(&a, &pc(7), request(1, 10), now);
        d.offer(a.clone(), envelope(2), now);
        d.offer(b.clone(), envelope(3), now);
        d.handle_frame(&b, &pc(8), request(1, 10), now);
        sent(&mut d);

        // Nothing for 10 s: entity a still owes a confirmation for seq 2, b owes nothing.
        let until = now + Duration::from_secs(10);
        while let Some(at) = d.poll_timeout().filter(|at| *at <= until) {
            tokio::time::advance(at - Instant::now()).await;
            d.handle_timeout(Instant::now());
        }
        assert_eq!(sent(&mut d), vec![("a".into(), 2, 2)]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unused_controller_is_dropped_and_the_next_message_starts_a_new_session() {
        let now = Instant::now();
        let mut d = dispatcher();
        let a = EntityId::new("a");
        d.offer(a.clone(), envelope(1), now);
        d.handle_frame(&a, &pc(7), request(1, 10), now);
        sent(&mut d);
        tokio::time::advance(Duration::from_secs(121)).await;
        while d.poll_timeout().is_some_and(|at| at <= Instant::now()) {
            d.handle_timeout(Instant::now());
        }
        assert_eq!(d.poll_timeout(), None, "no controllers, no timers");
        d.offer(a.clone(), envelope(2), Instant::now());
        assert_eq!(
            sent(&mut d),
            vec![("a".into(), 1, 2)],
            "a fresh controller starts at 1"
        );
    }
}
