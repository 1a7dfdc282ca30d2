//! The dispatcher's Prometheus metrics: what became of every request (by subject kind, outcome
//! and code), how long admission, its signature check and the JetStream publish took, and what
//! is under way. `METRICS.md` at the repository root lists them all, with the bucket choices.

use fleet_schemas::ErrorCode;
use fleet_service::label_values;
use fleet_service::metrics::CodeLabel;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use tokio::sync::OwnedSemaphorePermit;

/// Admission is CPU work: decoding (up to a 1 MiB envelope) and one Ed25519 verification
/// (tens of µs), so buckets run from 10 µs to 100 ms.
const ADMISSION_BUCKETS: [f64; 12] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1,
];
/// A JetStream publish is a round trip to the server and a store (sub-ms on loopback, ms on a
/// network, more with replication), bounded by `--publish-timeout` (5 s by default).
const PUBLISH_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0,
];

/// The ingress subject a request came on.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RequestKind {
    /// `fleet.infer.<model>`: the caller waits for the job's result.
    Infer,
    /// `fleet.submit.<model>`: the caller is told the job is queued.
    Submit,
}

/// What became of a request.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Queued on JetStream.
    Accepted,
    /// Its job id was already queued within the duplicate window: queued once, not again.
    Duplicate,
    /// Refused with an error code.
    Rejected,
}

label_values!(RequestKind {
    Infer => "infer",
    Submit => "submit",
});

label_values!(RequestOutcome {
    Accepted => "accepted",
    Duplicate => "duplicate",
    Rejected => "rejected",
});

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: RequestKind,
    outcome: RequestOutcome,
    /// Set for rejections only.
    code: Option<CodeLabel>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    code: CodeLabel,
}

/// The dispatcher's metrics: every request it reads is counted once in `requests`.
#[derive(Clone)]
pub struct DispatcherMetrics {
    requests: Family<RequestLabels, Counter>,
    /// Jobs queued, whatever the subject (`requests` by kind has the same count).
    pub accepted: Counter,
    /// Jobs already queued, whatever the subject.
    pub duplicates: Counter,
    /// Refusals by code, whatever the subject.
    rejected: Family<CodeLabels, Counter>,
    pub relayed: Counter,
    pub requests_dropped: Counter,
    /// Answers not sent because their reply subject is not an inbox.
    pub unanswerable: Counter,
    pub admission_seconds: Histogram,
    pub signature_verification_seconds: Histogram,
    pub publish_seconds: Histogram,
    /// Requests holding a publish slot: being admitted or awaiting the queue's ack.
    pub admissions_in_flight: Gauge,
    /// Repeated `infer` calls waiting for the stored result of the job they repeat.
    pub relays_waiting: Gauge,
}

impl DispatcherMetrics {
    /// Makes every labelled series a dispatcher can report, at 0: Prometheus takes a series'
    /// first sample as its start, so one born at 1 (the first `overloaded` after a restart)
    /// would never show in `rate()` or `increase()`.
    fn zero_every_series(&self) {
        for &kind in RequestKind::ALL {
            for outcome in [RequestOutcome::Accepted, RequestOutcome::Duplicate] {
                let _ = self.requests.get_or_create(&RequestLabels {
                    kind,
                    outcome,
                    code: None,
                });
            }
            for code in ErrorCode::ALL {
                let _ = self.requests.get_or_create(&RequestLabels {
                    kind,
                    outcome: RequestOutcome::Rejected,
                    code: Some(CodeLabel(code)),
                });
            }
        }
        for code in ErrorCode::ALL {
            let _ = self.rejected.get_or_create(&CodeLabels {
                code: CodeLabel(code),
            });
        }
    }

    pub fn register(registry: &mut Registry) -> Self {
        let metrics = DispatcherMetrics {
            requests: Family::default(),
            accepted: Counter::default(),
            duplicates: Counter::default(),
            rejected: Family::default(),
            relayed: Counter::default(),
            requests_dropped: Counter::default(),
            unanswerable: Counter::default(),
            admission_seconds: Histogram::new(ADMISSION_BUCKETS),
            signature_verification_seconds: Histogram::new(ADMISSION_BUCKETS),
            publish_seconds: Histogram::new(PUBLISH_BUCKETS),
            admissions_in_flight: Gauge::default(),
            relays_waiting: Gauge::default(),
        };
        metrics.zero_every_series();
        let fleet = registry.sub_registry_with_prefix("fleet_dispatcher");
        fleet.register(
            "requests",
            "Requests read, by subject kind (infer, submit), outcome (accepted, duplicate, \
             rejected) and error code (rejections only)",
            metrics.requests.clone(),
        );
        fleet.register(
            "jobs_accepted",
            "Jobs queued on JetStream (requests_total with outcome accepted, over both kinds)",
            metrics.accepted.clone(),
        );
        fleet.register(
            "jobs_duplicate",
            "Jobs whose id was already queued within the duplicate window (requests_total with \
             outcome duplicate, over both kinds)",
            metrics.duplicates.clone(),
        );
        fleet.register(
            "jobs_rejected",
            "Jobs refused, by error code (requests_total with outcome rejected, over both kinds)",
            metrics.rejected.clone(),
        );
        fleet.register(
            "results_relayed",
            "Stored results sent to an infer call that repeated a queued job id",
            metrics.relayed.clone(),
        );
        fleet.register(
            "requests_dropped",
            "Requests the NATS client dropped unread because this dispatcher's buffer was full \
             (a lower bound: a burst of drops can overflow the client's event queue too)",
            metrics.requests_dropped.clone(),
        );
        fleet.register(
            "answers_not_sent",
            "Answers not sent because the request's reply subject is not an inbox",
            metrics.unanswerable.clone(),
        );
        fleet.register_with_unit(
            "admission",
            "Time to admit or refuse a request: decoding, signature, tenant, clock, sizes, rate",
            Unit::Seconds,
            metrics.admission_seconds.clone(),
        );
        fleet.register_with_unit(
            "signature_verification",
            "Time to look up a job's key and verify its signature (part of admission)",
            Unit::Seconds,
            metrics.signature_verification_seconds.clone(),
        );
        fleet.register_with_unit(
            "publish",
            "Time from publishing an admitted job to JetStream's ack (or the timeout)",
            Unit::Seconds,
            metrics.publish_seconds.clone(),
        );
        fleet.register(
            "admissions_in_flight",
            "Requests being admitted or awaiting the queue's ack (bounded by \
             --max-pending-publishes; at the bound new ones are refused overloaded)",
            metrics.admissions_in_flight.clone(),
        );
        fleet.register(
            "relays_waiting",
            "Repeated infer calls waiting for the stored result of the job they repeat \
             (bounded by --max-relays)",
            metrics.relays_waiting.clone(),
        );
        metrics
    }

    /// A request whose job is on the queue: queued now, or queued before (`duplicate`).
    pub fn count_queued(&self, kind: RequestKind, duplicate: bool) {
        let outcome = if duplicate {
            self.duplicates.inc();
            RequestOutcome::Duplicate
        } else {
            self.accepted.inc();
            RequestOutcome::Accepted
        };
        self.requests
            .get_or_create(&RequestLabels {
                kind,
                outcome,
                code: None,
            })
            .inc();
    }

    pub fn count_rejection(&self, kind: RequestKind, code: ErrorCode) {
        let code = CodeLabel(code);
        self.rejected.get_or_create(&CodeLabels { code }).inc();
        self.requests
            .get_or_create(&RequestLabels {
                kind,
                outcome: RequestOutcome::Rejected,
                code: Some(code),
            })
            .inc();
    }
}

/// A semaphore permit counted in a gauge while it is held.
pub struct GaugedPermit {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl GaugedPermit {
    pub fn new(permit: OwnedSemaphorePermit, gauge: &Gauge) -> GaugedPermit {
        gauge.inc();
        GaugedPermit {
            _permit: permit,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for GaugedPermit {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
