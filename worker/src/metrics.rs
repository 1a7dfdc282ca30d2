//! The worker's Prometheus metrics: what became of jobs, where their time went, how full batches
//! are, and the queue as JetStream reports it. `METRICS.md` at the repository root lists them
//! all, with the bucket choices.
//!
//! Each job is counted once in `fleet_worker_jobs_total`, by the worker whose result store won
//! (the store is a compare-and-set, see [`crate::store`]): a delivery that is given back
//! (retried), finds the result already stored, or loses its hold is counted apart.

use std::time::Duration;

use fleet_schemas::ErrorCode;
use fleet_service::{label_values, metrics::CodeLabel};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

/// What one delivery of a job came to, as [`Metrics::jobs`] reports it.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with vectors.
    Ok,
    /// Answered `expired` without inference.
    Expired,
    /// Sent to the dead-letter stream.
    DeadLettered,
    /// Given back for a later retry (nak).
    Retried,
    /// Acked without running or answering: a redelivery found the job's result stored.
    AlreadyStored,
    /// Left unsettled: this worker's hold expired (it stalled) and the job went elsewhere.
    Abandoned,
}

/// A job's final outcome: what its stored result says and its caller was answered.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Finished {
    Ok,
    Expired,
    DeadLettered,
}

/// Why a delivery ended without giving its job an outcome: the job has one already, or gets
/// one from a later delivery.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Unfinished {
    /// The job's result was stored by an earlier delivery: acked without running again.
    AlreadyStored,
    /// This worker's hold on the delivery expired (it stalled): left to the redelivery.
    Abandoned,
    /// Given back at once because the worker stopped trusting its model.
    HandedBack,
}

/// Why a job went to the dead-letter stream.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Not a job this worker can read: bad envelope, body or names, or another model's job.
    Unreadable,
    /// Its tenant's key did not sign it or does not allow it (bad signature, unknown or revoked
    /// key, another tenant's job, a model the tenant may not use).
    Refused,
    /// An input is longer than the model takes and the job did not ask for truncation.
    InputTooLong,
    /// The model fails on this job's inputs, run alone.
    PoisonInput,
    /// It failed on the last delivery allowed (`--max-deliver`).
    OutOfRetries,
    /// Its last delivery was never settled: found by the server's advisory or the sweep.
    OutOfDeliveries,
}

/// Job messages the server will not deliver again, settled by the worker.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Reconciled {
    /// Out of deliveries: dead-lettered, answered, removed from the queue.
    Exhausted,
    /// Left on the queue although its result is stored (a broker that lost the ack): removed.
    Orphan,
}

/// What one result cache lookup (one input text) found.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum CacheLookup {
    /// The text's vector was cached: the model skipped it.
    Hit,
    /// Not cached: the model ran it.
    Miss,
    /// The lookup failed (timeout, bucket away, unreadable value): the model ran it.
    Error,
}

/// What became of one vector the worker tried to cache.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum CacheStore {
    Stored,
    Failed,
}

label_values!(CacheLookup {
    Hit => "hit",
    Miss => "miss",
    Error => "error",
});

label_values!(CacheStore {
    Stored => "stored",
    Failed => "failed",
});

label_values!(Finished {
    Ok => "ok",
    Expired => "expired",
    DeadLettered => "dead_lettered",
});

label_values!(Unfinished {
    AlreadyStored => "already_stored",
    Abandoned => "abandoned",
    HandedBack => "handed_back",
});

label_values!(DeadLetterReason {
    Unreadable => "unreadable",
    Refused => "refused",
    InputTooLong => "input_too_long",
    PoisonInput => "poison_input",
    OutOfRetries => "out_of_retries",
    OutOfDeliveries => "out_of_deliveries",
});

label_values!(Reconciled {
    Exhausted => "exhausted",
    Orphan => "orphan",
});

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    outcome: Finished,
    /// The error code the caller got; none for `ok`.
    code: Option<CodeLabel>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: Finished,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnfinishedLabels {
    reason: Unfinished,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLetterLabels {
    reason: DeadLetterReason,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconciledLabels {
    kind: Reconciled,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLookupLabels {
    outcome: CacheLookup,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheStoreLabels {
    outcome: CacheStore,
}

/// The queue's state as JetStream reports it, labelled with the reporting worker: every worker
/// of a model reports the same consumer (aggregate with `max by (model)`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumerLabels {
    pub model: String,
    pub worker: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
    pub worker: String,
}

/// Gauges of the queue, read from JetStream at a bounded rate (`--queue-metrics-every`).
#[derive(Clone, Default)]
pub struct QueueMetrics {
    /// Jobs not yet delivered plus jobs delivered and not yet acknowledged.
    pub consumer_lag: Family<ConsumerLabels, Gauge>,
    pub consumer_pending: Family<ConsumerLabels, Gauge>,
    pub consumer_ack_pending: Family<ConsumerLabels, Gauge>,
    pub consumer_redelivered: Family<ConsumerLabels, Gauge>,
    pub stream_messages: Family<StreamLabels, Gauge>,
    pub stream_bytes: Family<StreamLabels, Gauge>,
    /// Reads of the queue's state that failed (the gauges keep their last values meanwhile).
    pub reads_failed: Counter,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// End to end, from queuing to the final outcome: milliseconds on a GPU, seconds on a CPU
/// under load, up to the job age limit (60 s): 5 ms to 82 s.
fn job_seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

#[derive(Clone)]
pub struct Metrics {
    jobs: Family<JobLabels, Counter>,
    job_seconds: HistogramFamily<OutcomeLabels>,
    retries: Counter,
    unfinished: Family<UnfinishedLabels, Counter>,
    dead_letters: Family<DeadLetterLabels, Counter>,
    reconciled: Family<ReconciledLabels, Counter>,
    cache_lookups: Family<CacheLookupLabels, Counter>,
    cache_stores: Family<CacheStoreLabels, Counter>,
    /// Deliveries seen whose delivery count is above 1.
    pub redeliveries: Counter,
    /// 1 while the worker pulls jobs; 0 once its model stalled or kept failing.
    pub ready: Gauge,
    /// 1 once the model is loaded and has run its warm-up pass.
    pub model_ready: Gauge,
    /// Jobs taken from the queue and not yet settled.
    pub jobs_in_flight: Gauge,
    /// Inputs in the batcher waiting for a batch.
    pub batcher_pending_inputs: Gauge,
    pub queue_wait_seconds: Histogram,
    pub tokenize_seconds: Histogram,
    pub batch_inputs: Histogram,
    pub batch_tokens: Histogram,
    pub batch_padded_tokens: Histogram,
    pub inference_seconds: Histogram,
    pub queue: QueueMetrics,
}

impl Metrics {
    /// Registers the worker's series, each labelled with the `model` it serves, so a dashboard
    /// or alert groups workers by model without a join.
    pub fn new(registry: &mut Registry, model: &str) -> Metrics {
        let metrics = Metrics {
            jobs: Family::default(),
            job_seconds: Family::new_with_constructor(job_seconds_histogram),
            retries: Counter::default(),
            unfinished: Family::default(),
            dead_letters: Family::default(),
            reconciled: Family::default(),
            cache_lookups: Family::default(),
            cache_stores: Family::default(),
            redeliveries: Counter::default(),
            ready: Gauge::default(),
            model_ready: Gauge::default(),
            jobs_in_flight: Gauge::default(),
            batcher_pending_inputs: Gauge::default(),
            // Queuing to batch start: 1 ms (an idle worker) to 65 s (past the job age limit).
            queue_wait_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            // One job's inputs: 50 µs (a short text) to 1.6 s (256 long inputs).
            tokenize_seconds: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            // 1 to 512 inputs, powers of two (the default batch is at most 32).
            batch_inputs: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            // 16 to 32,768 tokens, powers of two (the default bound is 16,384 padded tokens).
            batch_tokens: Histogram::new(exponential_buckets(16.0, 2.0, 12)),
            batch_padded_tokens: Histogram::new(exponential_buckets(16.0, 2.0, 12)),
            // One batch on the model: 1 ms (a GPU, a short batch) to 33 s (a CPU, a full one).
            inference_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            queue: QueueMetrics::default(),
        };
        metrics.zero_every_series();
        let worker = registry
            .sub_registry_with_prefix("fleet_worker")
            .sub_registry_with_label(("model".into(), model.to_owned().into()));
        worker.register(
            "jobs",
            "Jobs finished, once each, by final outcome (ok, expired, dead_lettered) and the error \
             code their caller got",
            metrics.jobs.clone(),
        );
        worker.register_with_unit(
            "job",
            "End to end per job: from its queuing on JetStream to its final outcome, by outcome",
            Unit::Seconds,
            metrics.job_seconds.clone(),
        );
        worker.register(
            "job_retries",
            "Deliveries given back for a later retry (transient failures); the job is counted \
             in jobs_total when it finishes",
            metrics.retries.clone(),
        );
        worker.register(
            "deliveries_unfinished",
            "Deliveries ended without an outcome for their job, by reason (already_stored, \
             abandoned, handed_back)",
            metrics.unfinished.clone(),
        );
        worker.register(
            "dead_letters",
            "Jobs sent to the dead-letter stream, by reason",
            metrics.dead_letters.clone(),
        );
        worker.register(
            "redeliveries",
            "Deliveries seen that were not a job's first",
            metrics.redeliveries.clone(),
        );
        worker.register(
            "reconciled",
            "Job messages the server would not deliver again, settled by a worker, by kind",
            metrics.reconciled.clone(),
        );
        worker.register(
            "result_cache_lookups",
            "Input texts looked up in the result cache, by outcome (hit: the model skipped it; \
             miss; error: the lookup failed and the model ran it). Hit ratio: hit over all",
            metrics.cache_lookups.clone(),
        );
        worker.register(
            "result_cache_stores",
            "Vectors computed by the model and stored in the result cache, by outcome",
            metrics.cache_stores.clone(),
        );
        worker.register(
            "ready",
            "1 while the worker pulls jobs, 0 once its model stalled or kept failing",
            metrics.ready.clone(),
        );
        worker.register(
            "model_ready",
            "1 once the model is loaded and has run its warm-up pass",
            metrics.model_ready.clone(),
        );
        worker.register(
            "jobs_in_flight",
            "Jobs taken from the queue and not yet settled",
            metrics.jobs_in_flight.clone(),
        );
        worker.register(
            "batcher_pending_inputs",
            "Inputs in the batcher waiting for a batch",
            metrics.batcher_pending_inputs.clone(),
        );
        worker.register_with_unit(
            "queue_wait",
            "Per job answered with vectors: from its queuing on JetStream to the start of its \
             first batch (what the result reports as timings.queue_ms)",
            Unit::Seconds,
            metrics.queue_wait_seconds.clone(),
        );
        worker.register_with_unit(
            "tokenize",
            "Time to tokenize one job's inputs",
            Unit::Seconds,
            metrics.tokenize_seconds.clone(),
        );
        worker.register_with_unit(
            "batch",
            "Inputs per model batch",
            Unit::Other("inputs".into()),
            metrics.batch_inputs.clone(),
        );
        worker.register_with_unit(
            "batch",
            "Tokens per model batch, without padding",
            Unit::Other("tokens".into()),
            metrics.batch_tokens.clone(),
        );
        worker.register_with_unit(
            "batch_padded",
            "Tokens per model batch with padding: inputs times the longest input, what the \
             model computes",
            Unit::Other("tokens".into()),
            metrics.batch_padded_tokens.clone(),
        );
        worker.register_with_unit(
            "inference",
            "Model time per batch, failed batches included",
            Unit::Seconds,
            metrics.inference_seconds.clone(),
        );
        let queue = registry.sub_registry_with_prefix("fleet_queue");
        let gauges = &metrics.queue;
        queue.register(
            "consumer_lag",
            "Jobs of the model not yet delivered plus delivered and not yet acknowledged \
             (num_pending + num_ack_pending): what an autoscaler scales on",
            gauges.consumer_lag.clone(),
        );
        queue.register(
            "consumer_pending",
            "Jobs of the model not yet delivered (num_pending)",
            gauges.consumer_pending.clone(),
        );
        queue.register(
            "consumer_ack_pending",
            "Jobs of the model delivered and not yet acknowledged (num_ack_pending)",
            gauges.consumer_ack_pending.clone(),
        );
        queue.register(
            "consumer_redelivered",
            "Jobs of the model delivered more than once and not yet acknowledged \
             (num_redelivered)",
            gauges.consumer_redelivered.clone(),
        );
        queue.register(
            "stream_messages",
            "Messages held by each of Fleet's streams",
            gauges.stream_messages.clone(),
        );
        queue.register_with_unit(
            "stream",
            "Bytes held by each of Fleet's streams",
            Unit::Bytes,
            gauges.stream_bytes.clone(),
        );
        queue.register(
            "reads_failed",
            "Reads of the queue's state from JetStream that failed (the gauges keep their last \
             values)",
            gauges.reads_failed.clone(),
        );
        metrics
    }

    /// Makes every labelled series a worker can report, at 0. Prometheus takes a series' first
    /// sample as its start, so a series born at 1 (the first dead letter after a restart) would
    /// never show in `rate()` or `increase()`, and dashboards would have nothing to show.
    fn zero_every_series(&self) {
        for &outcome in Finished::ALL {
            let _ = self.job_seconds.get_or_create(&OutcomeLabels { outcome });
            // The codes a worker answers with: none for ok, `expired`, any for a dead letter.
            let codes: Vec<Option<ErrorCode>> = match outcome {
                Finished::Ok => vec![None],
                Finished::Expired => vec![Some(ErrorCode::Expired)],
                Finished::DeadLettered => ErrorCode::ALL.into_iter().map(Some).collect(),
            };
            for code in codes {
                let _ = self.jobs.get_or_create(&JobLabels {
                    outcome,
                    code: code.map(CodeLabel),
                });
            }
        }
        for &reason in Unfinished::ALL {
            let _ = self.unfinished.get_or_create(&UnfinishedLabels { reason });
        }
        for &reason in DeadLetterReason::ALL {
            let _ = self
                .dead_letters
                .get_or_create(&DeadLetterLabels { reason });
        }
        for &kind in Reconciled::ALL {
            let _ = self.reconciled.get_or_create(&ReconciledLabels { kind });
        }
        for &outcome in CacheLookup::ALL {
            let _ = self
                .cache_lookups
                .get_or_create(&CacheLookupLabels { outcome });
        }
        for &outcome in CacheStore::ALL {
            let _ = self
                .cache_stores
                .get_or_create(&CacheStoreLabels { outcome });
        }
    }

    /// One input text looked up in the result cache.
    pub fn cache_lookup(&self, outcome: CacheLookup) {
        self.cache_lookups
            .get_or_create(&CacheLookupLabels { outcome })
            .inc();
    }

    /// One computed vector offered to the result cache.
    pub fn cache_store(&self, outcome: CacheStore) {
        self.cache_stores
            .get_or_create(&CacheStoreLabels { outcome })
            .inc();
    }

    /// A job's final outcome, with the error code its caller got (none for `ok`), `after` its
    /// queuing.
    pub fn finished(&self, outcome: Finished, code: Option<ErrorCode>, after: Duration) {
        self.jobs
            .get_or_create(&JobLabels {
                outcome,
                code: code.map(CodeLabel),
            })
            .inc();
        self.job_seconds
            .get_or_create(&OutcomeLabels { outcome })
            .observe(after.as_secs_f64());
    }

    /// A dead letter (its job's outcome is counted by [`Metrics::finished`]).
    pub fn dead_lettered(&self, reason: DeadLetterReason) {
        self.dead_letters
            .get_or_create(&DeadLetterLabels { reason })
            .inc();
    }

    pub fn retried(&self) {
        self.retries.inc();
    }

    pub fn unfinished(&self, reason: Unfinished) {
        self.unfinished
            .get_or_create(&UnfinishedLabels { reason })
            .inc();
    }

    pub fn reconciled(&self, kind: Reconciled) {
        self.reconciled
            .get_or_create(&ReconciledLabels { kind })
            .inc();
    }

    pub fn reconciled_count(&self, kind: Reconciled) -> u64 {
        self.reconciled
            .get(&ReconciledLabels { kind })
            .map_or(0, |counter| counter.get())
    }

    /// How many deliveries came to `outcome` (for a final outcome, over every error code).
    pub fn jobs(&self, outcome: Outcome) -> u64 {
        let finished = |outcome: Finished| {
            [None]
                .into_iter()
                .chain(ErrorCode::ALL.map(Some))
                .filter_map(|code| {
                    self.jobs.get(&JobLabels {
                        outcome,
                        code: code.map(CodeLabel),
                    })
                })
                .map(|counter| counter.get())
                .sum()
        };
        let unfinished = |reason: Unfinished| {
            self.unfinished
                .get(&UnfinishedLabels { reason })
                .map_or(0, |counter| counter.get())
        };
        match outcome {
            Outcome::Ok => finished(Finished::Ok),
            Outcome::Expired => finished(Finished::Expired),
            Outcome::DeadLettered => finished(Finished::DeadLettered),
            Outcome::Retried => self.retries.get(),
            Outcome::AlreadyStored => unfinished(Unfinished::AlreadyStored),
            Outcome::Abandoned => unfinished(Unfinished::Abandoned),
        }
    }
}
