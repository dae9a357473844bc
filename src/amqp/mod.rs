//! RabbitMQ through lapin: the shared settings and topology, the supervised consumer that feeds
//! the bridge, the confirmed publisher that the producer uses, and dead-lettering with a reason.
//!
//! All I/O with the broker lives here. lapin's own auto-recovery is not used: it does not
//! restore per-consumer prefetch in every version, so [`source`] rebuilds connection, channel,
//! qos and consumer itself, and every delivery of a dead channel is abandoned, never acked.

pub mod dead_letter;
pub mod headers;
pub mod publisher;
pub mod settings;
pub mod source;
pub mod tls;
pub mod topology;

pub use dead_letter::{DeadLetterPublisher, ERROR_HEADER};
pub use publisher::{ConfirmedPublisher, OutgoingMessage, PublisherSettings, PublisherStats};
pub use settings::{AmqpSettings, DeclareMode, QueueType};
pub use source::{AmqpSource, Session, SourceEvent, SourceSettings};
pub use tls::AmqpTls;

/// A failure talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// The configured URI cannot be parsed; nothing was attempted.
    #[error("invalid AMQP URI: {0}")]
    InvalidUri(String),
    /// The broker or the connection failed; the channel involved is unusable afterwards.
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    /// No connection to the broker: unreachable, TLS refused (unknown CA, expired, wrong
    /// host), or login refused.
    #[error("cannot connect to the broker at {broker}: {source}")]
    Connect {
        /// `amqp(s)://host:port` of the link.
        broker: String,
        /// lapin's reason, with rustls' for a refused certificate.
        source: lapin::Error,
    },
    /// A TLS file named in `[amqp.tls]` could not be read at connection time.
    #[error("cannot read amqp.tls file `{}`: {reason}", file.display())]
    TlsFile {
        /// The file.
        file: std::path::PathBuf,
        /// The operating system's reason.
        reason: String,
    },
    /// A mandatory message was returned as unroutable: the target exchange has no bound queue.
    #[error("message returned as unroutable by exchange `{exchange}`: {reply}")]
    Returned {
        /// The exchange it was published to.
        exchange: String,
        /// The broker's reply text.
        reply: String,
    },
    /// The broker refused responsibility for a message (publisher nack).
    #[error("broker nacked the message")]
    Nacked,
    /// The channel was not in confirm mode, so nothing is known about the message.
    #[error("publish was not confirmed")]
    NotConfirmed,
    /// The broker holds the topology declared with another partition count and refused this
    /// one. Changing the count needs the queues drained first (see the README).
    #[error(
        "the topology of `{queue}` was declared with another partition count than amqp.partitions = {configured} ({found}); set amqp.partitions (--partitions) to the count it was declared with, or drain the queues and delete them and the exchange `{queue}.partitions`"
    )]
    PartitionMismatch {
        /// The configured queue stem.
        queue: String,
        /// The configured partition count.
        configured: u16,
        /// The broker's refusal.
        found: String,
    },
    /// `amqp.declare = "passive"` and the queue does not exist.
    #[error(
        "amqp.declare = \"passive\" attaches to an existing queue, and `{queue}` does not exist in this vhost: create it, or let Warren declare it (amqp.declare = \"all\")"
    )]
    MissingQueue {
        /// The queue.
        queue: String,
    },
    /// The broker does not know the consistent-hash exchange type that partitions need.
    #[error(
        "amqp.partitions > 1 needs RabbitMQ's consistent-hash exchange: enable the plugin with `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`"
    )]
    NoConsistentHashExchange,
    /// The broker did not confirm in time; the message may or may not have been stored.
    #[error("broker did not confirm within {0:?}")]
    Timeout(std::time::Duration),
}

impl AmqpError {
    /// The broker's topology does not fit the settings: waiting and reconnecting does not
    /// mend it, an operator must.
    pub fn is_refused_topology(&self) -> bool {
        matches!(
            self,
            AmqpError::PartitionMismatch { .. }
                | AmqpError::NoConsistentHashExchange
                | AmqpError::MissingQueue { .. }
        )
    }
}
