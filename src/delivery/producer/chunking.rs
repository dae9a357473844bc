//! The producer's side of chunking: a message too large to send whole is serialized and split
//! into pieces on consecutive sequence numbers, which go out (or are stored) one by one as the
//! consumer's window allows.

use bytes::Bytes;
use tokio::time::Instant;

use crate::delivery::producer::{ProducerController, ProducerError};
use crate::delivery::protocol::{Chunk, Payload, SequencedMessage};

impl<M: Clone + 'static, T> ProducerController<M, T> {
    /// Appends the message to `remaining_chunks` as one or more sequenced messages on
    /// consecutive sequence numbers.
    pub(super) fn chunk(&mut self, message: M, ack: bool) -> Result<(), ProducerError> {
        let (producer, current, first) = (&self.me, self.current_seq_nr, self.first_seq_nr);
        let sequenced = |offset: u64, payload: Payload<M>, last: bool| {
            let seq_nr = current.plus(offset);
            SequencedMessage {
                producer: producer.clone(),
                seq_nr,
                payload,
                first: seq_nr == first,
                ack: ack && last,
            }
        };
        let Some((size, codec)) = &self.chunking else {
            let whole = sequenced(0, Payload::Message(message), true);
            self.remaining_chunks.push_back(whole);
            return Ok(());
        };
        let bytes = Bytes::from(codec.encode(&message)?);
        let chunks = Chunk::split(&bytes, *size).enumerate().map(|(i, chunk)| {
            let last = chunk.last_chunk;
            sequenced(i as u64, Payload::Chunk(chunk), last)
        });
        self.remaining_chunks.extend(chunks);
        Ok(())
    }

    /// Sends chunks while the consumer's window allows (no durable queue).
    pub(super) fn send_chunks(&mut self, now: Instant) {
        while self
            .remaining_chunks
            .front()
            .is_some_and(|m| m.seq_nr <= self.requested_seq_nr)
        {
            if let Some(chunk) = self.remaining_chunks.pop_front() {
                self.on_msg(chunk, now);
            }
        }
    }
}
