//! Tunables of the reliable-delivery protocol, with Akka's defaults (`akka.reliable-delivery`).
//! Keys are Akka's, in snake_case so that every key has a `WARREN_DELIVERY__…` environment twin.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, check};

/// Longest timer interval accepted; beyond it time arithmetic could overflow.
const MAX_INTERVAL: Duration = Duration::from_secs(3600);

/// The smallest flow-control window that keeps delivery moving: below 3 the half-window
/// Request never fires after the first message, and delivery stalls.
pub const MIN_FLOW_CONTROL_WINDOW: u32 = 3;

/// All reliable-delivery settings (`[delivery]` in the TOML config).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySettings {
    /// `[delivery.producer_controller]`.
    pub producer_controller: ProducerSettings,
    /// `[delivery.consumer_controller]`.
    pub consumer_controller: ConsumerSettings,
    /// `[delivery.work_pulling]`: one producer feeding many workers.
    pub work_pulling: WorkPullingSettings,
    /// `[delivery.sharding]`: one producer feeding many entities.
    pub sharding: ShardingSettings,
}

/// Work-pulling settings (Akka's `work-pulling.*`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkPullingSettings {
    /// `[delivery.work_pulling.producer_controller]`.
    pub producer_controller: WorkPullingProducerSettings,
}

/// The work-pulling producer; its child controllers use `[delivery.producer_controller]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkPullingProducerSettings {
    /// Most messages waiting for a worker with demand; a new message beyond it fails the
    /// controller (messages re-routed from departed workers are always kept).
    pub buffer_size: usize,
}

impl Default for WorkPullingProducerSettings {
    fn default() -> Self {
        WorkPullingProducerSettings { buffer_size: 1000 }
    }
}

/// Sharding settings (Akka's `sharding.*`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShardingSettings {
    /// `[delivery.sharding.producer_controller]`.
    pub producer_controller: ShardingProducerSettings,
}

/// Settings of a producer that keeps one ProducerController per entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShardingProducerSettings {
    /// Most messages waiting for entities without demand, all entities together; one more
    /// fails the controller (the producer sees the counts in every RequestNext).
    pub buffer_size: usize,
    /// An entity's controller with nothing unconfirmed or waiting is dropped after this idle
    /// time (checked every half of it).
    #[serde(with = "humantime_serde")]
    pub cleanup_unused_after: Duration,
    /// At most this many entities' controllers are kept: one more drops the least recently
    /// used of those with nothing unconfirmed or waiting (what `cleanup_unused_after` would
    /// drop later), a hundredth of the limit at a time, so a burst of distinct entities does
    /// not keep a controller each for the whole idle time.
    pub max_entity_controllers: usize,
    /// The first unconfirmed message of an entity idle this long is sent again, to wake an
    /// entity that stopped or was lost (checked every half of it).
    #[serde(with = "humantime_serde")]
    pub resend_first_unconfirmed_idle_timeout: Duration,
}

impl Default for ShardingProducerSettings {
    fn default() -> Self {
        ShardingProducerSettings {
            buffer_size: 1000,
            cleanup_unused_after: Duration::from_secs(120),
            max_entity_controllers: 100_000,
            resend_first_unconfirmed_idle_timeout: Duration::from_secs(10),
        }
    }
}

/// ProducerController settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProducerSettings {
    /// Split messages larger than this many bytes into chunks, each on its own sequence number
    /// (point-to-point only; unset means off). Needs a codec.
    pub chunk_large_messages: Option<u32>,
    /// `[delivery.producer_controller.durable_queue]`.
    pub durable_queue: DurableQueueSettings,
}

/// The durable producer queue: how the controller talks to it, and how stores keep it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DurableQueueSettings {
    /// Time limit of one `LoadState` or `StoreMessageSent`; it is retried after.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Attempts before the controller gives up and fails.
    pub retry_attempts: u32,
    /// Period of the timer that re-sends the first message of a session until it is confirmed
    /// (it applies without a durable queue too; Akka keeps the key here).
    #[serde(with = "humantime_serde")]
    pub resend_first_interval: Duration,
    /// Confirmation records of qualifiers unused this long, with nothing unconfirmed, are
    /// removed (checked every half of it).
    #[serde(with = "humantime_serde")]
    pub cleanup_unused_after: Duration,
    /// On-disk stores compact their file after this many writes (0: never).
    pub compact_every: u64,
}

impl Default for DurableQueueSettings {
    fn default() -> Self {
        DurableQueueSettings {
            request_timeout: Duration::from_secs(3),
            retry_attempts: 10,
            resend_first_interval: Duration::from_secs(1),
            cleanup_unused_after: Duration::from_secs(3600),
            compact_every: 1000,
        }
    }
}

/// ConsumerController settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSettings {
    /// W: most unconfirmed messages in flight; a new Request goes out when half is used. At
    /// least 3 (smaller windows stall).
    pub flow_control_window: u32,
    /// First and smallest interval of the Request/Resend/RegisterConsumer retry timer.
    #[serde(with = "humantime_serde")]
    pub resend_interval_min: Duration,
    /// Largest retry interval; it grows ×1.5 per idle retry up to this.
    #[serde(with = "humantime_serde")]
    pub resend_interval_max: Duration,
    /// Skip lost messages instead of resending them (at-most-once, flow control only).
    pub only_flow_control: bool,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            flow_control_window: 50,
            resend_interval_min: Duration::from_secs(2),
            resend_interval_max: Duration::from_secs(30),
            only_flow_control: false,
        }
    }
}

impl DeliverySettings {
    /// Rejects values the protocol cannot run with, naming the offending key.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let p = &self.producer_controller;
        let dq = &p.durable_queue;
        let c = &self.consumer_controller;
        let sp = &self.sharding.producer_controller;
        for (key, value) in [
            (
                "producer_controller.durable_queue.resend_first_interval",
                dq.resend_first_interval,
            ),
            (
                "producer_controller.durable_queue.request_timeout",
                dq.request_timeout,
            ),
            (
                "producer_controller.durable_queue.cleanup_unused_after",
                dq.cleanup_unused_after,
            ),
            (
                "consumer_controller.resend_interval_min",
                c.resend_interval_min,
            ),
            (
                "consumer_controller.resend_interval_max",
                c.resend_interval_max,
            ),
            (
                "sharding.producer_controller.cleanup_unused_after",
                sp.cleanup_unused_after,
            ),
            (
                "sharding.producer_controller.resend_first_unconfirmed_idle_timeout",
                sp.resend_first_unconfirmed_idle_timeout,
            ),
        ] {
            check(
                value >= Duration::from_millis(2) && value <= MAX_INTERVAL,
                prefix,
                key,
                "must be between 2ms and 1h",
            )?;
        }
        check(
            self.sharding.producer_controller.buffer_size >= 1,
            prefix,
            "sharding.producer_controller.buffer_size",
            "must be at least 1",
        )?;
        check(
            sp.max_entity_controllers >= 1,
            prefix,
            "sharding.producer_controller.max_entity_controllers",
            "must be at least 1",
        )?;
        check(
            self.work_pulling.producer_controller.buffer_size >= 1,
            prefix,
            "work_pulling.producer_controller.buffer_size",
            "must be at least 1",
        )?;
        check(
            dq.retry_attempts >= 1,
            prefix,
            "producer_controller.durable_queue.retry_attempts",
            "must be at least 1",
        )?;
        check(
            p.chunk_large_messages != Some(0),
            prefix,
            "producer_controller.chunk_large_messages",
            "must be at least 1 byte (leave it unset for off)",
        )?;
        // With a window of 1 or 2 the half-window Request never fires after the first message
        // (Akka's arithmetic), so delivery would stall.
        check(
            c.flow_control_window >= MIN_FLOW_CONTROL_WINDOW,
            prefix,
            "consumer_controller.flow_control_window",
            "must be at least 3",
        )?;
        check(
            c.resend_interval_max >= c.resend_interval_min,
            prefix,
            "consumer_controller.resend_interval_max",
            "must not be smaller than resend_interval_min",
        )
    }
}

/// Bounds a timer interval taken from settings: the config path validates intervals by key,
/// but settings built in code are not, and a zero interval would spin while a huge one would
/// overflow `Instant`.
pub fn timer_interval(interval: Duration) -> Duration {
    interval.clamp(Duration::from_millis(1), Duration::from_secs(24 * 60 * 60))
}

#[cfg(test)]
mod tests {
    use figment::Figment;
    use figment::providers::{Format, Serialized, Toml};

    use super::*;

    #[test]
    fn defaults_are_akkas() {
        let d = DeliverySettings::default();
        assert_eq!(d.producer_controller.chunk_large_messages, None);
        let dq = &d.producer_controller.durable_queue;
        assert_eq!(dq.request_timeout, Duration::from_secs(3));
        assert_eq!(dq.retry_attempts, 10);
        assert_eq!(dq.resend_first_interval, Duration::from_secs(1));
        assert_eq!(dq.cleanup_unused_after, Duration::from_secs(3600));
        let c = &d.consumer_controller;
        assert_eq!(c.flow_control_window, 50);
        assert_eq!(c.resend_interval_min, Duration::from_secs(2));
        assert_eq!(c.resend_interval_max, Duration::from_secs(30));
        assert!(!c.only_flow_control);
        assert_eq!(d.work_pulling.producer_controller.buffer_size, 1000);
        let sp = &d.sharding.producer_controller;
        assert_eq!(sp.cleanup_unused_after, Duration::from_secs(120));
        assert_eq!(sp.max_entity_controllers, 100_000);
        assert_eq!(
            sp.resend_first_unconfirmed_idle_timeout,
            Duration::from_secs(10)
        );
        d.validate("delivery").unwrap();
    }

    #[test]
    fn every_key_reads_from_toml() {
        let toml = r#"
            [producer_controller]
            chunk_large_messages = 1024
            [producer_controller.durable_queue]
            request_timeout = "500ms"
            retry_attempts = 3
            resend_first_interval = "2s"
            cleanup_unused_after = "10m"
            compact_every = 7
            [consumer_controller]
            flow_control_window = 20
            resend_interval_min = "1s"
            resend_interval_max = "2s"
            only_flow_control = true
            [work_pulling.producer_controller]
            buffer_size = 5
            [sharding.producer_controller]
            cleanup_unused_after = "1s"
            max_entity_controllers = 7
            resend_first_unconfirmed_idle_timeout = "1500ms"
        "#;
        let d: DeliverySettings = Figment::from(Serialized::defaults(DeliverySettings::default()))
            .merge(Toml::string(toml))
            .extract()
            .unwrap();
        d.validate("delivery").unwrap();
        assert_eq!(d.producer_controller.chunk_large_messages, Some(1024));
        assert_eq!(
            d.producer_controller.durable_queue.request_timeout,
            Duration::from_millis(500)
        );
        assert_eq!(d.producer_controller.durable_queue.compact_every, 7);
        assert!(d.consumer_controller.only_flow_control);
        assert_eq!(d.work_pulling.producer_controller.buffer_size, 5);
        assert_eq!(
            d.sharding
                .producer_controller
                .resend_first_unconfirmed_idle_timeout,
            Duration::from_millis(1500)
        );
        assert_eq!(d.sharding.producer_controller.max_entity_controllers, 7);
    }

    #[test]
    fn a_window_below_three_is_refused_naming_the_key() {
        let mut d = DeliverySettings::default();
        d.consumer_controller.flow_control_window = 2;
        let err = d.validate("delivery").unwrap_err().to_string();
        assert!(
            err.contains("delivery.consumer_controller.flow_control_window"),
            "{err}"
        );
    }
}
