//! Turning messages into bytes and back, for the two places that need it: chunking large
//! messages, and durable producer queues that keep messages on disk.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A message could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("codec: {0}")]
pub struct CodecError(pub String);

/// Encodes and decodes messages of type `M`.
pub trait Codec<M>: Send + Sync + 'static {
    /// The message as bytes.
    fn encode(&self, message: &M) -> Result<Vec<u8>, CodecError>;
    /// A message from bytes made by [`Self::encode`].
    fn decode(&self, bytes: &[u8]) -> Result<M, CodecError>;
}

/// JSON through serde: self-describing, tolerant of added fields.
#[derive(Clone, Copy, Debug, Default)]
pub struct JsonCodec;

impl<M: Serialize + DeserializeOwned> Codec<M> for JsonCodec {
    fn encode(&self, message: &M) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(message).map_err(|e| CodecError(e.to_string()))
    }

    fn decode(&self, bytes: &[u8]) -> Result<M, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError(e.to_string()))
    }
}

/// Raw bytes as they are: for byte-string messages, and for tests that count bytes exactly.
#[derive(Clone, Copy, Debug, Default)]
pub struct BytesCodec;

impl Codec<Vec<u8>> for BytesCodec {
    fn encode(&self, message: &Vec<u8>) -> Result<Vec<u8>, CodecError> {
        Ok(message.clone())
    }

    fn decode(&self, bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
        Ok(bytes.to_vec())
    }
}

/// UTF-8 text as its bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct TextCodec;

impl Codec<String> for TextCodec {
    fn encode(&self, message: &String) -> Result<Vec<u8>, CodecError> {
        Ok(message.as_bytes().to_vec())
    }

    fn decode(&self, bytes: &[u8]) -> Result<String, CodecError> {
        String::from_utf8(bytes.to_vec()).map_err(|e| CodecError(e.to_string()))
    }
}
