//! Fleet's wire contract: the messages that cross NATS, the subjects and headers they travel
//! on, the error codes, the MessagePack codec and Ed25519 job signing. No I/O lives here, so
//! every other crate (and the wire specification in `WIRE.md`) can stand on it.

mod codec;
mod error_code;
mod job;
mod name;
mod result;
mod signing;
mod strict;
pub mod subject;

pub use codec::{CodecError, Decode, DecodeError, WireType, decode, encode};
pub use error_code::{ErrorCode, UnknownErrorCode};
pub use job::{ENVELOPE_VERSION, Job, SignedJob, Task};
pub use name::{InvalidName, validate_name};
pub use result::{ErrorBody, JobResult, Output, ResultStatus, SubmitReply, SubmitStatus, Timings};
pub use signing::{KeyError, SecretKeyFile, SigningKey, VerifyError, VerifyingKey};

/// The NATS server every Fleet program talks to unless told otherwise.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
/// The model every Fleet program serves or asks for unless told otherwise (as named in subjects).
pub const DEFAULT_MODEL: &str = "all-minilm-l6-v2";

/// Unix time in milliseconds, the unit of `created_at_ms` and `deadline_ms`. A clock before 1970
/// reads as 0, which every age check then treats as very old.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
