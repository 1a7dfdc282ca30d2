use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why bytes could not be turned into a message, or a message into bytes.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("message is {len} bytes, the limit is {max}")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(#[from] DecodeError),
    #[error("cannot encode message: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
}

/// The MessagePack types, as WIRE.md names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireType {
    Nil,
    Bool,
    Int,
    Float,
    Str,
    Bin,
    Array,
    Map,
    Ext,
    /// The byte 0xc1, which MessagePack never uses.
    Reserved,
}

impl std::fmt::Display for WireType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WireType::Nil => "nil",
            WireType::Bool => "bool",
            WireType::Int => "int",
            WireType::Float => "float",
            WireType::Str => "str",
            WireType::Bin => "bin",
            WireType::Array => "array",
            WireType::Map => "map",
            WireType::Ext => "ext",
            WireType::Reserved => "the reserved byte 0xc1",
        })
    }
}

/// Why bytes are not the message asked for. The variants other than `Serde` come from the
/// strict reading of the signed messages ([`SignedJob`](crate::SignedJob) and
/// [`Job`](crate::Job)), which accepts exactly what WIRE.md describes.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// From rmp-serde, for the messages read through serde.
    #[error("{0}")]
    Serde(#[from] rmp_serde::decode::Error),
    #[error("the message ends in the middle of a value")]
    Truncated,
    #[error("{0} bytes follow the message")]
    TrailingBytes(usize),
    #[error("{field} must be {expected}, found {found}")]
    WrongType {
        field: &'static str,
        expected: WireType,
        found: WireType,
    },
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("{field} is {value}, out of range")]
    OutOfRange { field: &'static str, value: i128 },
    #[error("{map} has unknown key {:?}", shorten(.key))]
    UnknownKey { map: &'static str, key: String },
    #[error("{map} has key {:?} twice", shorten(.key))]
    DuplicateKey { map: &'static str, key: String },
    #[error("{map} lacks key {key:?}")]
    MissingKey {
        map: &'static str,
        key: &'static str,
    },
    #[error("unknown task kind {:?}", shorten(.0))]
    UnknownTaskKind(String),
}

/// A sender's string as an error message shows it: at most 64 characters (the message goes
/// back to the sender and into logs).
fn shorten(s: &str) -> &str {
    s.char_indices().nth(64).map_or(s, |(i, _)| &s[..i])
}

/// A message [`decode`] can read: the signed messages strictly (see `strict.rs`), every
/// serde type (the answers, `JobResult` and `SubmitReply`) through rmp-serde, leniently, so
/// that clients keep reading the answers of newer dispatchers and workers.
pub trait Decode: Sized {
    /// Reads one message from `bytes`.
    fn decode_msgpack(bytes: &[u8]) -> Result<Self, DecodeError>;
}

impl<T: DeserializeOwned> Decode for T {
    fn decode_msgpack(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

/// Encodes a message as MessagePack with named fields (maps), so clients in any language can
/// read it without knowing field order.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, CodecError> {
    Ok(rmp_serde::to_vec_named(message)?)
}

/// Decodes a MessagePack message, refusing anything longer than `max_len` bytes before parsing.
pub fn decode<T: Decode>(bytes: &[u8], max_len: usize) -> Result<T, CodecError> {
    if bytes.len() > max_len {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            max: max_len,
        });
    }
    Ok(T::decode_msgpack(bytes)?)
}
