//! Reading a job out of a queued message.

use fleet_schemas::{CodecError, InvalidName, Job, SignedJob, decode, validate_name};

/// The job in a queued message, with the names that become subject tokens and header values
/// checked: the dispatcher checked them, but anything with publish rights on the queue can put
/// a job there.
pub fn decode_job(payload: &[u8], max_bytes: usize) -> Result<Job, ReadJobError> {
    let envelope: SignedJob = decode(payload, max_bytes).map_err(ReadJobError::Envelope)?;
    let job: Job = decode(&envelope.body, max_bytes).map_err(ReadJobError::Body)?;
    validate_name("job_id", &job.job_id)?;
    validate_name("tenant", &job.tenant)?;
    Ok(job)
}

/// Why a message on the queue is not a job this worker can run (it is dead-lettered).
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
}
