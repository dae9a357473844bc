//! The bridge's tunables (`[bridge]` in the TOML config).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, check};
use crate::delivery::settings::ConsumerSettings;
use crate::entity::{EntityMessage, InvalidMessage, RunnerSettings};

/// RabbitMQ 3.10 closes a channel whose oldest delivery stays unacked this long.
const BROKER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The default prefetch as a multiple of `max_in_flight`: deliveries and acks on their way
/// between the broker and the bridge hold about 20 ms worth of the window, which at four times
/// left the bridge with nothing to take a tenth of the time (README, "Slow entities").
pub const PREFETCH_PER_IN_FLIGHT: u16 = 10;

/// How much work the bridge takes on and how it treats failures.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeSettings {
    /// Most deliveries with the entities at once (taken from the broker and not settled).
    pub max_in_flight: u16,
    /// Unacked deliveries the broker may push; unset means [`PREFETCH_PER_IN_FLIGHT`] times
    /// `max_in_flight`. The room above `max_in_flight` covers deliveries settled but not acked
    /// yet and the pipeline between the broker and the bridge: acks on their way and being
    /// processed, deliveries on theirs.
    pub prefetch: Option<u16>,
    /// Bodies larger than this are dead-lettered without being decoded.
    pub max_message_bytes: usize,
    /// Processing attempts per message, the first included, before it is dead-lettered.
    pub max_attempts: u32,
    /// First pause between attempts.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_min: Duration,
    /// Longest pause between attempts.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// A delivery not settled within this is nacked back to the queue. Far below the broker's
    /// consumer timeout, which would close the whole channel.
    #[serde(with = "humantime_serde")]
    pub processing_deadline: Duration,
    /// On SIGINT/SIGTERM, how long to let in-flight work finish before closing the channel.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for BridgeSettings {
    fn default() -> Self {
        BridgeSettings {
            max_in_flight: 100,
            prefetch: None,
            max_message_bytes: 64 * 1024,
            max_attempts: 5,
            retry_backoff_min: Duration::from_millis(10),
            retry_backoff_max: Duration::from_secs(1),
            processing_deadline: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl BridgeSettings {
    /// The prefetch in effect.
    pub fn effective_prefetch(&self) -> u16 {
        self.prefetch
            .unwrap_or_else(|| self.max_in_flight.saturating_mul(PREFETCH_PER_IN_FLIGHT))
    }

    /// Decodes a message body as the bridge does: above `max_message_bytes` it is not even
    /// decoded. The dead-letter redrive judges replays with the same rule.
    pub fn decode<M: EntityMessage>(&self, body: &[u8]) -> Result<M, InvalidMessage> {
        if body.len() > self.max_message_bytes {
            return Err(InvalidMessage::Oversize {
                size: body.len(),
                limit: self.max_message_bytes,
            });
        }
        M::decode(body)
    }

    /// The entities' runner settings: how often and how patiently an entity retries a message
    /// before it gives up (and the bridge dead-letters it) are the bridge's keys, since the
    /// bridge is where a message's fate is decided.
    pub fn runner(&self, consumer: ConsumerSettings) -> RunnerSettings {
        RunnerSettings {
            consumer,
            max_attempts: self.max_attempts,
            retry_backoff_min: self.retry_backoff_min,
            retry_backoff_max: self.retry_backoff_max,
        }
    }

    /// Rejects values the bridge cannot run with, naming the key under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        check(
            self.max_in_flight >= 1,
            prefix,
            "max_in_flight",
            "must be at least 1",
        )?;
        // 0 would mean "unlimited" to the broker: the backlog would move into our memory.
        check(
            self.prefetch != Some(0),
            prefix,
            "prefetch",
            "must be at least 1 (0 means unlimited to RabbitMQ)",
        )?;
        check(
            self.max_message_bytes >= 1,
            prefix,
            "max_message_bytes",
            "must be at least 1",
        )?;
        check(
            self.max_attempts >= 1,
            prefix,
            "max_attempts",
            "must be at least 1",
        )?;
        check(
            self.retry_backoff_max >= self.retry_backoff_min,
            prefix,
            "retry_backoff_max",
            "must not be smaller than retry_backoff_min",
        )?;
        check(
            !self.processing_deadline.is_zero()
                && self.processing_deadline < BROKER_CONSUMER_TIMEOUT,
            prefix,
            "processing_deadline",
            "must be above zero and below the broker's 30 min consumer timeout",
        )?;
        check(
            self.retry_backoff_max <= BROKER_CONSUMER_TIMEOUT,
            prefix,
            "retry_backoff_max",
            "must be at most 30 min",
        )?;
        check(
            self.shutdown_timeout <= BROKER_CONSUMER_TIMEOUT,
            prefix,
            "shutdown_timeout",
            "must be at most 30 min",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_defaults_to_ten_times_the_in_flight_bound_within_the_brokers_limit() {
        let settings = BridgeSettings::default();
        assert_eq!(settings.effective_prefetch(), 1000);
        let wide = BridgeSettings {
            max_in_flight: 10_000,
            ..BridgeSettings::default()
        };
        assert_eq!(wide.effective_prefetch(), u16::MAX);
        settings.validate("bridge").unwrap();
    }

    #[test]
    fn a_zero_prefetch_is_refused_because_the_broker_reads_it_as_unlimited() {
        let settings = BridgeSettings {
            prefetch: Some(0),
            ..BridgeSettings::default()
        };
        let err = settings.validate("bridge").unwrap_err().to_string();
        assert!(err.contains("`bridge.prefetch`"), "{err}");
    }
}
