//! How an entity processes one message: in place, retried with backoff (so later messages of
//! the same entity wait behind it and order holds) until it succeeds or its attempts run out;
//! only then is it confirmed. The sharded entity task ([`crate::sharding::entities`]) reports a message
//! that ran out of attempts as rejected before confirming it, so its producer dead-letters it.

use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};
use tracing::{debug, warn};

use crate::delivery::ConsumerSettings;
use crate::entity::Entity;
use crate::ids::EntityId;

/// How entities run.
#[derive(Clone, Debug)]
pub struct RunnerSettings {
    /// The consumer side of reliable delivery.
    pub consumer: ConsumerSettings,
    /// Attempts per message, the first included, before it is rejected.
    pub max_attempts: u32,
    /// First pause between attempts.
    pub retry_backoff_min: Duration,
    /// Longest pause between attempts.
    pub retry_backoff_max: Duration,
}

/// Entity-side counters.
#[derive(Clone, Debug)]
pub struct EntityMetrics {
    /// Attempts beyond the first.
    pub retries: IntCounter,
    /// Entity tasks running; a dormant entity has none.
    pub active: IntGauge,
    /// Entities handling a message right now. Next to the bridge's count of entities it has
    /// work out to, it tells whether the entities or the way to them hold throughput back.
    pub processing: IntGauge,
    /// Time to handle one message, retries and storing included.
    pub handle_seconds: Histogram,
}

impl EntityMetrics {
    /// Series for tests that do not serve them.
    #[cfg(any(test, feature = "testkit"))]
    pub fn unregistered() -> Self {
        let gauge = |name: &str| IntGauge::new(name, name);
        let handle = prometheus::HistogramOpts::new("h", "h");
        EntityMetrics {
            retries: IntCounter::new("r", "r").expect("a valid counter name"),
            active: gauge("a").expect("a valid gauge name"),
            processing: gauge("p").expect("a valid gauge name"),
            handle_seconds: Histogram::with_opts(handle).expect("a valid histogram"),
        }
    }
}

/// Recovers `entity`'s stored state, retrying with backoff (up to `retry_backoff_max` apart)
/// for as long as it takes: an entity that cannot load must not process anything, and its
/// unconfirmed messages wait at their producer meanwhile.
pub(crate) async fn recover<E: Entity>(id: &EntityId, entity: &mut E, settings: &RunnerSettings) {
    let mut pauses = backoff(settings);
    loop {
        match entity.recover().await {
            Ok(()) => return,
            Err(error) => {
                let pause = pauses.next().unwrap_or(settings.retry_backoff_max);
                warn!(entity = %id, %error, ?pause, "cannot load the entity's state; retrying");
                tokio::time::sleep(pause).await;
            }
        }
    }
}

fn backoff(settings: &RunnerSettings) -> impl Iterator<Item = Duration> + use<> {
    crate::backoff::jittered(settings.retry_backoff_min, settings.retry_backoff_max)
}

/// Why a message was not processed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NotProcessed {
    /// Its attempts ran out: reject it, then confirm it.
    GaveUp(String),
    /// The entity refused it for good ([`EntityError::rejected`]): reject it, then confirm it.
    Rejected(String),
    /// A newer incarnation owns the entity: stop, leaving the message unconfirmed.
    Fenced(String),
}

pub(crate) async fn process<E: Entity>(
    entity: &mut E,
    message: &E::Message,
    settings: &RunnerSettings,
    metrics: &EntityMetrics,
) -> Result<(), NotProcessed> {
    let mut pauses = backoff(settings);
    let mut attempt = 1;
    loop {
        match entity.handle(message).await {
            Ok(()) => return Ok(()),
            Err(error) if error.is_fenced() => return Err(NotProcessed::Fenced(error.to_string())),
            Err(error) if error.is_rejected() => {
                return Err(NotProcessed::Rejected(format!("rejected: {error}")));
            }
            Err(error) if error.is_unavailable() => {
                metrics.retries.inc();
                let pause = pauses.next().unwrap_or(settings.retry_backoff_max);
                warn!(%error, ?pause, "a dependency is unavailable; retrying the message");
                tokio::time::sleep(pause).await;
            }
            Err(error) if attempt < settings.max_attempts => {
                metrics.retries.inc();
                let pause = pauses.next().unwrap_or(settings.retry_backoff_max);
                tokio::time::sleep(pause).await;
                attempt += 1;
                debug!(attempt, %error, "retrying");
            }
            Err(error) => {
                return Err(NotProcessed::GaveUp(format!(
                    "processing failed after {attempt} attempts: {error}"
                )));
            }
        }
    }
}

/// Counts a running entity in `warren_entities_active`, however its task ends (a panic too).
pub(crate) struct ActiveGuard(prometheus::IntGauge);

/// Counts this entity in a gauge while it is set; uncounts it when dropped.
pub(crate) struct GaugeFlag {
    gauge: IntGauge,
    on: bool,
}

impl GaugeFlag {
    pub(crate) fn new(gauge: &IntGauge) -> Self {
        GaugeFlag {
            gauge: gauge.clone(),
            on: false,
        }
    }

    pub(crate) fn set(&mut self, on: bool) {
        if on != self.on {
            self.on = on;
            if on {
                self.gauge.inc();
            } else {
                self.gauge.dec();
            }
        }
    }
}

impl Drop for GaugeFlag {
    fn drop(&mut self) {
        self.set(false);
    }
}

impl ActiveGuard {
    pub(crate) fn new(gauge: &prometheus::IntGauge) -> Self {
        gauge.inc();
        ActiveGuard(gauge.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entity::{EntityError, EntityMessage, InvalidMessage};

    struct Flaky {
        unavailable_for: u32,
        failures: u32,
        calls: u32,
    }

    #[derive(Clone)]
    struct Msg;

    impl EntityMessage for Msg {
        fn decode(_: &[u8]) -> Result<Self, InvalidMessage> {
            Ok(Msg)
        }
        fn entity_id(&self) -> EntityId {
            EntityId::new("e")
        }
    }

    impl Entity for Flaky {
        type Message = Msg;
        type Snapshot = ();

        async fn handle(&mut self, _: &Msg) -> Result<(), EntityError> {
            self.calls += 1;
            if self.calls <= self.unavailable_for {
                return Err(EntityError::unavailable("store down"));
            }
            if self.calls <= self.unavailable_for + self.failures {
                return Err(EntityError::new("bad luck"));
            }
            Ok(())
        }

        fn snapshot(&self) {}
    }

    fn settings() -> RunnerSettings {
        RunnerSettings {
            consumer: ConsumerSettings::default(),
            max_attempts: 3,
            retry_backoff_min: Duration::from_millis(10),
            retry_backoff_max: Duration::from_secs(1),
        }
    }

    fn metrics() -> EntityMetrics {
        EntityMetrics::unregistered()
    }

    #[tokio::test(start_paused = true)]
    async fn an_unavailable_dependency_is_waited_out_without_using_up_attempts() {
        let mut entity = Flaky {
            unavailable_for: 50,
            failures: 2,
            calls: 0,
        };
        let metrics = metrics();
        let outcome = process(&mut entity, &Msg, &settings(), &metrics).await;
        assert_eq!(outcome, Ok(()));
        assert_eq!(entity.calls, 53);
        assert_eq!(metrics.retries.get(), 52);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_of_the_message_run_out_after_max_attempts() {
        let mut entity = Flaky {
            unavailable_for: 0,
            failures: 10,
            calls: 0,
        };
        let outcome = process(&mut entity, &Msg, &settings(), &metrics()).await;
        assert!(
            matches!(outcome, Err(NotProcessed::GaveUp(_))),
            "{outcome:?}"
        );
        assert_eq!(entity.calls, 3);
    }

    /// Answers every message with the same error.
    struct Answering {
        error: EntityError,
        calls: u32,
    }

    impl Entity for Answering {
        type Message = Msg;
        type Snapshot = ();
        async fn handle(&mut self, _: &Msg) -> Result<(), EntityError> {
            self.calls += 1;
            Err(self.error.clone())
        }
        fn snapshot(&self) {}
    }

    #[tokio::test(start_paused = true)]
    async fn a_fenced_entity_is_not_retried() {
        let mut entity = Answering {
            error: EntityError::fenced("claimed by a newer incarnation"),
            calls: 0,
        };
        let metrics = metrics();
        let outcome = process(&mut entity, &Msg, &settings(), &metrics).await;
        assert!(
            matches!(outcome, Err(NotProcessed::Fenced(_))),
            "{outcome:?}"
        );
        assert_eq!(entity.calls, 1);
        assert_eq!(metrics.retries.get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_message_is_not_retried_and_keeps_its_reason() {
        let mut entity = Answering {
            error: EntityError::rejected("insufficient funds"),
            calls: 0,
        };
        let metrics = metrics();
        let outcome = process(&mut entity, &Msg, &settings(), &metrics).await;
        assert!(
            matches!(&outcome, Err(NotProcessed::Rejected(reason)) if reason == "rejected: insufficient funds"),
            "{outcome:?}"
        );
        assert_eq!(entity.calls, 1);
        assert_eq!(metrics.retries.get(), 0);
    }
}
