use std::collections::BTreeMap;

use serde::Serialize;

/// The only envelope version this build speaks.
pub const ENVELOPE_VERSION: u8 = 1;

/// What travels on `fleet.infer.<model>` and `fleet.submit.<model>`: a MessagePack-encoded
/// [`Job`] and an Ed25519 signature over exactly those bytes. Keeping the body as bytes (not
/// a nested map) means the verifier checks what the signer signed, with no re-encoding.
///
/// Read with [`decode`](crate::decode), which accepts exactly what WIRE.md describes. Neither
/// this nor [`Job`] derives serde's `Deserialize`, which would read them leniently (and would
/// conflict with their strict `Decode`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedJob {
    pub v: u8,
    pub key_id: String,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// One unit of work and of acknowledgement. Read with [`decode`](crate::decode), strictly like
/// [`SignedJob`]; an absent optional key takes the default given on its field.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Job {
    pub job_id: String,
    pub tenant: String,
    pub model: String,
    pub task: Task,
    /// 0 (the default) is normal. Reserved for ordering: workers do not yet order by it.
    pub priority: u8,
    /// When the client made the job, Unix milliseconds; bounds replay.
    pub created_at_ms: u64,
    /// After this instant (Unix milliseconds) the job is answered `expired`, not run. None by
    /// default.
    pub deadline_ms: Option<u64>,
    /// Free-form client annotations, signed and queued with the job (not copied into the result).
    /// Empty by default.
    pub meta: BTreeMap<String, String>,
}

impl Job {
    /// An embedding job with the defaults a client usually wants: normalised vectors, inputs
    /// truncated to the model's maximum, normal priority, no deadline, no annotations.
    pub fn embed(
        job_id: impl Into<String>,
        tenant: impl Into<String>,
        model: impl Into<String>,
        inputs: Vec<String>,
        created_at_ms: u64,
    ) -> Self {
        Job {
            job_id: job_id.into(),
            tenant: tenant.into(),
            model: model.into(),
            task: Task::Embed {
                inputs,
                normalize: true,
                truncate: true,
            },
            priority: 0,
            created_at_ms,
            deadline_ms: None,
            meta: BTreeMap::new(),
        }
    }
}

/// What to compute. Tagged by `kind` on the wire, so new kinds can be added.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Task {
    /// Sentence embeddings, one vector per input text.
    Embed {
        inputs: Vec<String>,
        /// L2-normalise each vector (true by default).
        normalize: bool,
        /// Cut inputs longer than the model's maximum instead of failing them (true by default).
        truncate: bool,
    },
}

impl Task {
    pub fn inputs(&self) -> &[String] {
        match self {
            Task::Embed { inputs, .. } => inputs,
        }
    }
}
