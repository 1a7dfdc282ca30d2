use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: String,
}

/// The dispatcher's counters: every admission outcome is counted.
#[derive(Clone)]
pub struct DispatcherMetrics {
    pub accepted: Counter,
    pub duplicates: Counter,
    pub relayed: Counter,
    pub requests_dropped: Counter,
    /// Answers not sent because their reply subject is not an inbox.
    pub unanswerable: Counter,
    pub rejected: Family<CodeLabel, Counter>,
    pub publish_seconds: Histogram,
}

impl DispatcherMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = DispatcherMetrics {
            accepted: Counter::default(),
            duplicates: Counter::default(),
            relayed: Counter::default(),
            requests_dropped: Counter::default(),
            unanswerable: Counter::default(),
            rejected: Family::default(),
            publish_seconds: Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0,
            ]),
        };
        let fleet = registry.sub_registry_with_prefix("fleet_dispatcher");
        fleet.register(
            "jobs_accepted",
            "Jobs queued on JetStream",
            metrics.accepted.clone(),
        );
        fleet.register(
            "jobs_duplicate",
            "Jobs whose id was already queued within the duplicate window",
            metrics.duplicates.clone(),
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
        fleet.register(
            "jobs_rejected",
            "Jobs refused, by error code",
            metrics.rejected.clone(),
        );
        fleet.register(
            "publish_seconds",
            "Time from publish to JetStream ack",
            metrics.publish_seconds.clone(),
        );
        metrics
    }

    pub fn count_rejection(&self, code: fleet_schemas::ErrorCode) {
        self.rejected
            .get_or_create(&CodeLabel {
                code: code.as_str().to_owned(),
            })
            .inc();
    }
}
