//! The dispatcher's NATS side: serve `fleet.infer.*` and `fleet.submit.*` in the queue group,
//! admit, rate-limit, publish to JetStream with a bounded number of acks outstanding, answer.
//!
//! The subscriptions and answers here are Fleet's own, not endpoints of the NATS service API
//! (`async_nats::service`); the dispatcher registers with that API for discovery only
//! (`fleet_service::Discovery`). Its queue group, its concurrency (an endpoint is a stream of
//! requests like a subscription) and the slow-consumer accounting (the same client, buffer and
//! events) would fit; three things do not:
//! - Refusals: the library answers an error with an empty body and a numeric
//!   `Nats-Service-Error-Code`. Fleet's callers get the code as text (`overloaded`) and decode a
//!   typed body (`JobResult`, `SubmitReply`) carrying it (`schemas/WIRE.md`); sending those as
//!   successes instead would make the service's error count always 0.
//! - Counts: the library counts and times a request when it is answered through it. An
//!   admitted `infer`, most of the traffic, is answered by a worker, and a relay up to
//!   `--relay-wait` later, so its request counts would miss most requests.
//! - Stopping: an endpoint stops by unsubscribing at once; requests the server had already
//!   handed to this member of the queue group (no other member gets them) are dropped
//!   unanswered. [`Listening::run`] drains instead, and answers every request it was given.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use async_nats::{
    HeaderMap, Message, Subject,
    jetstream::{self, context::PublishErrorKind, stream::LastRawMessageErrorKind},
};
use bytes::Bytes;
use fleet_schemas::{
    ErrorCode, Job, JobResult, ResultStatus, SubmitReply, SubmitStatus, Timings, encode,
    subject::{self, Ingress},
};
use fleet_service::{AUDIT_TARGET, TraceParent};
use futures::StreamExt;
use tokio::sync::Semaphore;
use tracing::{Instrument, field::Empty};

use crate::{
    metrics::{DispatcherMetrics, GaugedPermit, RequestKind, RequestOutcome},
    rate::TenantRateLimits,
    validate::{Admitted, Rejection, Validator},
    workers::{Availability, Workers},
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        subject: &'static str,
        source: async_nats::SubscribeError,
    },
    #[error("the server did not confirm the subscriptions: {0}")]
    Confirm(async_nats::jetstream::context::GetStreamError),
}

/// Everything one dispatcher needs to handle requests; shared by its request tasks.
pub struct Dispatcher {
    pub name: String,
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub validator: Validator,
    pub rate_limits: TenantRateLimits,
    pub metrics: DispatcherMetrics,
    /// Bounds publishes awaiting their JetStream ack.
    pub publish_slots: Arc<Semaphore>,
    pub publish_slots_capacity: u32,
    pub publish_timeout: Duration,
    /// FLEET_RESULTS, where a repeated `infer` finds the result of the job it repeats.
    pub results: jetstream::stream::Stream,
    /// How long a repeated `infer` waits for that result to be stored.
    pub relay_wait: Duration,
    /// Bounds the repeated `infer` calls waiting for a result at once.
    pub relay_slots: Arc<Semaphore>,
    /// Which models have live workers: an `infer` for one that has none is refused.
    pub workers: Workers,
}

/// First pause before a repeated `infer` looks its result up again while it also listens for
/// it (the listening subscription alone could miss a result stored just before it was
/// registered); each later pause doubles.
const RELAY_FIRST_RELOOK: Duration = Duration::from_secs(1);
const RELAY_LAST_RELOOK: Duration = Duration::from_secs(16);

/// A dispatcher subscribed to its subjects.
pub struct Listening {
    dispatcher: Arc<Dispatcher>,
    requests: futures::stream::SelectAll<async_nats::Subscriber>,
}

impl Listening {
    /// Serves until `shutdown` resolves, then unsubscribes, handles the requests already
    /// delivered to this dispatcher (the queue group gives them to no other), and waits for the
    /// publishes under way, so every request it took is answered. Repeated `infer` calls still
    /// waiting for a stored result are not waited for: their callers' retries reach another
    /// dispatcher.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                next = self.requests.next() => match next {
                    Some(message) => self.dispatcher.clone().handle(message).await,
                    None => break,
                },
            }
        }
        for subscription in self.requests.iter_mut() {
            if let Err(error) = subscription.drain().await {
                tracing::warn!(%error, "cannot unsubscribe; requests in flight to this dispatcher may be lost");
            }
        }
        // The subscriptions end once the server confirms the unsubscribe; bounded in case the
        // connection is gone and no confirmation comes.
        let delivered = async {
            while let Some(message) = self.requests.next().await {
                self.dispatcher.clone().handle(message).await;
            }
        };
        if tokio::time::timeout(self.dispatcher.publish_timeout, delivered)
            .await
            .is_err()
        {
            tracing::warn!("requests delivered before the stop not all taken in time");
        }
        let dispatcher = self.dispatcher;
        // Every publish holds a slot until answered: owning them all means none is under way.
        let _ = dispatcher
            .publish_slots
            .acquire_many(dispatcher.publish_slots_capacity)
            .await;
        // Bounded: with the connection gone a flush waits for a reconnect that may never come,
        // and a stopping process must still exit.
        if !matches!(
            tokio::time::timeout(dispatcher.publish_timeout, dispatcher.client.flush()).await,
            Ok(Ok(()))
        ) {
            tracing::warn!("NATS did not take the last answers before the stop");
        }
        tracing::info!(name = %dispatcher.name, "dispatcher stopped");
    }
}

/// What became of one request, as the caller is told.
enum Outcome {
    Queued {
        job_id: String,
        seq: u64,
        duplicate: bool,
        /// No live worker serves the model now (said to a `submit`).
        no_worker: bool,
    },
    Rejected(Rejection),
}

impl Dispatcher {
    /// Joins the queue group on both ingress subjects; requests are taken from the moment
    /// this returns.
    pub async fn listen(self: Arc<Self>) -> Result<Listening, ServeError> {
        let group = subject::DISPATCHER_QUEUE_GROUP.to_owned();
        let mut subscriptions = Vec::new();
        for wildcard in [subject::INFER_WILDCARD, subject::SUBMIT_WILDCARD] {
            let subscription = self
                .client
                .queue_subscribe(wildcard, group.clone())
                .await
                .map_err(|source| ServeError::Subscribe {
                    subject: wildcard,
                    source,
                })?;
            subscriptions.push(subscription);
        }
        // `flush` only empties the client's buffer; a round trip on the same connection proves
        // the server has registered the subscriptions (it handles one connection in order).
        self.jetstream
            .get_stream(subject::JOBS_STREAM)
            .await
            .map_err(ServeError::Confirm)?;
        tracing::info!(name = %self.name, "dispatcher serving");
        Ok(Listening {
            dispatcher: self,
            requests: futures::stream::select_all(subscriptions),
        })
    }

    /// Takes a slot for the request, then admits, publishes and answers it on its own task, so
    /// verification runs on every core while the subscription keeps being drained. With no slot
    /// free the request is answered `overloaded` at once: waiting here would stop the loop that
    /// reads the subscription, and NATS drops what a full subscription cannot hold, unanswered.
    async fn handle(self: Arc<Self>, message: Message) {
        let Some(ingress) = subject::parse_ingress(&message.subject) else {
            return;
        };
        let (model, kind) = match ingress {
            Ingress::Infer { model } => (model.to_owned(), RequestKind::Infer),
            Ingress::Submit { model } => (model.to_owned(), RequestKind::Submit),
        };
        let reply_to_job = kind == RequestKind::Infer;
        if reply_to_job && message.reply.is_none() {
            // A synchronous call with no inbox has nobody to answer; queuing it would waste work.
            self.metrics.count_rejection(kind, ErrorCode::Malformed);
            tracing::warn!(target: AUDIT_TARGET, action = "admission", outcome = RequestOutcome::Rejected.as_str(),
                code = ErrorCode::Malformed.as_str(), kind = kind.as_str(), model = %model,
                subject = %message.subject, "infer request without a reply subject dropped");
            return;
        }
        let slot = match self.publish_slots.clone().try_acquire_owned() {
            Ok(slot) => GaugedPermit::new(slot, &self.metrics.admissions_in_flight),
            Err(_) => {
                let rejection = Rejection::new(
                    ErrorCode::Overloaded,
                    "too many jobs being checked or awaiting the queue's ack",
                );
                self.answer(&message, &model, kind, Outcome::Rejected(rejection))
                    .await;
                return;
            }
        };
        // The caller's trace, or a new one when it sent none (or one not well formed: a bad
        // header never refuses a job). The job's span carries it; every line about the job is
        // written in that span.
        let trace = TraceParent::from_headers(message.headers.as_ref())
            .unwrap_or_else(TraceParent::new_trace);
        let span = tracing::info_span!(
            "job",
            job_id = Empty,
            tenant = Empty,
            model = %model,
            key_id = Empty,
            trace_id = %trace.trace_id(),
            kind = ?kind,
        );
        let task = async move {
            let started = Instant::now();
            let unserved = self.workers.availability(&model) == Availability::Unserved;
            let admission = self.admit(&model, &message.payload, reply_to_job && unserved);
            let admission = admission.and_then(|admitted| {
                check_reply(&admitted, message.reply.as_deref(), reply_to_job).map(|()| admitted)
            });
            self.metrics
                .admission_seconds
                .observe(started.elapsed().as_secs_f64());
            let span = tracing::Span::current();
            let admitted = match admission {
                Ok(admitted) => {
                    span.record("job_id", admitted.job.job_id.as_str());
                    span.record("tenant", admitted.job.tenant.as_str());
                    span.record("key_id", admitted.key_id.as_str());
                    admitted
                }
                Err(rejection) => {
                    if !rejection.job_id.is_empty() {
                        span.record("job_id", rejection.job_id.as_str());
                        span.record("tenant", rejection.tenant.as_str());
                    }
                    self.answer(&message, &model, kind, Outcome::Rejected(rejection))
                        .await;
                    return;
                }
            };
            let outcome = self
                .publish(&message, &admitted, reply_to_job, unserved, &trace)
                .await;
            if reply_to_job
                && let Outcome::Queued {
                    duplicate: true,
                    seq,
                    ..
                } = outcome
            {
                // The relay may wait long; it holds a relay slot, not a publish slot.
                drop(slot);
                match self.relay_slots.clone().try_acquire_owned() {
                    Ok(relay_slot) => {
                        self.metrics.count_queued(kind, true);
                        audit_queued(kind, true);
                        let _waiting = GaugedPermit::new(relay_slot, &self.metrics.relays_waiting);
                        self.relay_result(&message, &admitted.job, seq).await;
                    }
                    Err(_) => {
                        let busy =
                            overloaded(&admitted, "too many repeated calls waiting for results");
                        self.answer(&message, &model, kind, Outcome::Rejected(busy))
                            .await;
                    }
                }
                return;
            }
            self.answer(&message, &model, kind, outcome).await;
            drop(slot);
        };
        tokio::spawn(task.instrument(span));
    }

    /// A synchronous call repeating a job id already queued (a retry after a timeout or an
    /// `overloaded` whose job was stored after all): the queue holds the job once, as `job_seq`,
    /// and its worker answers the first caller's inbox only. This caller gets that job's stored
    /// result, at once or when it lands, within `relay_wait`; past that it is left to its own
    /// timeout (the result stays readable on FLEET_RESULTS). A result stored for an earlier job
    /// with the same id (before the duplicate window) is not this job's and is passed over.
    async fn relay_result(&self, message: &Message, job: &Job, job_seq: u64) {
        let Some(reply) = message.reply.clone() else {
            return;
        };
        let results_subject = subject::results(&job.tenant, &job.job_id);
        // Listen before looking, so a result stored in between is not missed.
        let mut landing = match self.client.subscribe(results_subject.clone()).await {
            Ok(landing) => landing,
            Err(error) => {
                tracing::warn!(%error, job_id = %job.job_id, "repeated infer not answered");
                return;
            }
        };
        let job_seq = job_seq.to_string();
        let answers_this_job = |headers: &HeaderMap| {
            headers
                .get(subject::JOB_SEQ)
                .is_some_and(|seq| seq.as_str() == job_seq)
        };
        let give_up = tokio::time::sleep(self.relay_wait);
        tokio::pin!(give_up);
        let relook = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(relook);
        let mut pause = RELAY_FIRST_RELOOK;
        let (stored_headers, payload) = loop {
            tokio::select! {
                Some(landed) = landing.next() => {
                    let headers = landed.headers.unwrap_or_default();
                    if answers_this_job(&headers) {
                        break (headers, landed.payload);
                    }
                }
                _ = &mut relook => {
                    match self.results.get_last_raw_message_by_subject(&results_subject).await {
                        Ok(stored) if answers_this_job(&stored.headers) => {
                            break (stored.headers, stored.payload);
                        }
                        Ok(_) => {}
                        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => {}
                        Err(error) => {
                            tracing::warn!(%error, job_id = %job.job_id, "cannot look up a stored result");
                        }
                    }
                    relook.as_mut().reset(tokio::time::Instant::now() + pause);
                    pause = (pause * 2).min(RELAY_LAST_RELOOK);
                }
                _ = &mut give_up => {
                    tracing::info!(job_id = %job.job_id, tenant = %job.tenant,
                        "repeated infer not answered: no result stored in time");
                    return;
                }
            }
        };
        // The caller sees what the first caller saw: the result and its error headers.
        let mut headers = HeaderMap::new();
        for name in [subject::SERVICE_ERROR_CODE, subject::SERVICE_ERROR] {
            if let Some(value) = stored_headers.get(name) {
                headers.insert(name, value.clone());
            }
        }
        self.metrics.relayed.inc();
        self.send(reply, headers, payload).await;
    }

    /// Every stateless check, then (`refuse_unserved`: an `infer` for a model no live worker
    /// serves) `no_worker`, then the tenant's rate limit (last, so refused jobs spend no tokens).
    fn admit(
        &self,
        model: &str,
        payload: &[u8],
        refuse_unserved: bool,
    ) -> Result<Admitted, Rejection> {
        let admitted = self
            .validator
            .admit(model, payload, fleet_schemas::now_ms())?;
        if refuse_unserved {
            // Queued, the job would wait for a worker that may never come while its caller
            // times out, and every retry would queue one more.
            return Err(Rejection::for_admitted(
                &admitted,
                ErrorCode::NoWorker,
                format!(
                    "no worker serves model {model:?} now; nothing was queued: call again once \
                     one runs, or `submit` the job to have it run then"
                ),
            ));
        }
        let tenant = self.validator.keys().tenant(&admitted.job.tenant);
        let within_rate = tenant.is_some_and(|t| self.rate_limits.try_take(&t.name, &t.policy));
        if within_rate {
            Ok(admitted)
        } else {
            Err(Rejection::for_admitted(
                &admitted,
                ErrorCode::RateLimited,
                format!("tenant {:?} is over its rate limit", admitted.job.tenant),
            ))
        }
    }

    /// Queues the job, carrying the caller's trace on to the worker (as a child of this hop).
    /// `no_worker`: no live worker serves the model now, as the answer will say.
    async fn publish(
        &self,
        message: &Message,
        admitted: &Admitted,
        reply_to_job: bool,
        no_worker: bool,
        trace: &TraceParent,
    ) -> Outcome {
        let job = &admitted.job;
        let mut headers = HeaderMap::new();
        headers.insert(subject::TRACEPARENT, trace.child().to_string().as_str());
        headers.insert(
            subject::MSG_ID,
            subject::msg_id(&job.tenant, &job.job_id).as_str(),
        );
        if reply_to_job && let Some(reply) = &message.reply {
            headers.insert(subject::REPLY_TO, reply.as_str());
        }
        let started = Instant::now();
        let acked = publish_with_retries(
            &self.jetstream,
            self.publish_timeout,
            subject::jobs(&job.model),
            headers,
            message.payload.clone(),
        )
        .await;
        self.metrics
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        match acked {
            Ok(ack) => {
                tracing::debug!(job_id = %job.job_id, tenant = %job.tenant, key_id = %admitted.key_id,
                    seq = ack.sequence, duplicate = ack.duplicate, "job queued");
                Outcome::Queued {
                    job_id: job.job_id.clone(),
                    seq: ack.sequence,
                    duplicate: ack.duplicate,
                    no_worker,
                }
            }
            Err(err) => {
                let rejection = match err.kind() {
                    // Retried until the publish timeout: the queue is away (no stream leader,
                    // as in a cluster without a quorum, or no broker), not the job at fault.
                    PublishErrorKind::TimedOut
                    | PublishErrorKind::MaxAckPending
                    | PublishErrorKind::StreamNotFound
                    | PublishErrorKind::BrokenPipe => {
                        overloaded(admitted, "the queue did not take the job in time")
                    }
                    PublishErrorKind::Other if is_queue_full(&err) => {
                        overloaded(admitted, "the queue is full")
                    }
                    _ => Rejection::for_admitted(
                        admitted,
                        ErrorCode::Internal,
                        format!("cannot queue the job: {err}"),
                    ),
                };
                Outcome::Rejected(rejection)
            }
        }
    }

    /// Counts the request's outcome and tells the caller, when there is one to tell.
    async fn answer(&self, message: &Message, model: &str, kind: RequestKind, outcome: Outcome) {
        let reply_to_job = kind == RequestKind::Infer;
        let (headers, body) = match outcome {
            Outcome::Queued {
                job_id,
                seq,
                duplicate,
                no_worker,
            } => {
                self.metrics.count_queued(kind, duplicate);
                audit_queued(kind, duplicate);
                if reply_to_job {
                    // The worker answers synchronous callers once the job has run.
                    return;
                }
                let reply = SubmitReply {
                    status: SubmitStatus::Accepted,
                    job_id,
                    stream_seq: Some(seq),
                    duplicate,
                    error: None,
                    no_worker,
                };
                (HeaderMap::new(), encode(&reply))
            }
            Outcome::Rejected(rejection) => {
                self.metrics.count_rejection(kind, rejection.code());
                // The audit event of a refusal; its ids are the span's, and the job's own where
                // it could be read (a refusal before the signature is checked has none).
                tracing::warn!(target: AUDIT_TARGET, action = "admission", outcome = RequestOutcome::Rejected.as_str(),
                    code = rejection.code().as_str(), kind = kind.as_str(),
                    job_id = %rejection.job_id, tenant = %rejection.tenant,
                    key_id = %rejection.key_id, model,
                    subject = %message.subject, reason = %rejection.error.message, "job rejected");
                let mut headers = HeaderMap::new();
                headers.insert(subject::SERVICE_ERROR_CODE, rejection.code().as_str());
                headers.insert(
                    subject::SERVICE_ERROR,
                    subject::header_text(&rejection.error.message).as_ref(),
                );
                let body = if reply_to_job {
                    encode(&JobResult {
                        job_id: rejection.job_id,
                        tenant: rejection.tenant,
                        model: model.to_owned(),
                        status: ResultStatus::Rejected,
                        output: None,
                        error: Some(rejection.error),
                        worker: self.name.clone(),
                        timings: Timings::default(),
                    })
                } else {
                    encode(&SubmitReply {
                        status: SubmitStatus::Rejected,
                        job_id: rejection.job_id,
                        stream_seq: None,
                        duplicate: false,
                        error: Some(rejection.error),
                        no_worker: false,
                    })
                };
                (headers, body)
            }
        };
        let Some(reply) = message.reply.clone() else {
            return;
        };
        match body {
            Ok(body) => self.send(reply, headers, body.into()).await,
            Err(err) => tracing::error!(%err, "cannot encode an answer"),
        }
    }

    /// Answers only ever go to inboxes: a reply subject is the caller's to choose, and an
    /// answer published on, say, `fleet.results.<tenant>.<id>` would be stored as a result.
    async fn send(&self, reply: Subject, headers: HeaderMap, body: Bytes) {
        if !reply.starts_with(INBOX_PREFIX) {
            self.metrics.unanswerable.inc();
            tracing::warn!(reply = %reply, "not answering on a subject that is not an inbox");
            return;
        }
        if let Err(err) = self.client.publish_with_headers(reply, headers, body).await {
            tracing::warn!(%err, "cannot answer the caller");
        }
    }
}

/// The audit event of an admitted job (queued now, or already queued: `duplicate`), written
/// where it is counted. It carries nothing but constants: the job's ids (`job_id`, `tenant`,
/// `model`, `key_id`, `trace_id`) are its span's, recorded at admission, so the hot path formats
/// nothing for it.
fn audit_queued(kind: RequestKind, duplicate: bool) {
    let outcome = if duplicate {
        RequestOutcome::Duplicate
    } else {
        RequestOutcome::Accepted
    };
    tracing::info!(target: AUDIT_TARGET, action = "admission", outcome = outcome.as_str(),
        kind = kind.as_str(), "job admitted");
}

/// The start of every inbox subject.
const INBOX_PREFIX: &str = "_INBOX.";

/// An `infer` is answered by a worker on its reply subject, which the signature does not cover:
/// only an inbox of the job's own tenant is accepted, so no tenant can have Fleet publish on a
/// subject of its choosing (another tenant's inbox, a results subject).
fn check_reply(
    admitted: &Admitted,
    reply: Option<&str>,
    reply_to_job: bool,
) -> Result<(), Rejection> {
    let job = &admitted.job;
    match reply {
        Some(reply) if reply_to_job && !subject::is_tenant_inbox(&job.tenant, reply) => {
            Err(Rejection::for_admitted(
                admitted,
                ErrorCode::Forbidden,
                format!(
                    "the reply subject must be an inbox of tenant {:?} ({}.…): connect with \
                     that inbox prefix",
                    job.tenant,
                    subject::inbox_prefix(&job.tenant)
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// First pause between two attempts to queue a job; doubled after each, up to
/// [`PUBLISH_RETRY_MAX_PAUSE`].
const PUBLISH_RETRY_FIRST_PAUSE: Duration = Duration::from_millis(50);
const PUBLISH_RETRY_MAX_PAUSE: Duration = Duration::from_millis(800);

/// Queues `payload` on `subject`, again while JetStream cannot take it yet, until
/// `publish_timeout` has passed since the first attempt. On a cluster a stream has no leader
/// for a few seconds after its leader's node dies (the publish is answered "no responders"),
/// and a connection to a dying node breaks mid-request (no answer, or a broken pipe). Each
/// retry is safe: it carries the same `Nats-Msg-Id`, and the queue stores one message per id
/// within its duplicate window (longer than the publish timeout), so a retry of a publish
/// that did land is answered `duplicate` with the first sequence, never queued twice.
async fn publish_with_retries(
    jetstream: &jetstream::Context,
    publish_timeout: Duration,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    let deadline = tokio::time::Instant::now() + publish_timeout;
    let mut pause = PUBLISH_RETRY_FIRST_PAUSE;
    loop {
        let attempt = async {
            jetstream
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await?
                .await
        };
        let result = tokio::time::timeout_at(deadline, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(jetstream::context::PublishError::new(
                    PublishErrorKind::TimedOut,
                ))
            });
        match result {
            Err(err)
                if matches!(
                    err.kind(),
                    PublishErrorKind::StreamNotFound
                        | PublishErrorKind::TimedOut
                        | PublishErrorKind::BrokenPipe
                ) && tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::debug!(%subject, error = %err, "the queue did not take the job; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(PUBLISH_RETRY_MAX_PAUSE);
            }
            other => return other,
        }
    }
}

fn overloaded(admitted: &Admitted, why: &str) -> Rejection {
    Rejection::for_admitted(admitted, ErrorCode::Overloaded, why)
}

/// JetStream refuses a publish to a stream at its limits with `discard: new` by these codes.
fn is_queue_full(err: &jetstream::context::PublishError) -> bool {
    use std::error::Error;
    err.source()
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|js| {
            let code = js.error_code();
            code == jetstream::ErrorCode::STREAM_STORE_FAILED
                || code == jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED
                || code == jetstream::ErrorCode::MEMORY_RESOURCES_EXCEEDED
                || code == jetstream::ErrorCode::ACCOUNT_RESOURCES_EXCEEDED
        })
}
