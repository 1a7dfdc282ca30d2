//! Reading a job out of a queued message, and checking that it may run. The dispatcher checked
//! it already, but anything with publish rights on the queue can put a job there (a leaked
//! dispatcher or worker credential), so a worker runs only what the tenant's key signed.

use fleet_keys::{Denied, KeyStore};
use fleet_schemas::{CodecError, ErrorCode, InvalidName, Job, SignedJob, decode, validate_name};

/// The job in a queued message, with the names that become subject tokens and header values
/// checked. Its signature is not checked: for jobs already refused or run, to find their tenant.
pub fn decode_job(payload: &[u8], max_bytes: usize) -> Result<Job, ReadJobError> {
    let envelope: SignedJob = decode(payload, max_bytes).map_err(ReadJobError::Envelope)?;
    decode_body(&envelope, max_bytes)
}

fn decode_body(envelope: &SignedJob, max_bytes: usize) -> Result<Job, ReadJobError> {
    let job: Job = decode(&envelope.body, max_bytes).map_err(ReadJobError::Body)?;
    validate_name("job_id", &job.job_id)?;
    validate_name("tenant", &job.tenant)?;
    Ok(job)
}

/// The job in a queued message, once its tenant's key verified the signature over the exact
/// body and allows it (the key is valid for the job's time and not revoked, speaks for the job's
/// tenant, and the tenant may use the job's model). The body is read only after the signature
/// verified. The key's id is recorded as `key_id` on the current span (the job's).
pub async fn read_verified_job(
    payload: &[u8],
    max_bytes: usize,
    keys: &KeyStore,
    now_ms: u64,
) -> Result<Job, ReadJobError> {
    let envelope: SignedJob = decode(payload, max_bytes).map_err(ReadJobError::Envelope)?;
    tracing::Span::current().record("key_id", envelope.key_id.as_str());
    // A key added moments ago (the dispatcher may have read it first) is looked up again, at
    // most once per refresh interval.
    let key = keys
        .key_or_reload(&envelope.key_id)
        .await
        .ok_or_else(|| Denied::UnknownKey(envelope.key_id.clone()))?;
    key.verify(&envelope)?;
    let job = decode_body(&envelope, max_bytes)?;
    keys.authorize(&key, &job, now_ms)?;
    Ok(job)
}

/// Why a message on the queue is not a job this worker can run.
#[derive(Debug, thiserror::Error)]
pub enum ReadJobError {
    #[error("bad envelope: {0}")]
    Envelope(CodecError),
    #[error("bad job: {0}")]
    Body(CodecError),
    #[error("bad job: {0}")]
    Name(#[from] InvalidName),
    #[error("job for model {job:?} on the queue of {queue:?}")]
    WrongModel { job: String, queue: String },
    #[error("refused: {0}")]
    Denied(#[from] Denied),
}

impl ReadJobError {
    /// The wire code of the refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReadJobError::Denied(denied) => denied.code(),
            _ => ErrorCode::Malformed,
        }
    }
}
