//! Admission of one signed job: every check that needs no I/O, cheapest and least revealing
//! first, so a forged or garbled envelope costs little and learns nothing about tenants.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use fleet_schemas::{
    CodecError, ENVELOPE_VERSION, ErrorBody, ErrorCode, Job, SignedJob, decode, validate_name,
};

use fleet_keys::{Denied, KeyStore};
use prometheus_client::metrics::histogram::Histogram;

/// Limits on what a job may carry and when it may arrive.
#[derive(Debug, Clone)]
pub struct AdmissionLimits {
    /// Largest envelope accepted, in bytes.
    pub max_envelope_bytes: usize,
    /// Most input texts in one job.
    pub max_inputs: usize,
    /// Largest single input text, in bytes.
    pub max_input_bytes: usize,
    /// Oldest `created_at_ms` accepted, relative to now: bounds replay.
    pub max_job_age: Duration,
    /// How far in the future `created_at_ms` may lie (client clocks drift).
    pub max_clock_skew: Duration,
}

impl Default for AdmissionLimits {
    fn default() -> Self {
        AdmissionLimits {
            max_envelope_bytes: 1 << 20,
            max_inputs: 256,
            max_input_bytes: 32 << 10,
            max_job_age: Duration::from_secs(60),
            max_clock_skew: Duration::from_secs(30),
        }
    }
}

/// A refused job: the code, why, and the job id when it could be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub job_id: String,
    pub tenant: String,
    /// The key the envelope names, for the audit trail: verified when the refusal came after
    /// the signature, only claimed for `unknown_key` and `bad_signature`; empty when the
    /// envelope could not be read or names no well-formed key id.
    pub key_id: String,
    pub error: ErrorBody,
}

impl Rejection {
    /// A refusal before the job could be read.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            job_id: String::new(),
            tenant: String::new(),
            key_id: String::new(),
            error: ErrorBody::new(code, message),
        }
    }

    fn for_job(job: &Job, code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            job_id: job.job_id.clone(),
            tenant: job.tenant.clone(),
            key_id: String::new(),
            error: ErrorBody::new(code, message),
        }
    }

    /// A refusal of a job that passed admission (rate limit, queue, reply subject).
    pub fn for_admitted(admitted: &Admitted, code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection {
            key_id: admitted.key_id.clone(),
            ..Rejection::for_job(&admitted.job, code, message)
        }
    }

    pub fn code(&self) -> ErrorCode {
        self.error.code
    }
}

fn refusal(denied: &Denied) -> Rejection {
    Rejection::new(denied.code(), denied.to_string())
}

/// A job that passed every stateless check.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub job: Job,
    pub key_id: String,
}

pub struct Validator {
    keys: KeyStore,
    models: HashSet<String>,
    limits: AdmissionLimits,
    /// Observes each key look-up and signature check, when set.
    verification_seconds: Option<Histogram>,
}

impl Validator {
    pub fn new(
        keys: KeyStore,
        models: impl IntoIterator<Item = String>,
        limits: AdmissionLimits,
    ) -> Self {
        Validator {
            keys,
            models: models.into_iter().collect(),
            limits,
            verification_seconds: None,
        }
    }

    /// Times every key look-up and signature check into `histogram`.
    pub fn timing_verification(mut self, histogram: Histogram) -> Self {
        self.verification_seconds = Some(histogram);
        self
    }

    /// The tenants' keys and policies the checks read.
    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// Checks an envelope that arrived on the subject of `subject_model`, at `now_ms`.
    pub fn admit(
        &self,
        subject_model: &str,
        payload: &[u8],
        now_ms: u64,
    ) -> Result<Admitted, Rejection> {
        if !self.models.contains(subject_model) {
            return Err(Rejection::new(
                ErrorCode::UnknownModel,
                format!("model {subject_model:?} is not served"),
            ));
        }
        let envelope: SignedJob =
            decode(payload, self.limits.max_envelope_bytes).map_err(codec_rejection)?;
        if envelope.v != ENVELOPE_VERSION {
            return Err(Rejection::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "envelope version {} is not supported (expected {ENVELOPE_VERSION})",
                    envelope.v
                ),
            ));
        }
        // The key id is kept for the audit trail only when it is a well-formed name: a claimed
        // one is the sender's text, and must not write anything odd into the logs.
        let key_id = validate_name("key_id", &envelope.key_id)
            .map(|()| envelope.key_id.clone())
            .unwrap_or_default();
        self.admit_signed(subject_model, envelope, now_ms)
            .map_err(|rejection| Rejection {
                key_id,
                ..rejection
            })
    }

    /// [`Validator::admit`] once the envelope is read: its signature, then the job.
    fn admit_signed(
        &self,
        subject_model: &str,
        envelope: SignedJob,
        now_ms: u64,
    ) -> Result<Admitted, Rejection> {
        // The body is read only once its signature verified.
        let started = Instant::now();
        let verified = self.keys.verify(&envelope);
        if let Some(histogram) = &self.verification_seconds {
            histogram.observe(started.elapsed().as_secs_f64());
        }
        let key = verified.map_err(|denied| refusal(&denied))?;
        let job: Job =
            decode(&envelope.body, self.limits.max_envelope_bytes).map_err(codec_rejection)?;
        for (what, value) in [
            ("job_id", &job.job_id),
            ("tenant", &job.tenant),
            ("model", &job.model),
        ] {
            validate_name(what, value)
                .map_err(|e| Rejection::new(ErrorCode::Malformed, e.to_string()))?;
        }
        if job.model != subject_model {
            return Err(Rejection::for_job(
                &job,
                ErrorCode::Malformed,
                format!(
                    "job is for model {:?} but was sent to {subject_model:?}",
                    job.model
                ),
            ));
        }
        self.keys
            .authorize(&key, &job, now_ms)
            .map_err(|denied| Rejection::for_job(&job, denied.code(), denied.to_string()))?;
        self.check_time(&job, now_ms)?;
        self.check_size(&job)?;
        Ok(Admitted {
            job,
            key_id: envelope.key_id,
        })
    }

    fn check_time(&self, job: &Job, now_ms: u64) -> Result<(), Rejection> {
        let oldest = now_ms.saturating_sub(self.limits.max_job_age.as_millis() as u64);
        let newest = now_ms.saturating_add(self.limits.max_clock_skew.as_millis() as u64);
        if job.created_at_ms < oldest {
            return Err(Rejection::for_job(
                job,
                ErrorCode::Expired,
                format!(
                    "created {} ms ago; jobs older than {} ms are refused",
                    now_ms - job.created_at_ms,
                    self.limits.max_job_age.as_millis()
                ),
            ));
        }
        if job.created_at_ms > newest {
            return Err(Rejection::for_job(
                job,
                ErrorCode::Expired,
                format!(
                    "created {} ms in the future; check the client's clock",
                    job.created_at_ms - now_ms
                ),
            ));
        }
        if let Some(deadline) = job.deadline_ms
            && deadline <= now_ms
        {
            return Err(Rejection::for_job(
                job,
                ErrorCode::Expired,
                "the job's deadline has passed",
            ));
        }
        Ok(())
    }

    fn check_size(&self, job: &Job) -> Result<(), Rejection> {
        let inputs = job.task.inputs();
        if inputs.is_empty() {
            return Err(Rejection::for_job(
                job,
                ErrorCode::Malformed,
                "the job has no inputs",
            ));
        }
        if inputs.len() > self.limits.max_inputs {
            return Err(Rejection::for_job(
                job,
                ErrorCode::TooLarge,
                format!(
                    "{} inputs; at most {} per job",
                    inputs.len(),
                    self.limits.max_inputs
                ),
            ));
        }
        if let Some((index, input)) = inputs
            .iter()
            .enumerate()
            .find(|(_, input)| input.len() > self.limits.max_input_bytes)
        {
            return Err(Rejection::for_job(
                job,
                ErrorCode::TooLarge,
                format!(
                    "input {index} is {} bytes; at most {} per input",
                    input.len(),
                    self.limits.max_input_bytes
                ),
            ));
        }
        Ok(())
    }
}

fn codec_rejection(err: CodecError) -> Rejection {
    let code = match err {
        CodecError::TooLarge { .. } => ErrorCode::TooLarge,
        CodecError::Malformed(_) | CodecError::Encode(_) => ErrorCode::Malformed,
    };
    Rejection::new(code, err.to_string())
}
