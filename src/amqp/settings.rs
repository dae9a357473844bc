//! Where the broker is and what the queue looks like: the settings both binaries share
//! (`[amqp]` in the TOML config), and the one place that opens a connection.

use std::str::FromStr;
use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};

use crate::amqp::AmqpError;
use crate::amqp::tls::AmqpTls;
use crate::config::{ConfigError, check};

/// Heartbeat asked for when the URI names none, so a dead broker is noticed in seconds rather
/// than after the server's default of 60 s.
const DEFAULT_HEARTBEAT_SECS: u16 = 10;

/// Largest frame asked for when the URI names none. lapin keeps 32 frames of receive and of
/// send buffer per connection: at RabbitMQ's default of 128 KiB that is 8 MiB a connection, at
/// 32 KiB 2 MiB. A larger message travels in several frames.
const DEFAULT_FRAME_MAX: u32 = 32 * 1024;

/// Most partitions a topology may have: each is a queue, a consumer, a connection and a
/// singleton, and RabbitMQ 3.10's consistent-hash exchange is hurt by unbounded bucket counts.
pub const MAX_PARTITIONS: u16 = 64;

/// Name of partition `partition`'s queue.
pub fn partition_queue(queue: &str, partition: u16) -> String {
    format!("{queue}.p{partition}")
}

/// Name of the consistent-hash exchange that feeds the partition queues.
pub fn partition_exchange(queue: &str) -> String {
    format!("{queue}.partitions")
}

/// Kind of the source queue; RabbitMQ cannot change it after declaration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// A classic durable queue (what the original sample uses).
    Classic,
    /// A replicated quorum queue, declared with an explicit delivery limit.
    Quorum,
}

/// Whether Warren declares the topology or attaches to a queue that exists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeclareMode {
    /// Declare the queue with Warren's arguments (single active consumer, dead-lettering, on
    /// quorum queues a delivery limit), its dead-letter exchange and queue, and the partitions.
    #[default]
    All,
    /// Attach to a queue operations manage, as it is: check that it exists (a passive
    /// declare), impose no argument; declare only Warren's own `<queue>.dlx` and `<queue>.dlq`,
    /// where Warren's dead letters go. One partition only.
    Passive,
}

/// Broker connection and queue topology.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpSettings {
    /// Broker URI, `amqp://user:password@host:port/vhost`, or `amqps://` for TLS; the
    /// `heartbeat=` and `auth_mechanism=` queries are honoured.
    pub uri: String,
    /// Certificates for an `amqps://` URI.
    pub tls: AmqpTls,
    /// The source queue; its dead-letter queue is `<queue>.dlq`. With more than one partition,
    /// the stem of the partition queues `<queue>.p0` … and of their exchange.
    pub queue: String,
    /// Partition queues, each with its own consumer; every message of one entity goes to one
    /// of them. 1: the single queue `queue`.
    pub partitions: u16,
    /// `classic` or `quorum`.
    pub queue_type: QueueType,
    /// `all` (Warren declares the topology) or `passive` (the queue exists, managed elsewhere).
    pub declare: DeclareMode,
    /// Quorum queues only: deliveries after which the broker dead-letters a message itself.
    pub delivery_limit: u32,
    /// First pause before reconnecting after a failure.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest pause between reconnection attempts.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Connection name shown by the broker; each binary picks a default with its pid.
    pub connection_name: Option<String>,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        AmqpSettings {
            uri: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            tls: AmqpTls::default(),
            queue: "orders".into(),
            partitions: 1,
            queue_type: QueueType::Classic,
            declare: DeclareMode::All,
            delivery_limit: 20,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            connection_name: None,
        }
    }
}

impl AmqpSettings {
    /// Rejects settings the broker would refuse, naming the key under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let uri = match AMQPUri::from_str(&self.uri) {
            Ok(uri) => uri,
            Err(reason) => {
                return check(false, prefix, "uri", &format!("not an AMQP URI: {reason}"));
            }
        };
        self.tls.validate(prefix, &uri)?;
        check(!self.queue.is_empty(), prefix, "queue", "must not be empty")?;
        // Queue names are short strings; the partition exchange's name adds eleven bytes.
        check(
            self.queue.len() <= 244,
            prefix,
            "queue",
            "must be at most 244 bytes",
        )?;
        check(
            (1..=MAX_PARTITIONS).contains(&self.partitions),
            prefix,
            "partitions",
            &format!("must be between 1 and {MAX_PARTITIONS}"),
        )?;
        check(
            self.declare == DeclareMode::All || self.partitions == 1,
            prefix,
            "declare",
            "\"passive\" attaches to one existing queue: it needs partitions = 1 (partition queues and their exchange are Warren's to declare)",
        )?;
        check(
            self.delivery_limit >= 1,
            prefix,
            "delivery_limit",
            "must be at least 1",
        )?;
        check(
            !self.reconnect_min.is_zero(),
            prefix,
            "reconnect_min",
            "must be greater than zero",
        )?;
        check(
            self.reconnect_max >= self.reconnect_min,
            prefix,
            "reconnect_max",
            "must not be smaller than reconnect_min",
        )?;
        check(
            self.reconnect_max <= Duration::from_secs(3600),
            prefix,
            "reconnect_max",
            "must be at most 1h",
        )
    }

    /// The queues consumers read, one per partition: `queue` itself when there is one
    /// partition, else `<queue>.p0` … `<queue>.p{N-1}`.
    pub fn source_queues(&self) -> Vec<String> {
        if self.partitions <= 1 {
            return vec![self.queue.clone()];
        }
        (0..self.partitions)
            .map(|partition| partition_queue(&self.queue, partition))
            .collect()
    }

    /// Where a publisher sends a message whose entity is `key`: the exchange and the routing
    /// key. One partition: the default exchange, routed by queue name. More: the
    /// consistent-hash exchange `<queue>.partitions`, routed by the entity's key, so every
    /// message of one entity lands in the same partition queue.
    pub fn publish_target<'a>(&'a self, key: &'a str) -> (String, &'a str) {
        if self.partitions <= 1 {
            (String::new(), self.queue.as_str())
        } else {
            (partition_exchange(&self.queue), key)
        }
    }

    /// The connection name: the configured one, or `<program>-<pid>`.
    pub fn connection_name_or(&self, program: &str) -> String {
        self.connection_name
            .clone()
            .unwrap_or_else(|| format!("{program}-{}", std::process::id()))
    }

    /// Opens a connection named `connection_name` (it shows in the management UI and in
    /// `rabbitmqctl list_connections`), over TLS for an `amqps://` URI, with 32 KiB frames and a
    /// 10 s heartbeat unless the URI asks otherwise (`?frame_max=`, `?heartbeat=`). A failure names the
    /// broker it was for, so a refused certificate reads as the broker link's.
    pub async fn connect(&self, connection_name: &str) -> Result<Connection, AmqpError> {
        let mut uri = AMQPUri::from_str(&self.uri).map_err(AmqpError::InvalidUri)?;
        if uri.query.heartbeat.is_none() {
            uri.query.heartbeat = Some(DEFAULT_HEARTBEAT_SECS);
        }
        if uri.query.frame_max.is_none() {
            uri.query.frame_max = Some(DEFAULT_FRAME_MAX);
        }
        let broker = format!(
            "{}://{}:{}",
            if uri.scheme == AMQPScheme::AMQPS {
                "amqps"
            } else {
                "amqp"
            },
            uri.authority.host,
            uri.authority.port
        );
        let properties =
            ConnectionProperties::default().with_connection_name(connection_name.into());
        let tls = self.tls.lapin_config()?;
        let runtime = lapin::runtime::default_runtime()?;
        Connection::connect_uri_with_config(uri, properties, tls, runtime)
            .await
            .map_err(|source| AmqpError::Connect { broker, source })
    }

    /// Pauses between reconnection attempts: exponential with jitter, never giving up, never
    /// longer than `reconnect_max`.
    pub fn reconnect_backoff(&self) -> impl Iterator<Item = Duration> + Send + use<> {
        crate::backoff::jittered(self.reconnect_min, self.reconnect_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        AmqpSettings::default().validate("amqp").unwrap();
    }

    #[test]
    fn partitions_name_their_queues_and_route_by_entity_through_their_exchange() {
        let one = AmqpSettings::default();
        assert_eq!(one.source_queues(), vec!["orders"]);
        assert_eq!(one.publish_target("p7"), (String::new(), "orders"));
        let three = AmqpSettings {
            partitions: 3,
            ..AmqpSettings::default()
        };
        assert_eq!(
            three.source_queues(),
            vec!["orders.p0", "orders.p1", "orders.p2"]
        );
        assert_eq!(
            three.publish_target("p7"),
            ("orders.partitions".to_owned(), "p7")
        );
        for partitions in [0, MAX_PARTITIONS + 1] {
            let err = AmqpSettings {
                partitions,
                ..AmqpSettings::default()
            }
            .validate("amqp")
            .unwrap_err()
            .to_string();
            assert!(err.contains("`amqp.partitions`"), "{err}");
        }
    }

    #[test]
    fn a_malformed_uri_is_rejected_naming_the_key() {
        let settings = AmqpSettings {
            uri: "http://nope".into(),
            ..AmqpSettings::default()
        };
        let err = settings.validate("amqp").unwrap_err().to_string();
        assert!(err.contains("`amqp.uri`"), "{err}");
    }

    #[test]
    fn the_backoff_never_gives_up_grows_from_the_minimum_and_stays_within_bounds() {
        let settings = AmqpSettings::default();
        let delays: Vec<Duration> = settings.reconnect_backoff().take(50).collect();
        assert_eq!(delays.len(), 50);
        // Each pause is its step's delay (doubling from reconnect_min, capped at half of
        // reconnect_max) plus up to as much again as jitter, and never past reconnect_max.
        let mut step = settings.reconnect_min;
        for (attempt, delay) in delays.iter().enumerate() {
            let most = (step * 2).min(settings.reconnect_max);
            assert!(
                step <= *delay && *delay <= most,
                "pause {attempt} is {delay:?}, outside [{step:?}, {most:?}]: {delays:?}",
            );
            step = (step * 2).min(settings.reconnect_max / 2);
        }
        assert!(
            delays[0] < delays[49] && delays[49] >= settings.reconnect_max / 2,
            "the pause grows to the upper half below reconnect_max: {delays:?}"
        );
    }
}
