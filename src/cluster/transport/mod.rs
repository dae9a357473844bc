//! The node-to-node transport: one authenticated TCP link per pair of nodes, carrying
//! length-delimited frames ([`frame`]) after a handshake that proves both ends hold the
//! cluster secret ([`handshake`]), inside mutual TLS when configured ([`tls`]). [`driver`] owns the sockets; [`probe`] checks a seed for a
//! node that is still joining.
//!
//! Delivery is at most once and in order per link: a frame queued while a link is down waits
//! (bounded) for the next link, and a frame lost with a dying link is gone. Everything that
//! must arrive rides on a protocol that resends (reliable delivery, sharding's retries).

pub mod driver;
pub mod frame;
pub mod handshake;
pub mod link_error;
pub mod probe;
pub mod tls;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cluster::member::NodeAddr;

pub use driver::{Inbound, SendOutcome, TransportHandle, start};
pub use link_error::LinkError;
pub use tls::{ClusterTlsSettings, LinkTls};

/// Sends one kind of message to a node without waiting: the transport (wrapping the message
/// into the node's message type), or an in-memory network in tests. Services take this, so
/// they neither know nor care which.
pub type Outbox<M> = Arc<dyn Fn(&NodeAddr, M) -> SendOutcome + Send + Sync>;

/// How links behave.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportSettings {
    /// Largest frame accepted or sent; a bigger one closes the link (received) or is dropped
    /// (sent).
    pub max_frame_bytes: usize,
    /// Frames waiting per peer; when full, new frames to that peer are dropped.
    pub send_queue: usize,
    /// Messages waiting for this node's services; when full, links stop reading.
    pub inbound_queue: usize,
    /// A ping goes out when nothing else was sent for this long.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A link that hears nothing for this long is closed and re-dialed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A connection that has not finished its handshake by then is closed.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// First pause before re-dialing a lost link.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest pause between dials.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            max_frame_bytes: 8 * 1024 * 1024,
            send_queue: 4096,
            inbound_queue: 4096,
            heartbeat_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests;
