use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// A machine-readable code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// The job ran; `output` is set.
    Ok,
    /// A worker took the job and could not complete it; `error` is set.
    Failed,
    /// The dispatcher refused the job; nothing was queued; `error` is set.
    Rejected,
}

/// The answer to a job: on the caller's reply subject for `infer`, and stored on
/// `fleet.results.<tenant>.<job_id>` for every job a worker finishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// Empty only in a rejection of an envelope whose job could not be read.
    pub job_id: String,
    pub tenant: String,
    pub model: String,
    pub status: ResultStatus,
    #[serde(default)]
    pub output: Option<Output>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
    /// Which worker (or dispatcher) produced this answer.
    pub worker: String,
    #[serde(default)]
    pub timings: Timings,
}

impl JobResult {
    pub fn error_code(&self) -> Option<ErrorCode> {
        self.error.as_ref().map(|e| e.code)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Output {
    /// One vector per input, in input order.
    Embeddings { dims: u32, vectors: Vec<Vec<f32>> },
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// From the job's arrival in the queue to the start of its batch.
    pub queue_ms: u64,
    /// The model's run over the batches that held the job's inputs.
    pub inference_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubmitStatus {
    Accepted,
    Rejected,
}

/// The dispatcher's immediate answer on `fleet.submit.<model>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitReply {
    pub status: SubmitStatus,
    /// Empty only when the job could not be read.
    pub job_id: String,
    /// Sequence of the job in `FLEET_JOBS` when accepted.
    #[serde(default)]
    pub stream_seq: Option<u64>,
    /// True when the job id was already in the queue's duplicate window: stored once.
    #[serde(default)]
    pub duplicate: bool,
    #[serde(default)]
    pub error: Option<ErrorBody>,
    /// True when no worker served the job's model as it was queued: it waits until one starts
    /// (`WIRE.md`). Left out when false, so such a reply is byte for byte what it was before the
    /// key existed, and readers that predate it skip it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_worker: bool,
}
