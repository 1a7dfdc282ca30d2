//! The worker's pipeline: pull jobs (bounded in flight) -> check and tokenize -> dynamic
//! batcher -> model -> answer and ack, and the graceful drain on shutdown.

use std::{
    future::Future,
    pin::pin,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use async_nats::jetstream::{self, consumer::PullConsumer};
use fleet_schemas::{
    CodecError, ErrorCode, InvalidName, Job, SignedJob, Task, Timings, decode, subject,
    validate_name,
};
use futures::{StreamExt, future::BoxFuture};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{
    batcher::{Batch, BatchLimits, Batcher},
    config::WorkerConfig,
    consumer::{self, ConsumerSetupError},
    embedder::{EmbedError, Embedder, TokenizeError, TokenizedInput},
    exhausted,
    metrics::{Metrics, Outcome},
    respond::{Held, InFlightPermit, ProgressGuard, Responder},
};

/// How long one pull request waits for jobs; also how quickly an idle worker notices shutdown.
const PULL_EXPIRY: Duration = Duration::from_millis(500);
/// Pause after a failed pull, so a broken connection is not hammered.
const PULL_RETRY: Duration = Duration::from_millis(500);
/// How often a worker waiting for the dispatcher's streams looks again.
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
    #[error("shutdown: {left} jobs still in flight after {waited:?}; they will be redelivered")]
    DrainTimeout { left: usize, waited: Duration },
}

/// A checked, tokenized job on its way to the batcher.
struct Work {
    held: Held,
    job: Job,
    /// From the job's arrival in the queue to its arrival here.
    queued: Duration,
    inputs: Vec<TokenizedInput>,
}

/// A job held by the batcher until all its inputs have vectors.
struct Waiting {
    held: Held,
    job: Job,
    queued: Duration,
}

/// Runs a worker until `shutdown` resolves, then stops pulling, finishes and answers every job
/// it holds, and returns. Waits first for the dispatcher's streams, then binds the model's
/// shared consumer.
pub async fn run<E: Embedder>(
    config: &WorkerConfig,
    client: async_nats::Client,
    embedder: E,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), PipelineError> {
    if config.batch.max_batch_tokens < embedder.max_tokens() {
        return Err(PipelineError::BatchTooSmall {
            max_batch_tokens: config.batch.max_batch_tokens,
            max_tokens: embedder.max_tokens(),
        });
    }
    let js = jetstream::new(client.clone());
    let mut shutdown = pin!(shutdown);
    tokio::select! {
        ready = consumer::wait_for_streams(&js, STREAMS_RETRY) => ready.map_err(ConsumerSetupError::from)?,
        () = &mut shutdown => return Ok(()),
    }
    let pull = consumer::bind(&js, &config.consumer).await?;
    tracing::info!(
        consumer = %config.consumer.durable_name,
        worker = %config.worker_name,
        "bound consumer; pulling jobs"
    );
    let advisories = exhausted::subscribe(&client, &config.consumer.durable_name).await?;
    let responder = Arc::new(Responder {
        client,
        js: js.clone(),
        worker: config.worker_name.clone(),
        model: config.model.clone(),
        max_deliver: config.consumer.max_deliver,
        retry_delay: config.retry_delay,
        metrics: metrics.clone(),
    });
    let (stop_watcher, watcher_stop) = oneshot::channel();
    let watcher = tokio::spawn(exhausted::watch(
        advisories,
        responder.clone(),
        watcher_stop,
    ));
    let in_flight = Arc::new(Semaphore::new(config.max_in_flight));
    let (to_batcher, from_puller) = mpsc::channel(config.max_in_flight);
    let batcher = tokio::spawn(batch_loop(
        from_puller,
        embedder.clone(),
        config.batch,
        responder.clone(),
        metrics.clone(),
    ));
    let intake = Intake {
        config,
        js,
        embedder,
        responder,
        to_batcher,
        progress_every: progress_interval(config),
    };
    pull_loop(&pull, &intake, &in_flight, config, &mut shutdown).await;
    tracing::info!("shutting down: no more pulls; finishing jobs in flight");
    drop(intake);
    let all = u32::try_from(config.max_in_flight).unwrap_or(u32::MAX);
    let _ = stop_watcher.send(());
    let drained = tokio::time::timeout(config.shutdown_timeout, async {
        // Every held job owns a permit until it is settled, so owning them all means done.
        let _all = in_flight.acquire_many(all).await;
        if let Err(error) = watcher.await {
            tracing::error!(%error, "exhausted-job watcher failed");
        }
    })
    .await;
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

/// In-progress acks go out three times per ack wait, so one lost ack does not cost the job.
fn progress_interval(config: &WorkerConfig) -> Duration {
    let shortest = config
        .consumer
        .backoff
        .iter()
        .copied()
        .chain([config.consumer.ack_wait])
        .min()
        .unwrap_or(config.consumer.ack_wait);
    (shortest / 3).max(Duration::from_millis(100))
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

/// Every input of `task` tokenized, or the first that cannot be, with its index.
fn tokenize_task<E: Embedder>(
    embedder: &E,
    task: &Task,
) -> Result<Vec<TokenizedInput>, (usize, TokenizeError)> {
    let Task::Embed {
        inputs,
        normalize,
        truncate,
    } = task;
    inputs
        .iter()
        .enumerate()
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

struct Intake<'a, E> {
    config: &'a WorkerConfig,
    js: jetstream::Context,
    embedder: E,
    responder: Arc<Responder>,
    to_batcher: mpsc::Sender<Work>,
    progress_every: Duration,
}

impl<E: Embedder> Intake<'_, E> {
    /// Reads a delivered job and routes it: to the dead-letter stream when it can never run, to
    /// an `expired` answer when too late, otherwise to the batcher.
    async fn accept(&self, msg: jetstream::Message, permit: tokio::sync::OwnedSemaphorePermit) {
        let queued = msg
            .info()
            .map(|info| {
                let published_ms = (info.published.unix_timestamp_nanos() / 1_000_000) as u64;
                Duration::from_millis(now_ms().saturating_sub(published_ms))
            })
            .unwrap_or_default();
        let reply_to = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(subject::REPLY_TO))
            .map(|v| v.as_str().to_owned());
        let progress = ProgressGuard::start(&self.js, &msg, self.progress_every);
        let held = Held {
            msg,
            reply_to,
            progress,
            permit: InFlightPermit::new(permit, &self.responder.metrics),
        };
        let job = match self.read_job(&held.msg.payload) {
            Ok(job) => job,
            Err(reason) => {
                let responder = self.responder.clone();
                tokio::spawn(async move {
                    responder
                        .dead_letter(held, None, ErrorCode::Malformed, reason.to_string())
                        .await
                });
                return;
            }
        };
        if job.deadline_ms.is_some_and(|deadline| now_ms() > deadline) {
            let responder = self.responder.clone();
            tokio::spawn(async move { answer_expired(&responder, held, &job).await });
            return;
        }
        // Off the async threads: a job may carry megabytes of text. The job travels to the
        // blocking pool and back rather than being copied.
        let embedder = self.embedder.clone();
        let tokenizing = tokio::task::spawn_blocking(move || {
            let tokenized = tokenize_task(&embedder, &job.task);
            (job, tokenized)
        });
        let (job, tokenized) = match tokenizing.await {
            Ok(done) => done,
            Err(panicked) => {
                // The job went down with the task; it is read again from the held message
                // (it was read once already), so the retry can still answer it.
                let job = decode_job(&held.msg.payload, usize::MAX).ok();
                let reason = format!("tokenizer panicked: {panicked}");
                let responder = self.responder.clone();
                tokio::spawn(async move { responder.retry(held, job.as_ref(), reason).await });
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
                tokio::spawn(async move {
                    responder
                        .dead_letter(held, Some(&job), ErrorCode::InputTooLong, reason)
                        .await
                });
                return;
            }
            Err((_, error @ TokenizeError::Failed(_))) => {
                let responder = self.responder.clone();
                tokio::spawn(
                    async move { responder.retry(held, Some(&job), error.to_string()).await },
                );
                return;
            }
        };
        let work = Work {
            held,
            job,
            queued,
            inputs: tokenized,
        };
        // Waits while the batcher is busy (backpressure); fails only once the batcher is gone.
        if let Err(mpsc::error::SendError(work)) = self.to_batcher.send(work).await {
            let responder = self.responder.clone();
            tokio::spawn(async move {
                responder
                    .retry(work.held, Some(&work.job), "worker is stopping".to_owned())
                    .await
            });
        }
    }

    fn read_job(&self, payload: &[u8]) -> Result<Job, ReadJobError> {
        let job = decode_job(payload, self.config.max_job_bytes)?;
        if job.model != self.config.model {
            return Err(ReadJobError::WrongModel {
                job: job.model,
                queue: self.config.model.clone(),
            });
        }
        Ok(job)
    }
}

/// The job in a queued message, with the names that become subject tokens and header values
/// checked: the dispatcher checked them, but anything with publish rights on the queue can put
/// a job there.
pub(crate) fn decode_job(payload: &[u8], max_bytes: usize) -> Result<Job, ReadJobError> {
    let envelope: SignedJob = decode(payload, max_bytes).map_err(ReadJobError::Envelope)?;
    let job: Job = decode(&envelope.body, max_bytes).map_err(ReadJobError::Body)?;
    validate_name("job_id", &job.job_id)?;
    validate_name("tenant", &job.tenant)?;
    Ok(job)
}

/// Why a message on the queue is not a job this worker can run (it is dead-lettered).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadJobError {
    #[error("bad envelope: {0}")]
    Envelope(CodecError),
    #[error("bad job: {0}")]
    Body(CodecError),
    #[error("bad job: {0}")]
    Name(#[from] InvalidName),
    #[error("job for model {job:?} on the queue of {queue:?}")]
    WrongModel { job: String, queue: String },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn answer_expired(responder: &Responder, held: Held, job: &Job) {
    let message = match job.deadline_ms {
        Some(deadline) => format!("deadline {deadline} passed before the job ran"),
        None => "deadline passed before the job ran".to_owned(),
    };
    responder
        .fail(held, job, ErrorCode::Expired, message, Outcome::Expired)
        .await;
}

type Running = BoxFuture<'static, (Batch, Result<Vec<Vec<f32>>, EmbedError>, Duration)>;

/// Gathers jobs into batches and runs one batch at a time on the model; jobs keep arriving
/// while it runs, so the next batch is fuller. Ends when the intake is closed and every job it
/// took is answered.
async fn batch_loop<E: Embedder>(
    mut from_puller: mpsc::Receiver<Work>,
    embedder: E,
    limits: BatchLimits,
    responder: Arc<Responder>,
    metrics: Metrics,
) {
    let mut batcher: Batcher<Waiting> = Batcher::new(limits);
    let mut running: Option<Running> = None;
    let mut open = true;
    loop {
        for waiting in batcher.take_expired(now_ms()) {
            let responder = responder.clone();
            tokio::spawn(
                async move { answer_expired(&responder, waiting.held, &waiting.job).await },
            );
        }
        let draining = !open && batcher.pending_inputs() > 0;
        if running.is_none()
            && (batcher.ready(Instant::now()) || draining)
            && let Some(mut batch) = batcher.next_batch(Instant::now())
        {
            metrics.batch_size.observe(batch.len() as f64);
            tracing::debug!(
                inputs = batch.len(),
                jobs = batch.job_count(),
                padded_tokens = batch.padded_tokens(),
                "running batch"
            );
            let embedding = embedder.embed(std::mem::take(&mut batch.inputs));
            running = Some(Box::pin(async move {
                let start = Instant::now();
                let result = embedding.await;
                (batch, result, start.elapsed())
            }));
        }
        metrics.queue_depth.set(batcher.pending_inputs() as i64);
        if !open && running.is_none() && batcher.is_idle() {
            return;
        }
        let due = batcher.due_at().map(tokio::time::Instant::from_std);
        tokio::select! {
            received = from_puller.recv(), if open => match received {
                Some(work) => {
                    let Work { held, job, queued, inputs } = work;
                    let deadline = job.deadline_ms;
                    let waiting = Waiting { held, job, queued };
                    if let Some(done) = batcher.push(waiting, inputs, deadline, Instant::now()) {
                        let responder = responder.clone();
                        tokio::spawn(async move { succeed(&responder, done).await });
                    }
                }
                None => open = false,
            },
            (batch, result, took) = async {
                match running.as_mut() {
                    Some(run) => run.await,
                    None => std::future::pending().await,
                }
            } => {
                running = None;
                metrics.inference_seconds.observe(took.as_secs_f64());
                let outcome = match result {
                    Ok(vectors) => batcher.complete(batch, vectors, took).map_err(|jobs| {
                        (jobs, "model returned a vector count unlike the batch's".to_owned())
                    }),
                    Err(error) => Err((batcher.fail(batch), error.to_string())),
                };
                match outcome {
                    Ok(finished) => {
                        for done in finished {
                            let responder = responder.clone();
                            tokio::spawn(async move { succeed(&responder, done).await });
                        }
                    }
                    Err((jobs, reason)) => {
                        for waiting in jobs {
                            let responder = responder.clone();
                            let reason = reason.clone();
                            tokio::spawn(async move {
                                responder.retry(waiting.held, Some(&waiting.job), reason).await
                            });
                        }
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

async fn succeed(responder: &Responder, done: crate::batcher::Finished<Waiting>) {
    let Waiting { held, job, queued } = done.handle;
    let timings = Timings {
        queue_ms: (queued + done.waited).as_millis() as u64,
        inference_ms: done.inference.as_millis() as u64,
    };
    responder.succeed(held, &job, done.vectors, timings).await;
}
