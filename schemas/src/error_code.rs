use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

/// Stable error codes. The string form is part of the wire contract: it travels in result
/// bodies and in the `Nats-Service-Error-Code` header, and clients match on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The envelope or the job inside it is not valid MessagePack of the right shape.
    Malformed,
    /// The envelope names a version this build does not speak.
    UnsupportedVersion,
    /// No public key is registered under the envelope's `key_id`.
    UnknownKey,
    /// The signature does not verify over the exact body bytes.
    BadSignature,
    /// The key's tenant is not the job's tenant, or the tenant may not use the model.
    Forbidden,
    /// `created_at_ms` is too old or too far in the future, or the deadline has passed.
    Expired,
    /// The message, an input, or the number of inputs is over a limit.
    TooLarge,
    /// No such model is served.
    UnknownModel,
    /// The tenant is over its rate limit.
    RateLimited,
    /// The queue is full or the fleet cannot take the job now; retry later.
    Overloaded,
    /// No live worker serves the model now, so an `infer` would only wait out its timeout: it
    /// is refused instead and nothing is queued (a `submit` is still queued).
    NoWorker,
    /// An input is longer than the model's maximum and the job did not ask for truncation.
    InputTooLong,
    /// Something failed inside the fleet; the job may be retried.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::Malformed,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownKey,
        ErrorCode::BadSignature,
        ErrorCode::Forbidden,
        ErrorCode::Expired,
        ErrorCode::TooLarge,
        ErrorCode::UnknownModel,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::NoWorker,
        ErrorCode::InputTooLong,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownKey => "unknown_key",
            ErrorCode::BadSignature => "bad_signature",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Expired => "expired",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::NoWorker => "no_worker",
            ErrorCode::InputTooLong => "input_too_long",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown error code {0:?}")]
pub struct UnknownErrorCode(pub String);

impl FromStr for ErrorCode {
    type Err = UnknownErrorCode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_str() == s)
            .ok_or_else(|| UnknownErrorCode(s.to_owned()))
    }
}
