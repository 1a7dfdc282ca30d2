use serde::{Serialize, de::DeserializeOwned};

/// Why bytes could not be turned into a message, or a message into bytes.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message is {len} bytes, the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed MessagePack: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    #[error("cannot encode message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

/// Encodes a message as MessagePack with named fields (maps), so clients in any language can
/// read it without knowing field order.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec_named(message)?)
}

/// Decodes a MessagePack message, refusing anything longer than `max_len` bytes before parsing.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<T, CodecError> {
    if bytes.len() > max_len {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            max: max_len,
        });
    }
    Ok(rmp_serde::from_slice(bytes)?)
}
