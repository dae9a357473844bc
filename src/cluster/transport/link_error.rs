//! Why a link between two nodes ended: one typed reason that is both the log message and,
//! where the peer misbehaved, the `warren_cluster_refused_total` label.

use crate::cluster::metrics::refusal;

/// Why a link ended (and the node dials again, or waits to be dialled).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Nothing arrived for `idle_timeout`, not even a ping.
    #[error("silent past the idle timeout")]
    Idle,
    /// The peer closed the connection.
    #[error("closed by the peer")]
    Closed,
    /// A frame could not be read or decoded.
    #[error("bad frame: {0}")]
    BadFrame(String),
    /// The peer sent a handshake frame on a link that is already open.
    #[error("handshake frame on an open link")]
    HandshakeOnOpenLink,
    /// The peer refused the link, saying why.
    #[error("refused: {0}")]
    RefusedByPeer(String),
    /// A write failed.
    #[error("write failed: {0}")]
    Write(std::io::Error),
    /// A write did not finish within `idle_timeout`.
    #[error("write stalled past the idle timeout")]
    WriteStalled,
    /// This node stopped taking messages (it is stopping).
    #[error("this node is stopping")]
    Stopping,
    /// Nothing will be sent on this link any more.
    #[error("send queue closed")]
    QueueClosed,
}

impl LinkError {
    /// The refusal label when the peer misbehaved; `None` for an ordinary end.
    pub fn refusal(&self) -> Option<&'static str> {
        match self {
            LinkError::Idle => Some(refusal::IDLE),
            LinkError::BadFrame(_) | LinkError::HandshakeOnOpenLink => Some(refusal::BAD_FRAME),
            LinkError::Closed
            | LinkError::RefusedByPeer(_)
            | LinkError::Write(_)
            | LinkError::WriteStalled
            | LinkError::Stopping
            | LinkError::QueueClosed => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_misbehaving_peer_counts_as_refused() {
        assert_eq!(LinkError::Idle.refusal(), Some(refusal::IDLE));
        assert_eq!(
            LinkError::BadFrame("x".into()).refusal(),
            Some(refusal::BAD_FRAME)
        );
        assert_eq!(LinkError::Closed.refusal(), None);
        assert_eq!(LinkError::WriteStalled.refusal(), None);
    }
}
