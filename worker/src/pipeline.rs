//! The worker's pipeline: pull jobs (bounded in flight) -> check and tokenize -> dynamic
//! batcher -> model -> answer and ack, and the graceful drain on shutdown.

use std::{
    future::Future,
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer::PullConsumer};
use fleet_keys::{Denied, KeyStore};
use fleet_schemas::{ErrorCode, Job, Task, Timings, now_ms, subject};
use fleet_service::{Check, Readiness};
use futures::{StreamExt, future::BoxFuture};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{Instrument, Span, field::Empty};

use fleet_streams::cache::CacheSetupError;

use crate::{
    abandoned,
    batcher::{Batch, BatchLimits, Batcher},
    cache::{Hits, ResultCache},
    config::{ModelGuard, WorkerConfig},
    consumer::{self, ConsumerSetupError},
    embedder::{EmbedError, Embedder, FailureKind, TokenizeError, TokenizedInput},
    job::{ReadJobError, decode_job, read_verified_job},
    metrics::{DeadLetterReason, Finished, Metrics},
    queue_metrics,
    respond::{Held, InFlightPermit, Lease, Responder, since_unix_nanos},
    store::ResultStore,
};

/// How long one pull request waits for jobs; also how quickly an idle worker notices shutdown.
const PULL_EXPIRY: Duration = Duration::from_millis(500);
/// Pause after a failed pull, so a broken connection is not hammered.
const PULL_RETRY: Duration = Duration::from_millis(500);
/// How often a worker waiting for the dispatcher's streams, or for the server to read its
/// consumer, asks again.
const STREAMS_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Consumer(#[from] ConsumerSetupError),
    #[error(
        "--max-batch-tokens ({max_batch_tokens}) is below the model's longest input ({max_tokens} tokens), which could then never run"
    )]
    BatchTooSmall {
        max_batch_tokens: usize,
        max_tokens: usize,
    },
    #[error("cannot watch for jobs out of deliveries: {0}")]
    Advisories(#[from] async_nats::SubscribeError),
    #[error("cannot open stream {stream}: {source}")]
    Stream {
        stream: &'static str,
        source: jetstream::context::GetStreamError,
    },
    #[error("stopped pulling: {0}; the jobs it held go to other workers")]
    Model(#[from] ModelFault),
    #[error("result cache: {0}")]
    Cache(#[from] CacheSetupError),
    #[error("shutdown: {left} jobs still in flight after {waited:?}; they will be redelivered")]
    DrainTimeout { left: usize, waited: Duration },
}

/// Why the worker stopped trusting its model: it stops pulling and exits, so a supervisor can
/// restart it, rather than draining the queue into the dead-letter stream.
#[derive(Debug, thiserror::Error)]
pub enum ModelFault {
    #[error("a batch of {padded_tokens} padded tokens ran past its {limit:?} bound")]
    Stalled {
        padded_tokens: usize,
        limit: Duration,
    },
    #[error("{failures} batches in a row failed, the last with: {last}")]
    Failing { failures: u32, last: String },
}

/// A checked, tokenized job on its way to the batcher.
struct Work {
    held: Held,
    job: Job,
    /// From the job's arrival in the queue to `taken_at`.
    queued: Duration,
    /// When this worker took the job (or took it back from a failed batch).
    taken_at: Instant,
    /// The job's inputs that need the model, tokenized: those not in `hits`.
    inputs: Vec<TokenizedInput>,
    /// Vectors the result cache had.
    hits: Hits,
}

/// A job held by the batcher until all its inputs have vectors.
struct Waiting {
    held: Held,
    job: Job,
    /// From the job's arrival in the queue to its arrival in the batcher.
    queued: Duration,
    hits: Hits,
}

/// [`run_with_readiness`] for a worker whose readiness nobody asks about.
pub async fn run<E: Embedder>(
    config: &WorkerConfig,
    client: async_nats::Client,
    embedder: E,
    keys: KeyStore,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    let readiness = Readiness::worker();
    run_with_readiness(
        config, client, embedder, keys, metrics, &readiness, shutdown,
    )
    .await
}

/// Runs a worker until `shutdown` resolves, then stops pulling, finishes and answers every job
/// it holds, and returns. Waits first for the dispatcher's streams, then binds the model's
/// shared consumer. `readiness` follows the client's connection and learns when the streams
/// and the consumer are checked; it turns not ready as soon as `shutdown` resolves or the model
/// fails. The model's own check is the caller's, who loaded it.
pub async fn run_with_readiness<E: Embedder>(
    config: &WorkerConfig,
    client: async_nats::Client,
    embedder: E,
    keys: KeyStore,
    metrics: Metrics,
    readiness: &Readiness,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    if config.batch.max_batch_tokens < embedder.max_tokens() {
        return Err(PipelineError::BatchTooSmall {
            max_batch_tokens: config.batch.max_batch_tokens,
            max_tokens: embedder.max_tokens(),
        });
    }
    readiness.watch_nats(&client);
    let js = jetstream::new(client.clone());
    // Not ready from the signal on, not only once the last pull has ended.
    let mut shutdown = pin!(async {
        shutdown.await;
        readiness.drain();
    });
    tokio::select! {
        ready = consumer::wait_for_streams(&js, STREAMS_RETRY) => ready.map_err(ConsumerSetupError::from)?,
        () = &mut shutdown => return Ok(()),
    }
    readiness.pass(Check::Streams);
    let cache = ResultCache::open(
        &client,
        &config.result_cache,
        &config.model,
        metrics.clone(),
    )
    .await?;
    let pull = tokio::select! {
        bound = consumer::bind_when_available(&js, &config.consumer, STREAMS_RETRY) => bound?,
        () = &mut shutdown => return Ok(()),
    };
    tracing::info!(
        consumer = %config.consumer.durable_name,
        worker = %config.worker_name,
        "bound consumer; pulling jobs"
    );
    let queue_reader = tokio::spawn(queue_metrics::read_every(
        queue_metrics::QueueReader {
            consumer: pull.clone(),
            js: js.clone(),
            model: config.model.clone(),
            worker: config.worker_name.clone(),
            gauges: metrics.queue.clone(),
        },
        config.queue_metrics_every,
    ));
    // Ends with this function, however it returns.
    let _queue_reader = AbortOnDrop(queue_reader);
    let advisories = abandoned::subscribe(&client, &config.consumer.durable_name).await?;
    let open_stream = |stream: &'static str| {
        let js = js.clone();
        async move {
            js.get_stream(stream)
                .await
                .map_err(|source| PipelineError::Stream { stream, source })
        }
    };
    let jobs = open_stream(subject::JOBS_STREAM).await?;
    let results = open_stream(subject::RESULTS_STREAM).await?;
    let responder = Arc::new(Responder {
        client: client.clone(),
        js: js.clone(),
        jobs: jobs.clone(),
        results: ResultStore::new(js.clone(), results),
        keys,
        worker: config.worker_name.clone(),
        model: config.model.clone(),
        max_deliver: config.consumer.max_deliver,
        retry_delay: config.retry_delay,
        metrics: metrics.clone(),
    });
    let (stop_watcher, watcher_stop) = oneshot::channel();
    let watcher = tokio::spawn(abandoned::watch(
        abandoned::Watch {
            advisories,
            responder: responder.clone(),
            jobs,
            durable: config.consumer.durable_name.clone(),
            filter_subject: config.consumer.filter_subject.clone(),
            sweep_every: config.reconcile_every,
        },
        watcher_stop,
    ));
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
    let (to_batcher, from_puller) = mpsc::channel(config.max_in_flight);
    let (fault_tx, mut fault_rx) = oneshot::channel();
    let batcher = tokio::spawn(batch_loop(
        BatchLoop {
            embedder: embedder.clone(),
            limits: config.batch,
            guard: config.model_guard,
            responder: responder.clone(),
            metrics: metrics.clone(),
            cache: cache.clone(),
        },
        from_puller,
        fault_tx,
    ));
    let shortest_ack_wait = shortest_ack_wait(config);
    let intake = Intake {
        config,
        js,
        embedder,
        responder,
        cache,
        to_batcher,
        // In-progress acks go out three times per ack wait, so one lost ack does not cost
        // the job; the hold counts as lost a little before the server's timer runs out.
        progress_every: (shortest_ack_wait / 3).max(Duration::from_millis(100)),
        lease_limit: shortest_ack_wait.mul_f64(0.8),
    };
    metrics.ready.set(1);
    readiness.pass(Check::Consumer);
    let fault = tokio::select! {
        () = pull_loop(&pull, &intake, &in_flight, config, &mut shutdown) => None,
        fault = &mut fault_rx => fault.ok(),
    };
    drop(intake);
    let _ = stop_watcher.send(());
    if let Some(fault) = fault {
        metrics.ready.set(0);
        metrics.model_ready.set(0);
        readiness.drain();
        tracing::error!(%fault, "model is not trustworthy; stopping");
        watcher.abort();
        // The jobs handed back were naked; those naks must reach the server before exit.
        if let Err(error) = client.flush().await {
            tracing::warn!(%error, "cannot flush NATS connection");
        }
        return Err(fault.into());
    }
    tracing::info!("shutting down: no more pulls; finishing jobs in flight");
    let all = u32::try_from(config.max_in_flight).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(config.shutdown_timeout, async {
        // Every held job owns a permit until it is settled, so owning them all means done.
        let _all = in_flight.acquire_many(all).await;
        if let Err(error) = watcher.await {
            tracing::error!(%error, "abandoned-job watcher failed");
        }
    })
    .await;
    metrics.ready.set(0);
    if drained.is_err() {
        batcher.abort();
        return Err(PipelineError::DrainTimeout {
            left: config.max_in_flight - in_flight.available_permits(),
            waited: config.shutdown_timeout,
        });
    }
    if let Err(error) = batcher.await {
        tracing::error!(%error, "batcher task failed");
    }
    tracing::info!("every job in flight answered");
    Ok(())
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The shortest ack wait of any delivery: the first delivery's, or a shorter backoff step.
fn shortest_ack_wait(config: &WorkerConfig) -> Duration {
    config
        .consumer
        .backoff
        .iter()
        .copied()
        .chain([config.consumer.ack_wait])
        .min()
        .unwrap_or(config.consumer.ack_wait)
}

async fn pull_loop<E: Embedder>(
    pull: &PullConsumer,
    intake: &Intake<'_, E>,
    in_flight: &Arc<Semaphore>,
    config: &WorkerConfig,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) {
    loop {
        let mut permits = tokio::select! {
            biased;
            () = shutdown.as_mut() => return,
            permit = in_flight.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        // Ask only for what the in-flight bound can take now.
        let room = in_flight.available_permits().min(config.fetch_batch - 1);
        if room > 0
            && let Ok(more) = in_flight.clone().try_acquire_many_owned(room as u32)
        {
            permits.merge(more);
        }
        let wanted = permits.num_permits();
        let mut messages = match pull
            .batch()
            .max_messages(wanted)
            .expires(PULL_EXPIRY)
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "pull request failed; retrying");
                drop(permits);
                tokio::time::sleep(PULL_RETRY).await;
                continue;
            }
        };
        // A pull already asked for is drained to its end even during shutdown: what the server
        // delivered is answered rather than left to wait for redelivery.
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "pull interrupted");
                    break;
                }
            };
            let Some(permit) = permits.split(1) else {
                tracing::error!(
                    "server delivered more jobs than asked for; leaving the extra for redelivery"
                );
                break;
            };
            intake.accept(message, permit).await;
        }
    }
}

/// Every input of `task` that is not in `hits` tokenized, or the first that cannot be, with its
/// index.
fn tokenize_task<E: Embedder>(
    embedder: &E,
    task: &Task,
    hits: &Hits,
) -> Result<Vec<TokenizedInput>, (usize, TokenizeError)> {
    let Task::Embed {
        inputs,
        normalize,
        truncate,
    } = task;
    inputs
        .iter()
        .enumerate()
        .filter(|(index, _)| hits.is_miss(*index))
        .map(|(index, text)| {
            embedder
                .tokenize(text, *truncate)
                .map(|token_ids| TokenizedInput {
                    token_ids,
                    normalize: *normalize,
                })
                .map_err(|error| (index, error))
        })
        .collect()
}

type Tokenized = Result<Vec<TokenizedInput>, (usize, TokenizeError)>;

/// Tokenizes the inputs not in `hits` off the async threads: a job may carry megabytes of text.
/// The job travels to the blocking pool and back rather than being copied. The time taken goes
/// to `seconds`.
async fn tokenize_off_thread<E: Embedder>(
    embedder: E,
    job: Job,
    hits: Hits,
    seconds: Histogram,
) -> Result<(Job, Hits, Tokenized), tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let tokenized = tokenize_task(&embedder, &job.task, &hits);
        seconds.observe(started.elapsed().as_secs_f64());
        (job, hits, tokenized)
    })
    .await
}

struct Intake<'a, E> {
    config: &'a WorkerConfig,
    js: jetstream::Context,
    embedder: E,
    responder: Arc<Responder>,
    cache: Option<ResultCache>,
    to_batcher: mpsc::Sender<Work>,
    progress_every: Duration,
    lease_limit: Duration,
}

impl<E: Embedder> Intake<'_, E> {
    /// Reads a delivered job and routes it: to the dead-letter stream when it can never run, to
    /// an `expired` answer when too late, otherwise to the batcher.
    async fn accept(&self, msg: jetstream::Message, permit: tokio::sync::OwnedSemaphorePermit) {
        let span = job_span(&msg, &self.config.model);
        self.accept_in(msg, permit, span.clone())
            .instrument(span)
            .await
    }

    async fn accept_in(
        &self,
        msg: jetstream::Message,
        permit: tokio::sync::OwnedSemaphorePermit,
        span: Span,
    ) {
        let taken_at = Instant::now();
        let (queued, delivered) = msg
            .info()
            .map(|info| {
                (
                    since_unix_nanos(info.published.unix_timestamp_nanos()),
                    info.delivered,
                )
            })
            .unwrap_or((Duration::ZERO, 1));
        if delivered > 1 {
            self.responder.metrics.redeliveries.inc();
        }
        let reply_to = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(subject::REPLY_TO))
            .map(|v| v.as_str().to_owned());
        let lease = Lease::start(&self.js, &msg, self.progress_every, self.lease_limit);
        let mut held = Held {
            msg,
            reply_to,
            lease,
            permit: InFlightPermit::new(permit, &self.responder.metrics),
            span,
        };
        let job = match self.read_job(&held.msg.payload).await {
            Ok(job) => {
                held.span.record("job_id", job.job_id.as_str());
                held.span.record("tenant", job.tenant.as_str());
                job
            }
            Err(refused) => {
                // A job that cannot be read or verified is never run, and neither stored under
                // the tenant it claims nor answered: the dead letter, with its code, is the only
                // record. A key unknown here may be one added moments ago that this worker has
                // not read yet: such a job is retried until its last delivery.
                let unknown_key = matches!(refused, ReadJobError::Denied(Denied::UnknownKey(_)));
                tracing::warn!(error = %refused, "job refused");
                let why = match refused {
                    ReadJobError::Denied(_) => DeadLetterReason::Refused,
                    ReadJobError::Envelope(_)
                    | ReadJobError::Body(_)
                    | ReadJobError::Name(_)
                    | ReadJobError::WrongModel { .. } => DeadLetterReason::Unreadable,
                };
                let responder = self.responder.clone();
                spawn_in(Span::current(), async move {
                    if unknown_key && held.delivered() < responder.max_deliver {
                        responder.retry(held, None, refused.to_string()).await;
                    } else {
                        responder
                            .dead_letter(held, None, refused.code(), why, refused.to_string())
                            .await;
                    }
                });
                return;
            }
        };
        // An earlier delivery may have stored the result and lost its ack (a broker restart),
        // or stalled past its ack wait after storing it: the job is not run twice.
        if held.delivered() > 1 {
            match self.responder.settle_if_stored(held, &job).await {
                Some(not_stored) => held = not_stored,
                None => return,
            }
        }
        if job.deadline_ms.is_some_and(|deadline| now_ms() > deadline) {
            let responder = self.responder.clone();
            spawn_in(Span::current(), async move {
                answer_expired(&responder, held, &job).await
            });
            return;
        }
        // Only the texts the cache does not have go to the tokenizer and the model.
        let hits = match &self.cache {
            Some(cache) => cache.lookup(&job).await,
            None => Hits::default(),
        };
        let tokenize_seconds = self.responder.metrics.tokenize_seconds.clone();
        let tokenized =
            tokenize_off_thread(self.embedder.clone(), job, hits, tokenize_seconds).await;
        let (job, hits, tokenized) = match tokenized {
            Ok(done) => done,
            Err(panicked) => {
                // The job went down with the task; it is read again from the held message
                // (it was read once already), so the retry can still answer it.
                let job = decode_job(&held.msg.payload, usize::MAX).ok();
                let reason = format!("tokenizer panicked: {panicked}");
                let responder = self.responder.clone();
                spawn_in(Span::current(), async move {
                    responder.retry(held, job.as_ref(), reason).await
                });
                return;
            }
        };
        let tokenized = match tokenized {
            Ok(tokenized) => tokenized,
            Err((index, TokenizeError::TooLong { tokens, max })) => {
                let reason = format!(
                    "input {index} is {tokens} tokens, the model takes at most {max}, and the job did not ask for truncation"
                );
                let responder = self.responder.clone();
                spawn_in(Span::current(), async move {
                    responder
                        .dead_letter(
                            held,
                            Some(&job),
                            ErrorCode::InputTooLong,
                            DeadLetterReason::InputTooLong,
                            reason,
                        )
                        .await
                });
                return;
            }
            Err((_, error @ TokenizeError::Failed(_))) => {
                let responder = self.responder.clone();
                spawn_in(Span::current(), async move {
                    responder.retry(held, Some(&job), error.to_string()).await
                });
                return;
            }
        };
        let work = Work {
            held,
            job,
            queued,
            taken_at,
            inputs: tokenized,
            hits,
        };
        // Waits while the batcher is busy (backpressure); fails only once the batcher is gone.
        if let Err(mpsc::error::SendError(work)) = self.to_batcher.send(work).await {
            let responder = self.responder.clone();
            spawn_in(Span::current(), async move {
                responder
                    .retry(work.held, Some(&work.job), "worker is stopping".to_owned())
                    .await
            });
        }
    }

    async fn read_job(&self, payload: &[u8]) -> Result<Job, ReadJobError> {
        let job = read_verified_job(
            payload,
            self.config.max_job_bytes,
            &self.responder.keys,
            now_ms(),
        )
        .await?;
        if job.model != self.config.model {
            return Err(ReadJobError::WrongModel {
                job: job.model,
                queue: self.config.model.clone(),
            });
        }
        Ok(job)
    }
}

/// The span of one delivered job: every line about it carries its `job_id`, `tenant`, `model`,
/// `key_id` (the first two and the key once read), `delivered` (the delivery count), `job_seq`
/// (its sequence on the queue) and the `trace_id` of the `traceparent` it was queued with (a
/// new trace when it has none).
fn job_span(msg: &jetstream::Message, model: &str) -> Span {
    let (delivered, job_seq) = msg
        .info()
        .map(|info| (info.delivered, info.stream_sequence))
        .unwrap_or((1, 0));
    let trace = fleet_service::TraceParent::from_headers(msg.headers.as_ref())
        .unwrap_or_else(fleet_service::TraceParent::new_trace);
    tracing::info_span!(
        "job",
        job_id = Empty,
        tenant = Empty,
        model = %model,
        key_id = Empty,
        delivered,
        job_seq,
        trace_id = %trace.trace_id(),
    )
}

/// Runs a task about one job in that job's span.
fn spawn_in(span: Span, task: impl Future<Output = ()> + Send + 'static) {
    tokio::spawn(task.instrument(span));
}

async fn answer_expired(responder: &Responder, held: Held, job: &Job) {
    let message = match job.deadline_ms {
        Some(deadline) => format!("deadline {deadline} passed before the job ran"),
        None => "deadline passed before the job ran".to_owned(),
    };
    responder
        .fail(held, job, ErrorCode::Expired, message, Finished::Expired)
        .await;
}

type Embedding = BoxFuture<'static, Result<Vec<Vec<f32>>, EmbedError>>;

/// Where a batch came from: the shared pool, or the lane that runs suspects one job at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lane {
    Shared,
    Isolated,
}

/// The batch on the model, and the time it may take.
struct Running {
    lane: Lane,
    /// The batch's slots (its inputs went to the model).
    batch: Batch,
    /// What the batch costs the model, counted before its inputs went.
    padded_tokens: usize,
    started: Instant,
    limit: Duration,
    /// The process's frozen time when the batch started (or its bound was last extended).
    frozen_before: Duration,
    embedding: Embedding,
}

/// How long the whole process has stood still (stopped with SIGSTOP, a paused VM): a ticker
/// that finds far more time passed between two ticks than it waited was not running. The batch
/// watchdog discounts that time, so a frozen worker is not taken for a hung model.
struct Freezes {
    frozen_ms: Arc<AtomicU64>,
    ticker: tokio::task::JoinHandle<()>,
}

impl Freezes {
    const TICK: Duration = Duration::from_millis(100);
    /// A gap this long between ticks is a freeze, not scheduling noise.
    const GAP: Duration = Duration::from_secs(1);

    fn watch() -> Freezes {
        let frozen_ms = Arc::new(AtomicU64::new(0));
        let counting = frozen_ms.clone();
        let ticker = tokio::spawn(async move {
            let mut last = Instant::now();
            loop {
                tokio::time::sleep(Self::TICK).await;
                let gap = last.elapsed();
                last = Instant::now();
                if gap > Self::GAP {
                    let frozen = gap.saturating_sub(Self::TICK).as_millis() as u64;
                    counting.fetch_add(frozen, Ordering::Relaxed);
                }
            }
        });
        Freezes { frozen_ms, ticker }
    }

    fn frozen(&self) -> Duration {
        Duration::from_millis(self.frozen_ms.load(Ordering::Relaxed))
    }

    fn frozen_since(&self, before: Duration) -> Duration {
        self.frozen().saturating_sub(before)
    }
}

impl Drop for Freezes {
    fn drop(&mut self) {
        self.ticker.abort();
    }
}

/// What the batch loop runs with.
struct BatchLoop<E> {
    embedder: E,
    limits: BatchLimits,
    guard: ModelGuard,
    responder: Arc<Responder>,
    metrics: Metrics,
    /// Where computed vectors are kept for later jobs, when the cache is on.
    cache: Option<ResultCache>,
}

/// Gathers jobs into batches and runs one batch at a time on the model; jobs keep arriving
/// while it runs, so the next batch is fuller. Ends when the intake is closed and every job it
/// took is answered, or at a [`ModelFault`], which it reports on `fault` after handing every
/// job it holds back to the queue.
///
/// A batch that fails deterministically is not retried whole: one poison input would burn the
/// deliveries of every job batched with it. Its jobs are run again one at a time (the isolated
/// lane, served first), so only the poison job is dead-lettered.
async fn batch_loop<E: Embedder>(
    ctx: BatchLoop<E>,
    mut from_puller: mpsc::Receiver<Work>,
    fault: oneshot::Sender<ModelFault>,
) {
    let mut shared: Batcher<Waiting> = Batcher::new(ctx.limits);
    // Holds one suspect job at a time, so its batches hold nothing else.
    let mut isolated: Batcher<Waiting> = Batcher::new(ctx.limits);
    let mut suspects: std::collections::VecDeque<Work> = std::collections::VecDeque::new();
    let (suspect_tx, mut suspect_rx) = mpsc::unbounded_channel::<Work>();
    let mut running: Option<Running> = None;
    let mut open = true;
    let mut failures_in_a_row = 0u32;
    let freezes = Freezes::watch();
    loop {
        for batcher in [&mut shared, &mut isolated] {
            for waiting in batcher.take_expired(now_ms()) {
                let responder = ctx.responder.clone();
                let span = waiting.held.span.clone();
                tokio::spawn(
                    async move { answer_expired(&responder, waiting.held, &waiting.job).await }
                        .instrument(span),
                );
            }
        }
        if isolated.is_idle()
            && let Some(suspect) = suspects.pop_front()
        {
            push(&mut isolated, suspect, &ctx);
        }
        if running.is_none() {
            let draining = !open && shared.pending_inputs() > 0;
            let next = if isolated.pending_inputs() > 0 {
                isolated
                    .next_batch(Instant::now())
                    .map(|batch| (Lane::Isolated, batch))
            } else if shared.ready(Instant::now()) || draining {
                shared
                    .next_batch(Instant::now())
                    .map(|batch| (Lane::Shared, batch))
            } else {
                None
            };
            if let Some((lane, mut batch)) = next {
                let padded = batch.padded_tokens() as u32;
                let tokens: usize = batch.inputs.iter().map(|i| i.token_ids.len()).sum();
                ctx.metrics.batch_inputs.observe(batch.len() as f64);
                ctx.metrics.batch_tokens.observe(tokens as f64);
                ctx.metrics.batch_padded_tokens.observe(f64::from(padded));
                tracing::debug!(
                    inputs = batch.len(),
                    jobs = batch.job_count(),
                    padded_tokens = padded,
                    ?lane,
                    "running batch"
                );
                let embedding = ctx.embedder.embed(std::mem::take(&mut batch.inputs));
                running = Some(Running {
                    lane,
                    batch,
                    padded_tokens: padded as usize,
                    started: Instant::now(),
                    frozen_before: freezes.frozen(),
                    limit: ctx.guard.batch_timeout + ctx.guard.batch_timeout_per_token * padded,
                    embedding,
                });
            }
        }
        ctx.metrics
            .batcher_pending_inputs
            .set((shared.pending_inputs() + isolated.pending_inputs()) as i64);
        let settling = running.is_some() || suspects.len() + suspect_rx.len() > 0;
        if !open && !settling && shared.is_idle() && isolated.is_idle() {
            return;
        }
        let due = shared.due_at().map(tokio::time::Instant::from_std);
        tokio::select! {
            received = from_puller.recv(), if open => match received {
                Some(work) => push(&mut shared, work, &ctx),
                None => open = false,
            },
            Some(suspect) = suspect_rx.recv() => suspects.push_back(suspect),
            result = async {
                match running.as_mut() {
                    Some(run) => {
                        let deadline = tokio::time::Instant::from_std(run.started + run.limit);
                        tokio::time::timeout_at(deadline, &mut run.embedding).await
                    }
                    None => std::future::pending().await,
                }
            } => {
                let Some(run) = running.take() else { continue };
                let took = run.started.elapsed();
                ctx.metrics.inference_seconds.observe(took.as_secs_f64());
                let batcher = match run.lane {
                    Lane::Shared => &mut shared,
                    Lane::Isolated => &mut isolated,
                };
                let result = match result {
                    Ok(result) => result,
                    // If the whole process stood still meanwhile (SIGSTOP, a paused VM), the
                    // model did not hang, it was not running: the bound is extended by that
                    // time. The freeze ticker gets a few ticks to see the gap first, as its timer
                    // and this one expired together.
                    Err(_elapsed) if {
                        tokio::time::sleep(Freezes::TICK * 3).await;
                        freezes.frozen_since(run.frozen_before) > Duration::ZERO
                    } => {
                        let mut run = run;
                        run.limit += freezes.frozen_since(run.frozen_before);
                        run.frozen_before = freezes.frozen();
                        running = Some(run);
                        continue;
                    }
                    Err(_elapsed) => {
                        let stalled = ModelFault::Stalled {
                            padded_tokens: run.padded_tokens,
                            limit: run.limit,
                        };
                        hand_back_all(&mut [shared, isolated], suspects, &ctx.responder).await;
                        let _ = fault.send(stalled);
                        return;
                    }
                };
                let failed = match result {
                    Ok(vectors) => match batcher.complete(run.batch, vectors, took) {
                        Ok(finished) => {
                            failures_in_a_row = 0;
                            for done in finished {
                                let (responder, cache) = (ctx.responder.clone(), ctx.cache.clone());
                                let span = done.handle.held.span.clone();
                                tokio::spawn(
                                    async move { succeed(&responder, cache.as_ref(), done).await }
                                        .instrument(span),
                                );
                            }
                            None
                        }
                        Err(jobs) => Some((
                            jobs,
                            FailureKind::Transient,
                            "model returned a vector count unlike the batch's".to_owned(),
                        )),
                    },
                    Err(error) => Some((batcher.fail(run.batch), error.kind, error.to_string())),
                };
                if let Some((jobs, kind, reason)) = failed {
                    failures_in_a_row += 1;
                    settle_failed(jobs, kind, run.lane, &reason, &ctx, &suspect_tx);
                    if failures_in_a_row >= ctx.guard.max_model_failures {
                        hand_back_all(&mut [shared, isolated], suspects, &ctx.responder).await;
                        let _ = fault.send(ModelFault::Failing {
                            failures: failures_in_a_row,
                            last: reason,
                        });
                        return;
                    }
                }
            },
            () = async {
                match due {
                    Some(due) => tokio::time::sleep_until(due).await,
                    None => std::future::pending().await,
                }
            }, if running.is_none() => {}
        }
    }
}

/// Adds a job to a batcher; a job without inputs for the model (every one cached) is answered
/// at once.
fn push<E>(batcher: &mut Batcher<Waiting>, work: Work, ctx: &BatchLoop<E>) {
    let Work {
        held,
        job,
        queued,
        taken_at,
        inputs,
        hits,
    } = work;
    let deadline = job.deadline_ms;
    let waiting = Waiting {
        held,
        job,
        queued: queued + taken_at.elapsed(),
        hits,
    };
    if let Some(done) = batcher.push(waiting, inputs, deadline, Instant::now()) {
        let (responder, cache) = (ctx.responder.clone(), ctx.cache.clone());
        let span = done.handle.held.span.clone();
        tokio::spawn(
            async move { succeed(&responder, cache.as_ref(), done).await }.instrument(span),
        );
    }
}

/// The jobs of a failed batch: a transient failure retries them; a deterministic one re-runs
/// each alone (tokenized again, as their inputs went to the model), and a job that failed alone
/// is the poison one: dead-lettered.
fn settle_failed<E: Embedder>(
    jobs: Vec<Waiting>,
    kind: FailureKind,
    lane: Lane,
    reason: &str,
    ctx: &BatchLoop<E>,
    suspects: &mpsc::UnboundedSender<Work>,
) {
    let alone = lane == Lane::Isolated || jobs.len() == 1;
    for waiting in jobs {
        let responder = ctx.responder.clone();
        let reason = reason.to_owned();
        let span = waiting.held.span.clone();
        match kind {
            FailureKind::Transient => {
                spawn_in(span.clone(), async move {
                    responder
                        .retry(waiting.held, Some(&waiting.job), reason)
                        .await
                });
            }
            FailureKind::Deterministic if alone => {
                spawn_in(span.clone(), async move {
                    let reason = format!("the model fails on this job's inputs: {reason}");
                    responder
                        .dead_letter(
                            waiting.held,
                            Some(&waiting.job),
                            ErrorCode::Internal,
                            DeadLetterReason::PoisonInput,
                            reason,
                        )
                        .await
                });
            }
            FailureKind::Deterministic => {
                let embedder = ctx.embedder.clone();
                let suspects = suspects.clone();
                let tokenize_seconds = ctx.metrics.tokenize_seconds.clone();
                spawn_in(span.clone(), async move {
                    let Waiting {
                        held,
                        job,
                        queued,
                        hits,
                    } = waiting;
                    match tokenize_off_thread(embedder, job, hits, tokenize_seconds).await {
                        Ok((job, hits, Ok(inputs))) => {
                            // Its queue wait leaves out the failed batch's run.
                            let suspect = Work {
                                held,
                                job,
                                queued,
                                taken_at: Instant::now(),
                                inputs,
                                hits,
                            };
                            if let Err(mpsc::error::SendError(suspect)) = suspects.send(suspect) {
                                responder
                                    .retry(suspect.held, Some(&suspect.job), reason)
                                    .await;
                            }
                        }
                        // Tokenized once before, so this is not expected; retry it whole.
                        Ok((job, _, Err(_))) => responder.retry(held, Some(&job), reason).await,
                        Err(_) => responder.retry(held, None, reason).await,
                    }
                });
            }
        }
    }
}

/// After a model fault: every job the batcher holds goes back to the queue for another worker
/// at once. (Jobs of the batch on the model are held by the batcher too.)
async fn hand_back_all(
    batchers: &mut [Batcher<Waiting>; 2],
    suspects: std::collections::VecDeque<Work>,
    responder: &Responder,
) {
    let held = batchers
        .iter_mut()
        .flat_map(|batcher| batcher.take_all())
        .map(|waiting| waiting.held)
        .chain(suspects.into_iter().map(|work| work.held));
    for held in held {
        let span = held.span.clone();
        responder.hand_back(held).instrument(span).await;
    }
}

/// Answers a job whose every input has a vector, cached or computed; the computed ones go to
/// the cache at the same time (the answer does not wait for them).
async fn succeed(
    responder: &Responder,
    cache: Option<&ResultCache>,
    done: crate::batcher::Finished<Waiting>,
) {
    let Waiting {
        held,
        job,
        queued,
        hits,
    } = done.handle;
    let queue_wait = queued + done.waited;
    responder
        .metrics
        .queue_wait_seconds
        .observe(queue_wait.as_secs_f64());
    let timings = Timings {
        queue_ms: queue_wait.as_millis() as u64,
        inference_ms: done.inference.as_millis() as u64,
    };
    let (vectors, fresh) = hits.merge(done.vectors);
    match cache {
        Some(cache) if fresh.contains(&true) => {
            let computed = vectors.clone();
            tokio::join!(
                cache.store(&job, &computed, &fresh),
                responder.succeed(held, &job, vectors, timings)
            );
        }
        _ => responder.succeed(held, &job, vectors, timings).await,
    }
}
