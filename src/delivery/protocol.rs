//! The vocabulary shared by both ends of a reliable-delivery link: sequence numbers, producer
//! identity, and the frames that cross the (possibly lossy) link between a ProducerController and
//! a ConsumerController. Pure data: no behaviour, no I/O. Everything here serializes, for links
//! between nodes.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Position of a message in one producer's stream; the first message is 1 and 0 means "none".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct SeqNr(pub u64);

impl SeqNr {
    /// "No message yet": confirmed and received counters start here.
    pub const ZERO: SeqNr = SeqNr(0);

    /// The sequence number after this one.
    pub fn next(self) -> SeqNr {
        // Saturating: a peer may send any number, and nothing here may panic on peer input.
        SeqNr(self.0.saturating_add(1))
    }

    /// `self + n`.
    pub fn plus(self, n: u64) -> SeqNr {
        SeqNr(self.0.saturating_add(n))
    }

    /// `self - n`, saturating at zero.
    pub fn minus(self, n: u64) -> SeqNr {
        SeqNr(self.0.saturating_sub(n))
    }

    /// How far `self` is ahead of `earlier`, or `None` when it is behind.
    pub fn distance_from(self, earlier: SeqNr) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }
}

impl fmt::Display for SeqNr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Name of a producer stream, stable across restarts of its controller (Akka's `producerId`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProducerId(Arc<str>);

impl ProducerId {
    /// Wraps a producer name.
    pub fn new(id: impl Into<Arc<str>>) -> Self {
        ProducerId(id.into())
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProducerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One incarnation of a ProducerController: its producer id plus a number that differs for every
/// controller instance, so a consumer can tell "the same producer restarted" from "the same
/// controller" the way Akka compares actor refs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ProducerRef {
    /// The producer stream this controller serves.
    pub id: ProducerId,
    /// Distinguishes controller instances with the same id.
    pub incarnation: u64,
}

/// One piece of a message too large to send whole; the pieces of a message occupy consecutive
/// sequence numbers and the consumer reassembles them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// This piece of the serialized message.
    pub bytes: Bytes,
    /// The message's first piece.
    pub first_chunk: bool,
    /// The message's last piece.
    pub last_chunk: bool,
}

impl Chunk {
    /// Splits a serialized message into pieces of at most `size` bytes, in order. A message
    /// that serializes to nothing still travels, as one empty chunk.
    pub(crate) fn split(bytes: &Bytes, size: usize) -> impl Iterator<Item = Chunk> + '_ {
        let size = size.max(1);
        let pieces = bytes.len().div_ceil(size).max(1);
        (0..pieces).map(move |i| Chunk {
            bytes: bytes.slice((i * size).min(bytes.len())..((i + 1) * size).min(bytes.len())),
            first_chunk: i == 0,
            last_chunk: i + 1 == pieces,
        })
    }
}

/// What a sequence number carries: a whole message, or one chunk of a serialized one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload<M> {
    /// The application message itself.
    Message(M),
    /// A piece of it (chunking is on).
    Chunk(Chunk),
}

impl<M> Payload<M> {
    /// A whole message counts as both first and last chunk.
    pub fn is_first_chunk(&self) -> bool {
        match self {
            Payload::Message(_) => true,
            Payload::Chunk(chunk) => chunk.first_chunk,
        }
    }

    /// A whole message counts as both first and last chunk.
    pub fn is_last_chunk(&self) -> bool {
        match self {
            Payload::Message(_) => true,
            Payload::Chunk(chunk) => chunk.last_chunk,
        }
    }
}

/// A message on its way from a ProducerController to a ConsumerController.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequencedMessage<M> {
    /// The controller that sent it; replies go there.
    pub producer: ProducerRef,
    /// Its position in the producer's stream.
    pub seq_nr: SeqNr,
    /// The application message, or a chunk of it.
    pub payload: Payload<M>,
    /// Starts a new session: accept it whatever was received before.
    pub first: bool,
    /// The producer wants an `Ack` once the consumer confirmed it (on the last chunk only).
    pub ack: bool,
}

impl<M> SequencedMessage<M> {
    /// The same message marked as the first of a session (Akka's `asFirst`).
    pub fn as_first(&self) -> Self
    where
        M: Clone,
    {
        SequencedMessage {
            first: true,
            ..self.clone()
        }
    }
}

/// A frame from a ConsumerController back to a ProducerController.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsumerFrame {
    /// Everything up to `confirmed` is processed; the producer may send up to `request_up_to`.
    Request {
        /// Highest sequence number the consumer confirmed.
        confirmed: SeqNr,
        /// Highest sequence number the producer may send (the flow-control window).
        request_up_to: SeqNr,
        /// False in only-flow-control mode: the producer keeps no resend buffer.
        support_resend: bool,
        /// True when re-sent by the consumer's retry timer rather than by new traffic.
        via_timeout: bool,
    },
    /// Send every unconfirmed message from `from` again; 0 also marks the head as first.
    Resend {
        /// First sequence number to resend, or 0 for all unconfirmed.
        from: SeqNr,
    },
    /// A confirmation without new demand, for messages sent with `ack`.
    Ack {
        /// Highest sequence number the consumer confirmed.
        confirmed: SeqNr,
    },
    /// Connect the producer to the consumer that sent this frame.
    RegisterConsumer,
}
