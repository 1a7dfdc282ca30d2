//! Which broker answers mean "not now" rather than "no": the same request may well succeed
//! later without anyone changing anything (a cluster electing the leader the request needs, a
//! connection being re-established). Stream and consumer setup wait such answers out; so does
//! a worker storing a result.

use async_nats::jetstream::{
    self, ErrorCode,
    context::{RequestError, RequestErrorKind},
};

/// A request that timed out or was cut off by a lost connection; not one nobody answers (a
/// server without JetStream), nor a malformed one.
pub fn request(error: &RequestError) -> bool {
    matches!(
        error.kind(),
        RequestErrorKind::TimedOut | RequestErrorKind::Other
    )
}

/// What JetStream answers while a cluster is electing the leader a request needs (its nodes
/// restarting, its quorum lost and not yet back).
pub fn jetstream(error: &jetstream::Error) -> bool {
    [
        ErrorCode::CLUSTER_NOT_AVAILABLE,
        ErrorCode::CLUSTER_NOT_LEADER,
        ErrorCode::CLUSTER_INCOMPLETE,
        ErrorCode::CLUSTER_NO_PEERS,
    ]
    .contains(&error.error_code())
}

/// Logs a broker that cannot answer yet once per wait, not at every retry.
#[derive(Default)]
pub struct Unavailable {
    logged: bool,
}

impl Unavailable {
    pub fn note(&mut self, error: &dyn std::fmt::Display) {
        if self.logged {
            tracing::debug!(%error, "JetStream still cannot answer; asking again");
        } else {
            self.logged = true;
            tracing::warn!(%error, "JetStream cannot answer yet (a cluster electing its leaders?); asking again until it can");
        }
    }
}
