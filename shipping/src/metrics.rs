//! What shipping reports about itself: lines shipped and dropped (by reason), bulk requests'
//! latency and failures, and how full the buffer is. `METRICS.md` lists them.

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::Index;

/// A bulk request is one round trip and an index of up to a batch of lines: a few ms on a
/// local server, up to the request timeout (10 s) on a slow one.
const BULK_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5, 10.0,
];

/// Why a line was dropped unsent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The buffer was full (the server down or slow): the oldest line made room for a new one.
    BufferFull,
    /// The server refused it for good (a mapping conflict, a refused request).
    Rejected,
    /// Larger than the cap on a line's size.
    TooLarge,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [
        DropReason::BufferFull,
        DropReason::Rejected,
        DropReason::TooLarge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::BufferFull => "buffer_full",
            DropReason::Rejected => "rejected",
            DropReason::TooLarge => "too_large",
        }
    }
}

/// Why a bulk request did not ship its whole batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BulkFailure {
    /// No answer: connection refused or reset, timed out.
    Unreachable,
    /// 429 or 5xx for the request or some of its lines: retried.
    Retried,
    /// Any other error status for the whole request: its lines are dropped (`rejected`).
    Refused,
}

impl BulkFailure {
    pub const ALL: [BulkFailure; 3] = [
        BulkFailure::Unreachable,
        BulkFailure::Retried,
        BulkFailure::Refused,
    ];

    fn as_str(self) -> &'static str {
        match self {
            BulkFailure::Unreachable => "unreachable",
            BulkFailure::Retried => "retried",
            BulkFailure::Refused => "refused",
        }
    }
}

macro_rules! label_text {
    ($type:ty) => {
        impl EncodeLabelValue for $type {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    };
}
label_text!(DropReason);
label_text!(BulkFailure);
label_text!(Index);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IndexLabels {
    index: Index,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    reason: DropReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FailureLabels {
    failure: BulkFailure,
}

/// Shipping's metrics; clones share the same series.
#[derive(Clone)]
pub struct ShippingMetrics {
    shipped: Family<IndexLabels, Counter>,
    dropped: Family<ReasonLabels, Counter>,
    bulk_failures: Family<FailureLabels, Counter>,
    pub(crate) bulk_seconds: Histogram,
    pub(crate) buffered: Gauge,
    pub(crate) capacity: Gauge,
}

impl Default for ShippingMetrics {
    fn default() -> Self {
        let metrics = ShippingMetrics {
            shipped: Family::default(),
            dropped: Family::default(),
            bulk_failures: Family::default(),
            bulk_seconds: Histogram::new(BULK_BUCKETS),
            buffered: Gauge::default(),
            capacity: Gauge::default(),
        };
        // Every series exists at 0 from the start, so the first drop shows in rate().
        for index in Index::ALL {
            let _ = metrics.shipped.get_or_create(&IndexLabels { index });
        }
        for reason in DropReason::ALL {
            let _ = metrics.dropped.get_or_create(&ReasonLabels { reason });
        }
        for failure in BulkFailure::ALL {
            let _ = metrics
                .bulk_failures
                .get_or_create(&FailureLabels { failure });
        }
        metrics
    }
}

impl ShippingMetrics {
    /// Registers every series under `fleet_log_shipping_`.
    pub fn register(&self, registry: &mut Registry) {
        let fleet = registry.sub_registry_with_prefix("fleet_log_shipping");
        fleet.register(
            "lines_shipped",
            "Log lines and audit events the server stored, by index (logs, audit)",
            self.shipped.clone(),
        );
        fleet.register(
            "lines_dropped",
            "Lines dropped unsent, by reason: buffer_full (server down or slow, oldest dropped), \
             rejected (refused by the server), too_large (over the line size cap)",
            self.dropped.clone(),
        );
        fleet.register(
            "bulk_failures",
            "Bulk requests that did not ship their whole batch: unreachable, retried (429, 5xx), \
             refused (any other error status; its lines dropped as rejected)",
            self.bulk_failures.clone(),
        );
        fleet.register_with_unit(
            "bulk_request",
            "Time of one _bulk request, answered or failed",
            Unit::Seconds,
            self.bulk_seconds.clone(),
        );
        fleet.register(
            "buffered_lines",
            "Lines waiting in the buffer to be sent",
            self.buffered.clone(),
        );
        fleet.register(
            "buffer_capacity_lines",
            "Most lines the buffer holds; past it the oldest are dropped",
            self.capacity.clone(),
        );
    }

    pub(crate) fn shipped(&self, index: Index, lines: u64) {
        self.shipped
            .get_or_create(&IndexLabels { index })
            .inc_by(lines);
    }

    pub(crate) fn dropped(&self, reason: DropReason, lines: u64) {
        self.dropped
            .get_or_create(&ReasonLabels { reason })
            .inc_by(lines);
    }

    pub(crate) fn bulk_failed(&self, failure: BulkFailure) {
        self.bulk_failures
            .get_or_create(&FailureLabels { failure })
            .inc();
    }

    /// Lines dropped so far for `reason`.
    pub fn dropped_total(&self, reason: DropReason) -> u64 {
        self.dropped.get_or_create(&ReasonLabels { reason }).get()
    }

    /// Lines shipped so far to `index`.
    pub fn shipped_total(&self, index: Index) -> u64 {
        self.shipped.get_or_create(&IndexLabels { index }).get()
    }
}
