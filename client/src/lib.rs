//! Talking to a Fleet from Rust: load a tenant key, build and sign jobs, call `infer`
//! (request-reply) or `submit` (queued, answered at once; the result is stored on
//! `fleet.results.<tenant>.<job_id>` in `FLEET_RESULTS`).

pub mod bulk;
pub mod dlq;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use async_nats::{Client, RequestErrorKind, jetstream::stream::DirectGetErrorKind};
use fleet_schemas::{
    CodecError, ErrorCode, Job, JobResult, KeyError, ResultStatus, SecretKeyFile, SigningKey,
    SubmitReply, decode, encode, now_ms, subject,
};
pub use fleet_service::TraceParent;
use rand::Rng;

/// Largest answer a client accepts (a batch of embeddings is far smaller).
const MAX_ANSWER_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read key file {path}: {source}")]
    ReadKey {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is invalid: {source}")]
    ParseKey {
        path: String,
        source: toml::de::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(
        "nobody serves {subject}: no dispatcher is running for this model on this NATS server \
         (or this connection may not reach one)"
    )]
    NoDispatcher { subject: String },
    #[error("no answer on {subject} within {timeout:?}")]
    TimedOut { subject: String, timeout: Duration },
    #[error("request on {subject} failed: {source}")]
    Request {
        subject: String,
        source: async_nats::RequestError,
    },
    #[error(transparent)]
    Nats(#[from] fleet_service::NatsError),
    #[error("cannot read the stored result of job {job_id}: {reason}")]
    ReadResult { job_id: String, reason: String },
}

/// Who calls the fleet, where and for which model: the flags every Fleet client program takes.
#[derive(Debug, Clone, clap::Args)]
pub struct CallerArgs {
    #[command(flatten)]
    pub nats: fleet_service::NatsArgs,
    /// The tenant's secret key file.
    #[arg(long, env = "FLEET_KEY", default_value = "fleet-key.toml")]
    pub key: PathBuf,
    /// Model the jobs are for (`fleet.infer.<model>`, `fleet.submit.<model>`).
    #[arg(long, env = "FLEET_MODEL", default_value = fleet_schemas::DEFAULT_MODEL, value_parser = model_name)]
    pub model: String,
}

/// A model name must be one subject token, or no dispatcher could ever hear the call.
fn model_name(value: &str) -> Result<String, fleet_schemas::InvalidName> {
    fleet_schemas::validate_name("model", value).map(|()| value.to_owned())
}

impl CallerArgs {
    /// Loads the tenant's key, then connects to NATS.
    pub async fn connect(&self) -> Result<(Tenant, Client), ClientError> {
        let tenant = Tenant::from_key_file(&self.key)?;
        // Answers come only to the tenant's own inboxes (WIRE.md), so requests must use them.
        let options = async_nats::ConnectOptions::new()
            .custom_inbox_prefix(fleet_schemas::subject::inbox_prefix(&tenant.name));
        let client = self.nats.connect(options).await?;
        Ok((tenant, client))
    }
}

/// A tenant's identity: its name and signing key.
pub struct Tenant {
    pub name: String,
    pub key: SigningKey,
}

impl Tenant {
    pub fn from_key_file(path: &Path) -> Result<Self, ClientError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ClientError::ReadKey {
            path: shown.clone(),
            source,
        })?;
        let file: SecretKeyFile =
            toml::from_str(&text).map_err(|source| ClientError::ParseKey {
                path: shown,
                source,
            })?;
        Ok(Tenant {
            key: file.signing_key()?,
            name: file.tenant,
        })
    }

    /// An embedding job with a fresh random id, created now.
    pub fn embed_job(&self, model: &str, inputs: Vec<String>) -> Job {
        Job::embed(new_job_id(), self.name.clone(), model, inputs, now_ms())
    }

    pub fn sign(&self, job: &Job) -> Result<Vec<u8>, ClientError> {
        Ok(encode(&self.key.sign_job(job)?)?)
    }
}

/// A job id: 128 random bits in hex, valid as a subject token.
pub fn new_job_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Sends a job on `fleet.infer.<model>` and waits for its result (or the dispatcher's
/// rejection, which is a `JobResult` with status `rejected`). A job without a `deadline_ms` is
/// given one at the end of `timeout`: nobody waits for its answer after that, so a worker that
/// reaches it later answers `expired` instead of running it.
pub async fn infer(
    client: &Client,
    tenant: &Tenant,
    job: &Job,
    timeout: Duration,
) -> Result<JobResult, ClientError> {
    infer_in_trace(client, tenant, job, timeout, &TraceParent::new_trace()).await
}

/// [`infer`] as part of the caller's trace: `trace` is sent as the job's `traceparent`, which
/// the dispatcher, the worker and the stored result carry on (a new trace in [`infer`]).
pub async fn infer_in_trace(
    client: &Client,
    tenant: &Tenant,
    job: &Job,
    timeout: Duration,
    trace: &TraceParent,
) -> Result<JobResult, ClientError> {
    let subject = subject::infer(&job.model);
    if job.deadline_ms.is_some() {
        return request(client, tenant, job, subject, timeout, trace).await;
    }
    let mut job = job.clone();
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    job.deadline_ms = Some(now_ms().saturating_add(timeout_ms));
    request(client, tenant, &job, subject, timeout, trace).await
}

/// How hard a call is tried: attempts, how long each waits for its answer, and the pauses
/// between them (exponential from `first_pause` up to `max_pause`, each jittered by ±50% so
/// that callers refused together do not come back together).
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (at least one is made).
    pub attempts: u32,
    /// How long one attempt waits for its answer.
    pub timeout: Duration,
    pub first_pause: Duration,
    pub max_pause: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 8,
            timeout: Duration::from_secs(30),
            first_pause: Duration::from_millis(200),
            max_pause: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Waits before retry number `retry` (1 for the second attempt).
    async fn pause(&self, retry: u32) {
        let exponential = self
            .first_pause
            .saturating_mul(1 << retry.saturating_sub(1).min(16))
            .min(self.max_pause);
        let jitter = rand::thread_rng().gen_range(0.5..1.5);
        tokio::time::sleep(exponential.mul_f64(jitter)).await;
    }
}

/// Refusals that say "later, the same job": the queue was full or the tenant over its rate.
/// Not `no_worker`: no worker serves the model, which a few quick retries rarely change, and
/// retrying until one starts would bring back the long wait that refusal spares the caller; to
/// have a job run whenever a worker starts, `submit` it (the reply says `no_worker`).
pub fn is_retryable(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::Overloaded | ErrorCode::RateLimited)
}

/// What [`infer_retrying`] got: the last answer, and how many attempts it took beyond the first.
#[derive(Debug, Clone)]
pub struct Retried {
    pub result: JobResult,
    pub retries: u32,
}

/// [`infer`], tried again under the same job id while the answer is a timeout, no dispatcher,
/// `overloaded` or `rate_limited`, pausing as `policy` says. Keeping the id makes a retry safe:
/// a job the queue already holds is stored and run once, and the dispatcher answers a repeated
/// id with the first attempt's result. Each attempt is made anew (`created_at_ms` now, a
/// deadline at the end of its own timeout unless the job has one), so a long series of retries
/// is not refused `expired`. Fleet's refusals carry no retry-after hint (the dispatcher's token
/// bucket does not say when it refills), so the pauses come from `policy` alone.
///
/// The last answer is returned whatever it is (a `rejected` result included); the error is the
/// last attempt's when none was answered.
///
/// ```no_run
/// # async fn example(client: async_nats::Client, tenant: fleet_client::Tenant) -> Result<(), fleet_client::ClientError> {
/// use fleet_client::{RetryPolicy, infer_retrying};
/// let job = tenant.embed_job("all-minilm-l6-v2", vec!["hello".into()]);
/// let answer = infer_retrying(&client, &tenant, &job, &RetryPolicy::default()).await?;
/// println!("{:?} after {} retries", answer.result.status, answer.retries);
/// # Ok(()) }
/// ```
pub async fn infer_retrying(
    client: &Client,
    tenant: &Tenant,
    job: &Job,
    policy: &RetryPolicy,
) -> Result<Retried, ClientError> {
    let mut retries = 0;
    loop {
        let mut attempt = job.clone();
        attempt.created_at_ms = now_ms();
        let answer = infer(client, tenant, &attempt, policy.timeout).await;
        let again = match &answer {
            Ok(result) => {
                result.status == ResultStatus::Rejected
                    && result
                        .error
                        .as_ref()
                        .is_some_and(|error| is_retryable(error.code))
            }
            Err(ClientError::TimedOut { .. } | ClientError::NoDispatcher { .. }) => true,
            Err(_) => false,
        };
        if !again || retries + 1 >= policy.attempts {
            return answer.map(|result| Retried { result, retries });
        }
        retries += 1;
        policy.pause(retries).await;
    }
}

/// The stored result of one of `tenant`'s jobs, or None when there is none (not finished yet,
/// never sent, or past the results' retention). A direct get of the last message on
/// `fleet.results.<tenant>.<job_id>`, which a tenant may ask under the shipped broker
/// configuration (WIRE.md, "Reading results").
pub async fn stored_result(
    client: &Client,
    tenant: &str,
    job_id: &str,
) -> Result<Option<JobResult>, ClientError> {
    let failed = |reason: String| ClientError::ReadResult {
        job_id: job_id.to_owned(),
        reason,
    };
    // No STREAM.INFO: a tenant may not ask it (it would list every tenant's job ids).
    let results = async_nats::jetstream::new(client.clone())
        .get_stream_no_info(subject::RESULTS_STREAM)
        .await
        .map_err(|error| failed(error.to_string()))?;
    match results
        .direct_get_last_for_subject(subject::results(tenant, job_id))
        .await
    {
        Ok(message) => Ok(Some(decode(&message.payload, MAX_ANSWER_BYTES)?)),
        Err(error) if error.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(error) => Err(failed(error.to_string())),
    }
}

/// Sends a job on `fleet.submit.<model>`; the answer says whether it was queued.
pub async fn submit(
    client: &Client,
    tenant: &Tenant,
    job: &Job,
    timeout: Duration,
) -> Result<SubmitReply, ClientError> {
    submit_in_trace(client, tenant, job, timeout, &TraceParent::new_trace()).await
}

/// [`submit`] as part of the caller's trace (see [`infer_in_trace`]).
pub async fn submit_in_trace(
    client: &Client,
    tenant: &Tenant,
    job: &Job,
    timeout: Duration,
    trace: &TraceParent,
) -> Result<SubmitReply, ClientError> {
    let subject = subject::submit(&job.model);
    request(client, tenant, job, subject, timeout, trace).await
}

/// Signs `job`, sends it as a request on `subject` with `trace` as its `traceparent` header,
/// and decodes the answer.
async fn request<T: serde::de::DeserializeOwned>(
    client: &Client,
    tenant: &Tenant,
    job: &Job,
    subject: String,
    timeout: Duration,
    trace: &TraceParent,
) -> Result<T, ClientError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(subject::TRACEPARENT, trace.to_string().as_str());
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(tenant.sign(job)?.into())
        .timeout(Some(timeout));
    let answer = client
        .send_request(subject.clone(), request)
        .await
        .map_err(|source| match source.kind() {
            RequestErrorKind::NoResponders => ClientError::NoDispatcher { subject },
            RequestErrorKind::TimedOut => ClientError::TimedOut { subject, timeout },
            RequestErrorKind::Other
            | RequestErrorKind::InvalidSubject
            | RequestErrorKind::MaxPayloadExceeded => ClientError::Request { subject, source },
        })?;
    Ok(decode(&answer.payload, MAX_ANSWER_BYTES)?)
}
