//! Fleet's wire contract: the messages that cross NATS, the subjects and headers they travel
//! on, the error codes, the MessagePack codec and Ed25519 job signing. No I/O lives here, so
//! every other crate (and the wire specification in `WIRE.md`) can stand on it.

mod codec;
mod error_code;
mod job;
mod name;
mod result;
mod signing;
pub mod subject;

pub use codec::{CodecError, decode, encode};
pub use error_code::{ErrorCode, UnknownErrorCode};
pub use job::{ENVELOPE_VERSION, Job, SignedJob, Task};
pub use name::{InvalidName, validate_name};
pub use result::{ErrorBody, JobResult, Output, ResultStatus, SubmitReply, SubmitStatus, Timings};
pub use signing::{KeyError, SecretKeyFile, SigningKey, VerifyError, VerifyingKey};
