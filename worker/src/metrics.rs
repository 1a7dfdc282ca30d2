//! The worker's Prometheus metrics: what happened to jobs, how big batches are, how long the
//! model takes, and how much work waits.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
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

/// Job messages the server will not deliver again, settled by the worker.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Reconciled {
    /// Out of deliveries: dead-lettered, answered, removed from the queue.
    Exhausted,
    /// Left on the queue although its result is stored (a broker that lost the ack): removed.
    Orphan,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconciledLabels {
    pub kind: Reconciled,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: Outcome,
}

#[derive(Clone)]
pub struct Metrics {
    jobs: Family<OutcomeLabels, Counter>,
    reconciled: Family<ReconciledLabels, Counter>,
    /// 1 while the worker pulls jobs; 0 once its model stalled or kept failing.
    pub ready: Gauge,
    pub batch_size: Histogram,
    pub inference_seconds: Histogram,
    /// Inputs waiting in the batcher for a batch.
    pub queue_depth: Gauge,
    /// Jobs taken from the queue and not yet acknowledged.
    pub in_flight: Gauge,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            jobs: Family::default(),
            reconciled: Family::default(),
            ready: Gauge::default(),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            inference_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            queue_depth: Gauge::default(),
            in_flight: Gauge::default(),
        };
        let registry = registry.sub_registry_with_prefix("fleet_worker");
        registry.register("jobs", "Jobs finished, by outcome", metrics.jobs.clone());
        registry.register(
            "reconciled",
            "Job messages the server would not deliver again, settled by a worker, by kind",
            metrics.reconciled.clone(),
        );
        registry.register(
            "ready",
            "1 while the worker pulls jobs, 0 once its model stalled or kept failing",
            metrics.ready.clone(),
        );
        registry.register(
            "batch_size",
            "Inputs per model batch",
            metrics.batch_size.clone(),
        );
        registry.register(
            "inference_seconds",
            "Model time per batch",
            metrics.inference_seconds.clone(),
        );
        registry.register(
            "queue_depth",
            "Inputs waiting for a batch",
            metrics.queue_depth.clone(),
        );
        registry.register(
            "in_flight",
            "Jobs held unacknowledged",
            metrics.in_flight.clone(),
        );
        metrics
    }

    pub fn job(&self, outcome: Outcome) {
        self.jobs.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    pub fn reconciled(&self, kind: Reconciled) {
        self.reconciled
            .get_or_create(&ReconciledLabels { kind })
            .inc();
    }

    pub fn reconciled_count(&self, kind: Reconciled) -> u64 {
        self.reconciled
            .get_or_create(&ReconciledLabels { kind })
            .get()
    }

    pub fn jobs(&self, outcome: Outcome) -> u64 {
        self.jobs.get_or_create(&OutcomeLabels { outcome }).get()
    }
}
