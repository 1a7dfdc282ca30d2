//! Answering a job and settling its message, in the one order that survives crashes: store the
//! result (a compare-and-set: the first store of a job wins, see [`crate::store`]), answer the
//! synchronous caller only if this store won, and only then acknowledge, with a confirmed ack.
//! A failure before the ack leaves the job to be redelivered; a redelivery finds the stored
//! result and settles without running or answering again.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::{
    HeaderMap,
    jetstream::{self, AckKind, context::PublishError, message::StreamMessage, stream::Stream},
};
use fleet_schemas::{
    CodecError, ErrorBody, ErrorCode, Job, JobResult, Output, ResultStatus, Timings, encode,
    now_ms, subject,
};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::OwnedSemaphorePermit;

use fleet_keys::KeyStore;
use fleet_service::AUDIT_TARGET;

use crate::{
    job::read_verified_job,
    metrics::{DeadLetterReason, Finished, Metrics, Reconciled, Unfinished},
    store::{JobKey, ResultStore, StoreError, StoreToken, Stored},
};

/// The first pause before a result the broker could not take is stored again; it doubles up to
/// [`STORE_RETRY_MAX`].
const STORE_RETRY_FIRST: Duration = Duration::from_millis(250);
const STORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// A job message this worker holds: it must end in exactly one ack, nak or term.
pub struct Held {
    pub msg: jetstream::Message,
    /// The synchronous caller's inbox, from the `Fleet-Reply-To` header.
    pub reply_to: Option<String>,
    /// Keeps the server from redelivering while the job waits or runs; stops when dropped.
    pub lease: Lease,
    /// This job's place in the worker's in-flight bound, given back when it is settled.
    pub permit: InFlightPermit,
    /// The job's span (`job_id`, `tenant`, `model`, `key_id`, `delivered`, `trace_id`): every
    /// task that handles the job runs in it, so each line about the job carries them.
    pub span: tracing::Span,
}

/// A place in the in-flight bound, counted in the `jobs_in_flight` gauge while held.
pub struct InFlightPermit {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl InFlightPermit {
    pub fn new(permit: OwnedSemaphorePermit, metrics: &Metrics) -> InFlightPermit {
        metrics.jobs_in_flight.inc();
        InFlightPermit {
            _permit: permit,
            gauge: metrics.jobs_in_flight.clone(),
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

    /// How long ago the job was queued, by the server's clock as this host sees it.
    pub fn since_queued(&self) -> Duration {
        self.msg
            .info()
            .map(|info| since_unix_nanos(info.published.unix_timestamp_nanos()))
            .unwrap_or_default()
    }

    /// This message's sequence on `FLEET_JOBS`.
    pub fn job_seq(&self) -> Option<u64> {
        self.msg.info().ok().map(|info| info.stream_sequence)
    }

    /// Where the result of this message's `job` goes.
    fn destination<'a>(&'a self, job: Option<&'a Job>) -> Destination<'a> {
        Destination {
            job,
            job_seq: self.job_seq(),
            reply_to: self.reply_to.as_deref(),
            traceparent: self
                .msg
                .headers
                .as_ref()
                .and_then(|h| h.get(subject::TRACEPARENT))
                .map(|v| v.as_str()),
        }
    }

    /// Hands the job back for a later delivery.
    async fn nak(self, delay: Duration) {
        drop(self.lease);
        if let Err(error) = self.msg.ack_with(AckKind::Nak(Some(delay))).await {
            tracing::warn!(%error, "cannot nak job; it is redelivered after ack wait");
        }
    }
}

/// Time elapsed since a Unix time in nanoseconds (as JetStream stamps messages); zero when it
/// lies ahead (two hosts' clocks differ).
pub fn since_unix_nanos(then: i128) -> Duration {
    let then_ms = u64::try_from(then / 1_000_000).unwrap_or(0);
    Duration::from_millis(now_ms().saturating_sub(then_ms))
}

/// Where a result goes: stored under its job's tenant and id (when the job could be read),
/// tagged with the job's sequence on the queue, and sent to the synchronous caller, if any.
struct Destination<'a> {
    job: Option<&'a Job>,
    job_seq: Option<u64>,
    reply_to: Option<&'a str>,
    /// The job's `traceparent`, kept on its stored result and its answer.
    traceparent: Option<&'a str>,
}

/// This worker's hold on one delivery: in-progress acks keep the server from redelivering the
/// job while it waits or runs. The hold is lost when no in-progress ack went out for longer than
/// the ack wait (the process was frozen, the runtime starved, the connection down): by then the
/// server has handed the job to another worker, so this one must not finish it. Monotonic time
/// keeps running while a process is stopped, so a frozen worker sees the loss when it wakes.
pub struct Lease {
    ticker: tokio::task::JoinHandle<()>,
    state: Arc<LeaseState>,
}

struct LeaseState {
    origin: Instant,
    /// Milliseconds after `origin` of the delivery or the last in-progress ack sent.
    extended_ms: AtomicU64,
    lost: AtomicBool,
    limit: Duration,
}

impl LeaseState {
    fn lost(&self) -> bool {
        if self.lost.load(Ordering::Acquire) {
            return true;
        }
        let extended = Duration::from_millis(self.extended_ms.load(Ordering::Acquire));
        let lost = self.origin.elapsed().saturating_sub(extended) > self.limit;
        if lost {
            self.lost.store(true, Ordering::Release);
        }
        lost
    }

    fn extend(&self) {
        let now = self.origin.elapsed().as_millis() as u64;
        self.extended_ms.store(now, Ordering::Release);
    }
}

impl Lease {
    /// Starts holding `msg`, with an in-progress ack every `every`; the hold counts as lost
    /// after `limit` without one.
    pub fn start(
        js: &jetstream::Context,
        msg: &jetstream::Message,
        every: Duration,
        limit: Duration,
    ) -> Lease {
        let acker = jetstream::message::Acker::new(js.clone(), msg.reply.clone());
        let state = Arc::new(LeaseState {
            origin: Instant::now(),
            extended_ms: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            limit,
        });
        let ticking = state.clone();
        let ticker = tokio::spawn(tracing::Instrument::in_current_span(async move {
            let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                ticker.tick().await;
                // An ack sent now would extend a delivery the server has already given away.
                if ticking.lost() {
                    return;
                }
                match acker.ack_with(AckKind::Progress).await {
                    Ok(()) => ticking.extend(),
                    Err(error) => tracing::warn!(%error, "cannot send in-progress ack"),
                }
            }
        }));
        Lease { ticker, state }
    }

    /// True once the server has (or may have) redelivered the job elsewhere.
    pub fn lost(&self) -> bool {
        self.state.lost()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("cannot encode result: {0}")]
    Encode(#[from] CodecError),
    #[error(transparent)]
    Store(#[from] StoreError),
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
    /// `FLEET_JOBS`, for jobs settled outside a delivery (out of deliveries, orphaned).
    pub jobs: Stream,
    pub results: ResultStore,
    /// Tenants' keys: a job is stored and answered under its tenant only once verified.
    pub keys: KeyStore,
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
        self.settle_with_result(held, Some(job), result, Finished::Ok)
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
        outcome: Finished,
    ) {
        let result = self.failed_result(Some(job), code, message);
        self.settle_with_result(held, Some(job), result, outcome)
            .await;
    }

    /// A redelivered job whose result is already stored (its earlier delivery stored it and
    /// then lost its ack, or its worker froze past the ack wait): acked without running it or
    /// answering again. Gives the job back when no result is stored (or the look-up fails).
    pub async fn settle_if_stored(&self, held: Held, job: &Job) -> Option<Held> {
        let job_seq = held.job_seq()?;
        let key = JobKey {
            tenant: &job.tenant,
            job_id: &job.job_id,
            job_seq,
        };
        match self.results.find(key).await {
            Ok(Some(_)) => {
                tracing::info!(job_id = %job.job_id, tenant = %job.tenant, delivered = held.delivered(),
                    "redelivered job's result is already stored; acking without running it");
                self.ack(held, &job.job_id, Some(Unfinished::AlreadyStored))
                    .await;
                None
            }
            Ok(None) => Some(held),
            Err(error) => {
                tracing::warn!(%error, job_id = %job.job_id, "cannot check for a stored result; running the job");
                Some(held)
            }
        }
    }

    /// Gives a job back to the queue at once, for another worker (this one is stopping).
    pub async fn hand_back(&self, held: Held) {
        held.nak(Duration::ZERO).await;
        self.metrics.unfinished(Unfinished::HandedBack);
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
            self.dead_letter(
                held,
                job,
                ErrorCode::Internal,
                DeadLetterReason::OutOfRetries,
                reason,
            )
            .await;
            return;
        }
        tracing::warn!(job_id = job.map(|j| j.job_id.as_str()), delivered, %reason, "job failed; retrying later");
        held.nak(self.retry_delay).await;
        self.metrics.retried();
    }

    /// Poison (or out of retries): keep the original message on the dead-letter stream with the
    /// reason, store and send the failed result, and stop redelivery. Without a dead-letter
    /// record and a stored result the job is not dropped: it is naked and comes back (after its
    /// last delivery, as an exhausted job). `why` is the reason's kind, for the metrics.
    pub async fn dead_letter(
        &self,
        held: Held,
        job: Option<&Job>,
        code: ErrorCode,
        why: DeadLetterReason,
        reason: String,
    ) {
        if self.abandon_if_lost(&held, job) {
            return;
        }
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
            .store_dead_letter(code, &reason, msg_id.as_deref(), held.msg.payload.clone())
            .await;
        if let Err(error) = stored {
            tracing::error!(%error, "job stays queued");
            held.nak(self.retry_delay).await;
            return;
        }
        let result = self.failed_result(job, code, reason.clone());
        let answered = self
            .answer(&held.destination(job), &result, &StoreToken::new())
            .await;
        match answered {
            // The job's outcome is settled with its stored result, acked or not: a redelivery
            // finds the result and counts nothing again.
            Ok(Stored::Won) => {
                self.metrics
                    .finished(Finished::DeadLettered, Some(code), held.since_queued());
                self.metrics.dead_lettered(why);
            }
            Ok(Stored::AlreadyStored) => self.metrics.unfinished(Unfinished::AlreadyStored),
            Err(error) => {
                tracing::error!(%error, "dead-lettered job's result not stored; job stays queued");
                held.nak(self.retry_delay).await;
                return;
            }
        }
        // The audit event of the dead letter (tenant and job id are the claimed ones when the
        // job did not verify, and absent when it could not be read).
        tracing::warn!(target: AUDIT_TARGET, action = "dead_letter", code = code.as_str(),
            job_id = job.map(|j| j.job_id.as_str()), tenant = job.map(|j| j.tenant.as_str()),
            model = %self.model, %reason, "job dead-lettered");
        drop(held.lease);
        if let Err(error) = held.msg.double_ack_with(AckKind::Term).await {
            tracing::warn!(error = %AnswerError::Settle(error), "dead-lettered job not terminated; a redelivery settles it");
        }
    }

    /// Keeps a job's original message on `fleet.dlq.<model>` with its code and the reason, once
    /// (by job id).
    async fn store_dead_letter(
        &self,
        code: ErrorCode,
        reason: &str,
        msg_id: Option<&str>,
        payload: bytes::Bytes,
    ) -> Result<(), AnswerError> {
        let dlq_subject = subject::dlq(&self.model);
        let mut headers = HeaderMap::new();
        headers.insert(subject::DLQ_REASON, subject::header_text(reason).as_ref());
        headers.insert(subject::SERVICE_ERROR_CODE, code.as_str());
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

    /// A job message the server will never deliver again although the work queue keeps it:
    /// its last delivery was never settled (out of deliveries), or it was settled but the
    /// server lost the ack and kept the message (an orphan). An orphan's result is stored: it
    /// is only removed. Any other is kept on the dead-letter stream with the reason, answered
    /// where the job can be read, and only then deleted from the queue.
    pub async fn settle_abandoned(&self, message: StreamMessage, reason: &str) {
        let sequence = message.sequence;
        // Already stored on the queue, so within the server's size limit. A job that does not
        // verify is dead-lettered without a result under the tenant it claims.
        let job = read_verified_job(&message.payload, usize::MAX, &self.keys, now_ms())
            .await
            .ok();
        if let Some(job) = &job {
            let key = JobKey {
                tenant: &job.tenant,
                job_id: &job.job_id,
                job_seq: sequence,
            };
            match self.results.find(key).await {
                Ok(Some(_)) => {
                    if self.delete_queued(sequence).await {
                        tracing::warn!(sequence, job_id = %job.job_id, "removed an orphaned job whose result is stored");
                        self.metrics.reconciled(Reconciled::Orphan);
                    }
                    return;
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(sequence, %error, "abandoned job stays on the queue");
                    return;
                }
            }
        }
        let msg_id = message.headers.get(subject::MSG_ID).map(|v| v.as_str());
        let stored = self
            .store_dead_letter(ErrorCode::Internal, reason, msg_id, message.payload.clone())
            .await;
        if let Err(error) = stored {
            tracing::error!(sequence, %error, "abandoned job stays on the queue");
            return;
        }
        tracing::warn!(target: AUDIT_TARGET, action = "dead_letter",
            code = ErrorCode::Internal.as_str(), sequence,
            job_id = job.as_ref().map(|j| j.job_id.as_str()),
            tenant = job.as_ref().map(|j| j.tenant.as_str()), model = %self.model, %reason,
            "abandoned job dead-lettered");
        let destination = Destination {
            job: job.as_ref(),
            job_seq: Some(sequence),
            reply_to: message.headers.get(subject::REPLY_TO).map(|v| v.as_str()),
            traceparent: message
                .headers
                .get(subject::TRACEPARENT)
                .map(|v| v.as_str()),
        };
        let result = self.failed_result(job.as_ref(), ErrorCode::Internal, reason.to_owned());
        let answered = self.answer(&destination, &result, &StoreToken::new()).await;
        if let Err(error) = answered {
            tracing::error!(sequence, %error, "abandoned job's result not stored; job stays queued");
            return;
        }
        if self.delete_queued(sequence).await {
            self.metrics.finished(
                Finished::DeadLettered,
                Some(ErrorCode::Internal),
                since_unix_nanos(message.time.unix_timestamp_nanos()),
            );
            self.metrics
                .dead_lettered(DeadLetterReason::OutOfDeliveries);
            self.metrics.reconciled(Reconciled::Exhausted);
        }
    }

    /// Deletes a job message from `FLEET_JOBS`; false when it is gone already or cannot be.
    async fn delete_queued(&self, sequence: u64) -> bool {
        match self.jobs.delete_message(sequence).await {
            Ok(deleted) => deleted,
            // Deleted meanwhile by another worker settling the same message.
            Err(error) => {
                tracing::debug!(sequence, %error, "queued job not deleted");
                false
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

    /// True (and the job left alone) when this worker's hold on the delivery is lost: the
    /// server has redelivered the job, and the new holder answers it.
    fn abandon_if_lost(&self, held: &Held, job: Option<&Job>) -> bool {
        if !held.lease.lost() {
            return false;
        }
        tracing::warn!(
            job_id = job.map(|j| j.job_id.as_str()),
            delivered = held.delivered(),
            "delivery expired while the job was held (worker stalled?); leaving it to its redelivery"
        );
        self.metrics.unfinished(Unfinished::Abandoned);
        true
    }

    async fn settle_with_result(
        &self,
        held: Held,
        job: Option<&Job>,
        result: JobResult,
        outcome: Finished,
    ) {
        if self.abandon_if_lost(&held, job) {
            return;
        }
        let unfinished = match self.answer_when_stored(&held, job, &result).await {
            // The hold was lost while the broker could not take the result: the redelivery
            // answers the job.
            Ok(None) => return,
            // Counted once the result is stored, acked or not: a redelivery after a lost ack
            // finds the result and counts nothing again.
            Ok(Some(Stored::Won)) => {
                tracing::debug!(status = ?result.status, "result stored");
                let code = result.error.as_ref().map(|error| error.code);
                self.metrics.finished(outcome, code, held.since_queued());
                None
            }
            Ok(Some(Stored::AlreadyStored)) => Some(Unfinished::AlreadyStored),
            Err(error) => {
                self.retry(held, job, error.to_string()).await;
                return;
            }
        };
        self.ack(held, &result.job_id, unfinished).await;
    }

    /// [`Self::answer`], tried again in place for as long as the broker cannot take the result
    /// for now (the results stream electing a leader, a node frozen, a connection lost) and
    /// the delivery is still this worker's: such an outage is not the job's fault and must not
    /// spend its deliveries, which a nak would. None when the hold was lost meanwhile (the
    /// redelivery answers the job); an error when the broker refused the result.
    ///
    /// Trying again is safe because every try carries the same store token: the store is a
    /// compare-and-set, so if a try whose answer was lost did land, the next one reads it back,
    /// finds its own token and wins (the caller is answered once); if another delivery stored
    /// the job's result first, this one finds that and answers nothing. While this waits, the
    /// lease's in-progress acks keep the job from being redelivered.
    async fn answer_when_stored(
        &self,
        held: &Held,
        job: Option<&Job>,
        result: &JobResult,
    ) -> Result<Option<Stored>, AnswerError> {
        let destination = held.destination(job);
        let token = StoreToken::new();
        let mut pause = STORE_RETRY_FIRST;
        let mut waited = false;
        loop {
            match self.answer(&destination, result, &token).await {
                Err(AnswerError::Store(error)) if error.is_transient() => {
                    if !waited {
                        waited = true;
                        tracing::warn!(%error, job_id = job.map(|j| j.job_id.as_str()),
                            delivered = held.delivered(),
                            "broker cannot store the result for now; holding the job and storing again until it can");
                    }
                    tracing::debug!(%error, ?pause, "result not stored yet; trying again");
                }
                answered => {
                    if waited && answered.is_ok() {
                        tracing::warn!(
                            job_id = job.map(|j| j.job_id.as_str()),
                            delivered = held.delivered(),
                            "result stored once the broker could take it"
                        );
                    }
                    return answered.map(Some);
                }
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(STORE_RETRY_MAX);
            if self.abandon_if_lost(held, job) {
                return Ok(None);
            }
        }
    }

    /// Acks a delivery whose job has its result stored; `unfinished` is counted once the ack
    /// is confirmed.
    async fn ack(&self, held: Held, job_id: &str, unfinished: Option<Unfinished>) {
        drop(held.lease);
        match held.msg.double_ack().await {
            Ok(()) => {
                if let Some(reason) = unfinished {
                    self.metrics.unfinished(reason);
                }
            }
            // The result is stored; a redelivery finds it and settles without answering again.
            Err(error) => {
                tracing::warn!(job_id, error = %AnswerError::Settle(error), "result stored but ack unconfirmed")
            }
        }
    }

    /// Stores the result on `fleet.results.<tenant>.<job_id>` (when the job is known) and, if
    /// this store is the job's result, answers the synchronous caller, if any, on one of the
    /// job's tenant's inboxes.
    async fn answer(
        &self,
        destination: &Destination<'_>,
        result: &JobResult,
        token: &StoreToken,
    ) -> Result<Stored, AnswerError> {
        let payload = bytes::Bytes::from(encode(result)?);
        let mut headers = HeaderMap::new();
        if let Some(traceparent) = destination.traceparent {
            headers.insert(subject::TRACEPARENT, traceparent);
        }
        if let Some(error) = &result.error {
            headers.insert(subject::SERVICE_ERROR_CODE, error.code.as_str());
            headers.insert(
                subject::SERVICE_ERROR,
                subject::header_text(&error.message).as_ref(),
            );
        }
        if let (Some(job), Some(job_seq)) = (destination.job, destination.job_seq) {
            let key = JobKey {
                tenant: &job.tenant,
                job_id: &job.job_id,
                job_seq,
            };
            let stored = self
                .results
                .store(key, token, headers.clone(), payload.clone())
                .await?;
            if stored == Stored::AlreadyStored {
                tracing::info!(job_id = %job.job_id, tenant = %job.tenant,
                    "result already stored by another delivery; not answering again");
                return Ok(stored);
            }
        }
        let Some(reply_to) = destination.reply_to else {
            return Ok(Stored::Won);
        };
        // The reply subject is not signed: answers go only to an inbox of the job's own tenant,
        // never to a subject a publisher chose (another tenant's inbox, a results subject). A
        // job that cannot be read names no tenant whose inbox it could be.
        match destination.job {
            Some(job) if subject::is_tenant_inbox(&job.tenant, reply_to) => {
                if let Err(error) = self
                    .client
                    .publish_with_headers(reply_to.to_owned(), headers, payload)
                    .await
                {
                    // The stored result is the record; a caller that misses this reply can
                    // read it there.
                    tracing::warn!(%error, reply_to, "cannot answer synchronous caller");
                }
            }
            job => tracing::warn!(
                job_id = job.map(|j| j.job_id.as_str()),
                reply_to,
                "reply subject is not an inbox of the job's tenant; nothing is sent there"
            ),
        }
        Ok(Stored::Won)
    }
}
