//! Answering a job and settling its message, in the one order that survives crashes: store the
//! result, answer the synchronous caller, and only then acknowledge, with a confirmed ack. A
//! failure before the ack leaves the job to be redelivered; the store keeps one result per job
//! (deduplicated by tenant and job id, and one message per result subject).

use std::time::Duration;

use async_nats::{
    HeaderMap,
    jetstream::{self, AckKind, context::PublishError},
};
use fleet_schemas::{
    CodecError, ErrorBody, ErrorCode, Job, JobResult, Output, ResultStatus, Timings, encode,
    subject,
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::OwnedSemaphorePermit;

use crate::{
    metrics::{Metrics, Outcome},
    pipeline::decode_job,
};

/// A job message this worker holds: it must end in exactly one ack, nak or term.
pub struct Held {
    pub msg: jetstream::Message,
    /// The synchronous caller's inbox, from the `Fleet-Reply-To` header.
    pub reply_to: Option<String>,
    /// Keeps the server from redelivering while the job waits or runs; stops when dropped.
    pub progress: ProgressGuard,
    /// This job's place in the worker's in-flight bound, given back when it is settled.
    pub permit: InFlightPermit,
}

/// A place in the in-flight bound, counted in the `in_flight` gauge while held.
pub struct InFlightPermit {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl InFlightPermit {
    pub fn new(permit: OwnedSemaphorePermit, metrics: &Metrics) -> InFlightPermit {
        metrics.in_flight.inc();
        InFlightPermit {
            _permit: permit,
            gauge: metrics.in_flight.clone(),
        }
    }
}

impl Drop for InFlightPermit {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Held {
    /// How many times the server has delivered this message (1 on the first delivery).
    pub fn delivered(&self) -> i64 {
        self.msg.info().map_or(1, |info| info.delivered)
    }

    /// Where the result of this message's `job` goes.
    fn destination<'a>(&'a self, job: Option<&'a Job>) -> Destination<'a> {
        Destination {
            job,
            job_seq: self.msg.info().ok().map(|info| info.stream_sequence),
            reply_to: self.reply_to.as_deref(),
        }
    }

    /// Hands the job back for a later delivery.
    async fn nak(self, delay: Duration) {
        drop(self.progress);
        if let Err(error) = self.msg.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(%error, "cannot nak job; it is redelivered after ack wait");
        }
    }
}

/// Where a result goes: stored under its job's tenant and id (when the job could be read),
/// tagged with the job's sequence on the queue, and sent to the synchronous caller, if any.
struct Destination<'a> {
    job: Option<&'a Job>,
    job_seq: Option<u64>,
    reply_to: Option<&'a str>,
}

/// Sends in-progress acks for one message until dropped.
pub struct ProgressGuard(tokio::task::JoinHandle<()>);

impl ProgressGuard {
    pub fn start(
        js: &jetstream::Context,
        msg: &jetstream::Message,
        every: Duration,
    ) -> ProgressGuard {
        let acker = jetstream::message::Acker::new(js.clone(), msg.reply.clone());
        ProgressGuard(tokio::spawn(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                ticker.tick().await;
                if let Err(error) = acker.ack_with(AckKind::Progress).await {
                    tracing::warn!(%error, "cannot send in-progress ack");
                }
            }
        }))
    }
}

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("cannot encode result: {0}")]
    Encode(#[from] CodecError),
    #[error("cannot store result on {subject}: {source}")]
    Store {
        subject: String,
        source: PublishError,
    },
    #[error("cannot dead-letter job on {subject}: {source}")]
    DeadLetter {
        subject: String,
        source: PublishError,
    },
    #[error("cannot settle job message: {0}")]
    Settle(#[source] async_nats::Error),
}

/// Everything needed to answer jobs and settle their messages.
pub struct Responder {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub worker: String,
    pub model: String,
    pub max_deliver: i64,
    pub retry_delay: Duration,
    pub metrics: Metrics,
}

impl Responder {
    /// A finished job: store and send its vectors, then ack.
    pub async fn succeed(&self, held: Held, job: &Job, vectors: Vec<Vec<f32>>, timings: Timings) {
        let result = JobResult {
            job_id: job.job_id.clone(),
            tenant: job.tenant.clone(),
            model: job.model.clone(),
            status: ResultStatus::Ok,
            output: Some(Output::Embeddings {
                dims: vectors.first().map_or(0, |v| v.len() as u32),
                vectors,
            }),
            error: None,
            worker: self.worker.clone(),
            timings,
        };
        self.settle_with_result(held, Some(job), result, Outcome::Ok)
            .await;
    }

    /// A job answered with an error that retrying cannot fix (e.g. expired): store and send the
    /// error, then ack.
    pub async fn fail(
        &self,
        held: Held,
        job: &Job,
        code: ErrorCode,
        message: String,
        outcome: Outcome,
    ) {
        let result = self.failed_result(Some(job), code, message);
        self.settle_with_result(held, Some(job), result, outcome)
            .await;
    }

    /// A failure that may pass (results not stored, model runtime error): nak with a delay, or
    /// dead-letter when this was the last delivery allowed.
    pub async fn retry(&self, held: Held, job: Option<&Job>, reason: String) {
        let delivered = held.delivered();
        if delivered >= self.max_deliver {
            let reason = format!(
                "failed on delivery {delivered} of {}: {reason}",
                self.max_deliver
            );
            self.dead_letter(held, job, ErrorCode::Internal, reason)
                .await;
            return;
        }
        tracing::warn!(job_id = job.map(|j| j.job_id.as_str()), delivered, %reason, "job failed; retrying later");
        held.nak(self.retry_delay).await;
        self.metrics.job(Outcome::Retried);
    }

    /// Poison (or out of retries): keep the original message on the dead-letter stream with the
    /// reason, store and send the failed result, and stop redelivery. Without a dead-letter
    /// record and a stored result the job is not dropped: it is naked and comes back (after its
    /// last delivery, as an exhausted job).
    pub async fn dead_letter(
        &self,
        held: Held,
        job: Option<&Job>,
        code: ErrorCode,
        reason: String,
    ) {
        // The id the job was queued under; read from the message when the job cannot be.
        let msg_id = match job {
            Some(job) => Some(subject::msg_id(&job.tenant, &job.job_id)),
            None => held
                .msg
                .headers
                .as_ref()
                .and_then(|headers| headers.get(subject::MSG_ID))
                .map(|id| id.as_str().to_owned()),
        };
        let stored = self
            .store_dead_letter(&reason, msg_id.as_deref(), held.msg.payload.clone())
            .await;
        if let Err(error) = stored {
            tracing::error!(%error, "job stays queued");
            held.nak(self.retry_delay).await;
            return;
        }
        let result = self.failed_result(job, code, reason.clone());
        if let Err(error) = self.publish_result(&held.destination(job), &result).await {
            tracing::error!(%error, "dead-lettered job's result not stored; job stays queued");
            held.nak(self.retry_delay).await;
            return;
        }
        tracing::warn!(job_id = job.map(|j| j.job_id.as_str()), %code, %reason, "job dead-lettered");
        drop(held.progress);
        match held.msg.double_ack_with(AckKind::Term).await {
            Ok(()) => self.metrics.job(Outcome::DeadLettered),
            Err(error) => {
                tracing::warn!(error = %AnswerError::Settle(error), "dead-lettered job not terminated; a redelivery dead-letters it again")
            }
        }
    }

    /// Keeps a job's original message on `fleet.dlq.<model>` with the reason, once (by job id).
    async fn store_dead_letter(
        &self,
        reason: &str,
        msg_id: Option<&str>,
        payload: bytes::Bytes,
    ) -> Result<(), AnswerError> {
        let dlq_subject = subject::dlq(&self.model);
        let mut headers = HeaderMap::new();
        headers.insert(subject::DLQ_REASON, subject::header_text(reason).as_ref());
        if let Some(id) = msg_id {
            headers.insert(subject::MSG_ID, id);
        }
        let stored = async {
            self.js
                .publish_with_headers(dlq_subject.clone(), headers, payload)
                .await?
                .await
        }
        .await;
        stored.map(drop).map_err(|source| AnswerError::DeadLetter {
            subject: dlq_subject,
            source,
        })
    }

    /// A job whose last delivery was never settled (its worker stopped, or the ack wait ran out
    /// on every delivery): the server will not deliver it again, but the work queue keeps it.
    /// Keeps it on the dead-letter stream with the reason, answers its caller where the job
    /// can be read, and only then deletes it from the queue.
    pub async fn dead_letter_exhausted(&self, sequence: u64, deliveries: u64) {
        let jobs = match self.js.get_stream(subject::JOBS_STREAM).await {
            Ok(jobs) => jobs,
            Err(error) => {
                tracing::error!(sequence, %error, "exhausted job not dead-lettered");
                return;
            }
        };
        let message = match jobs.get_raw_message(sequence).await {
            Ok(message) => message,
            // Settled meanwhile (a late ack), or taken by another worker's handler.
            Err(error) => {
                tracing::debug!(sequence, %error, "exhausted job no longer queued");
                return;
            }
        };
        let reason = format!(
            "delivered {deliveries} times and never settled (its worker stopped or ran out of time)"
        );
        let msg_id = message.headers.get(subject::MSG_ID).map(|v| v.as_str());
        let stored = self
            .store_dead_letter(&reason, msg_id, message.payload.clone())
            .await;
        if let Err(error) = stored {
            tracing::error!(sequence, %error, "exhausted job stays on the queue");
            return;
        }
        // Already stored on the queue, so within the server's size limit.
        let job = decode_job(&message.payload, usize::MAX).ok();
        tracing::warn!(sequence, job_id = job.as_ref().map(|j| j.job_id.as_str()), %reason, "exhausted job dead-lettered");
        let destination = Destination {
            job: job.as_ref(),
            job_seq: Some(sequence),
            reply_to: message.headers.get(subject::REPLY_TO).map(|v| v.as_str()),
        };
        let result = self.failed_result(job.as_ref(), ErrorCode::Internal, reason);
        if let Err(error) = self.publish_result(&destination, &result).await {
            tracing::error!(sequence, %error, "exhausted job's result not stored; job stays queued");
            return;
        }
        match jobs.delete_message(sequence).await {
            Ok(_) => self.metrics.job(Outcome::DeadLettered),
            Err(error) => {
                tracing::warn!(sequence, %error, "exhausted job dead-lettered but still queued")
            }
        }
    }

    fn failed_result(&self, job: Option<&Job>, code: ErrorCode, message: String) -> JobResult {
        JobResult {
            job_id: job.map(|j| j.job_id.clone()).unwrap_or_default(),
            tenant: job.map(|j| j.tenant.clone()).unwrap_or_default(),
            model: job.map_or_else(|| self.model.clone(), |j| j.model.clone()),
            status: ResultStatus::Failed,
            output: None,
            error: Some(ErrorBody::new(code, message)),
            worker: self.worker.clone(),
            timings: Timings::default(),
        }
    }

    async fn settle_with_result(
        &self,
        held: Held,
        job: Option<&Job>,
        result: JobResult,
        outcome: Outcome,
    ) {
        if let Err(error) = self.publish_result(&held.destination(job), &result).await {
            self.retry(held, job, error.to_string()).await;
            return;
        }
        drop(held.progress);
        match held.msg.double_ack().await {
            Ok(()) => self.metrics.job(outcome),
            // The result is stored; a redelivery answers again and the store keeps one copy.
            Err(error) => {
                tracing::warn!(job_id = result.job_id, error = %AnswerError::Settle(error), "result stored but ack unconfirmed")
            }
        }
    }

    /// Stores the result on `fleet.results.<tenant>.<job_id>` (when the job is known) and answers
    /// the synchronous caller, if any.
    async fn publish_result(
        &self,
        destination: &Destination<'_>,
        result: &JobResult,
    ) -> Result<(), AnswerError> {
        let payload = bytes::Bytes::from(encode(result)?);
        let mut headers = HeaderMap::new();
        if let Some(error) = &result.error {
            headers.insert(subject::SERVICE_ERROR_CODE, error.code.as_str());
            headers.insert(
                subject::SERVICE_ERROR,
                subject::header_text(&error.message).as_ref(),
            );
        }
        if let Some(job) = destination.job {
            let mut store_headers = headers.clone();
            store_headers.insert(
                subject::MSG_ID,
                subject::msg_id(&job.tenant, &job.job_id).as_str(),
            );
            if let Some(seq) = destination.job_seq {
                store_headers.insert(subject::JOB_SEQ, seq.to_string().as_str());
            }
            let results_subject = subject::results(&job.tenant, &job.job_id);
            let stored = async {
                self.js
                    .publish_with_headers(results_subject.clone(), store_headers, payload.clone())
                    .await?
                    .await
            }
            .await;
            stored.map_err(|source| AnswerError::Store {
                subject: results_subject,
                source,
            })?;
        }
        if let Some(reply_to) = destination.reply_to
            && let Err(error) = self
                .client
                .publish_with_headers(reply_to.to_owned(), headers, payload)
                .await
        {
            // The stored result is the record; a caller that misses this reply can read it there.
            tracing::warn!(%error, reply_to, "cannot answer synchronous caller");
        }
        Ok(())
    }
}
