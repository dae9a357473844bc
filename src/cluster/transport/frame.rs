//! What travels on a link: length-delimited frames (a 4-byte big-endian length, then a
//! MessagePack body), a handshake first, then messages and heartbeats. Frames are encoded
//! compactly; the protocol version in the handshake guards compatibility.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cluster::member::NodeAddr;

/// The link protocol version; peers with another version are refused.
pub const PROTOCOL_VERSION: u16 = 1;

/// How a node authenticates, as it says in the handshake (peers must agree).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthMode {
    /// Proofs made with the cluster secret.
    Secret,
    /// No proofs: both ends were explicitly started insecure.
    Insecure,
}

/// One frame on a link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Frame<T> {
    /// The dialer introduces itself and challenges the acceptor.
    Hello {
        /// [`PROTOCOL_VERSION`] of the dialer.
        version: u16,
        /// How the dialer authenticates.
        auth: AuthMode,
        /// The dialer.
        from: NodeAddr,
        /// The challenge.
        nonce: [u8; 32],
    },
    /// The acceptor introduces itself, answers the challenge and sets its own.
    Welcome {
        /// The acceptor.
        from: NodeAddr,
        /// Its challenge to the dialer.
        nonce: [u8; 32],
        /// Its proof that it holds the secret (empty when insecure).
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// The dialer answers the acceptor's challenge.
    Proof {
        /// The dialer's proof (empty when insecure).
        #[serde(with = "serde_bytes")]
        proof: Vec<u8>,
    },
    /// The link is refused; the connection closes after it.
    Refused {
        /// Why, for the peer's log.
        reason: String,
    },
    /// Keeps an idle link alive; answered with [`Frame::Pong`].
    Ping,
    /// Answers a ping.
    Pong,
    /// A message for the node's services.
    Message(T),
}

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error)]
#[error("undecodable frame: {0}")]
pub struct FrameError(String);

/// Encodes a frame body.
pub fn encode<T: Serialize>(frame: &Frame<T>) -> Result<Bytes, FrameError> {
    rmp_serde::to_vec(frame)
        .map(Bytes::from)
        .map_err(|e| FrameError(e.to_string()))
}

/// Decodes a frame body; garbage is an error, never a panic.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<Frame<T>, FrameError> {
    rmp_serde::from_slice(body).map_err(|e| FrameError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::member::NodeId;

    #[test]
    fn frames_round_trip() {
        let frames: Vec<Frame<String>> = vec![
            Frame::Hello {
                version: PROTOCOL_VERSION,
                auth: AuthMode::Secret,
                from: NodeAddr {
                    id: NodeId::new("a"),
                    generation: 7,
                },
                nonce: [3; 32],
            },
            Frame::Proof {
                proof: vec![1, 2, 3],
            },
            Frame::Ping,
            Frame::Message("hello".to_owned()),
        ];
        for frame in frames {
            let bytes = encode(&frame).unwrap();
            assert_eq!(decode::<String>(&bytes).unwrap(), frame);
        }
    }

    #[test]
    fn garbage_is_an_error() {
        for garbage in [
            &b""[..],
            b"\xff\xff\xff",
            b"random bytes that are not msgpack",
        ] {
            assert!(decode::<String>(garbage).is_err());
        }
    }
}
