//! The one durable pull consumer that all workers of a model share. Like the streams, it is
//! created when absent and then compared with what the server actually holds, because an old
//! server drops settings it does not know and a consumer made by another version may differ.

use std::time::Duration;

use async_nats::jetstream::{
    Context,
    consumer::{self as consumer, AckPolicy, DeliverPolicy, PullConsumer, pull::Config},
    context::RequestError,
    stream::{ConsumerError, ConsumerErrorKind},
};
use fleet_schemas::subject;
use fleet_streams::{Comparison, Difference, TopologyError, describe, existing_stream};

use fleet_streams::transient::{self, Unavailable};

/// The consumer settings Fleet defines and insists on.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSettings {
    pub durable_name: String,
    pub filter_subject: String,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub backoff: Vec<Duration>,
    pub max_ack_pending: i64,
}

impl ConsumerSettings {
    pub fn pull_config(&self) -> Config {
        Config {
            durable_name: Some(self.durable_name.clone()),
            filter_subject: self.filter_subject.clone(),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_deliver: self.max_deliver,
            backoff: self.backoff.clone(),
            max_ack_pending: self.max_ack_pending,
            ..Default::default()
        }
    }

    /// Settings of `found` that are not what these settings ask for.
    pub fn differences(&self, found: &consumer::Config) -> Vec<Difference> {
        let wanted = self.pull_config();
        Comparison::default()
            .field(
                "filter_subject",
                &wanted.filter_subject,
                &found.filter_subject,
            )
            .field("ack_policy", &wanted.ack_policy, &found.ack_policy)
            .field("ack_wait", &wanted.ack_wait, &found.ack_wait)
            .field("max_deliver", &wanted.max_deliver, &found.max_deliver)
            .field("backoff", &wanted.backoff, &found.backoff)
            .field(
                "max_ack_pending",
                &wanted.max_ack_pending,
                &found.max_ack_pending,
            )
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerSetupError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("cannot create or read consumer {name}: {source}")]
    Bind { name: String, source: ConsumerError },
    #[error(
        "consumer {name} exists with other settings: {}; delete it (`nats consumer rm {} {name}`) \
         or start every worker of the model with the same settings",
        describe(differences),
        subject::JOBS_STREAM
    )]
    Mismatch {
        name: String,
        differences: Vec<Difference>,
    },
}

/// Waits, logging now and then, until the dispatcher has made Fleet's three streams and the
/// server can tell what they are (a cluster answers only once it has elected their leaders).
pub async fn wait_for_streams(js: &Context, retry: Duration) -> Result<(), TopologyError> {
    for name in [
        subject::JOBS_STREAM,
        subject::RESULTS_STREAM,
        subject::DLQ_STREAM,
    ] {
        let mut unavailable = Unavailable::default();
        loop {
            match existing_stream(js, name).await {
                Ok(_) => break,
                Err(TopologyError::Missing { .. }) => {
                    tracing::warn!(
                        stream = name,
                        "stream missing; waiting for the dispatcher to create it"
                    );
                }
                Err(error) if error.is_transient() => unavailable.note(&error),
                Err(other) => return Err(other),
            }
            tokio::time::sleep(retry).await;
        }
    }
    Ok(())
}

/// [`bind`], asked again every `retry` for as long as the server answers that it cannot tell
/// yet: after the nodes of a cluster restart, the consumer's own Raft group elects its leader
/// seconds after the streams', and until then the consumer cannot be read ("JetStream system
/// temporarily unavailable"). A worker that gave up then would leave the queue unserved.
pub async fn bind_when_available(
    js: &Context,
    settings: &ConsumerSettings,
    retry: Duration,
) -> Result<PullConsumer, ConsumerSetupError> {
    let mut unavailable = Unavailable::default();
    loop {
        match bind(js, settings).await {
            Err(error) if error.is_transient() => unavailable.note(&error),
            bound => return bound,
        }
        tokio::time::sleep(retry).await;
    }
}

impl ConsumerSetupError {
    /// True when the same request may well succeed later, without anyone changing anything.
    fn is_transient(&self) -> bool {
        match self {
            ConsumerSetupError::Topology(error) => error.is_transient(),
            ConsumerSetupError::Bind { source, .. } => match source.kind() {
                ConsumerErrorKind::TimedOut => true,
                ConsumerErrorKind::Request => std::error::Error::source(source)
                    .and_then(|inner| inner.downcast_ref::<RequestError>())
                    .is_none_or(transient::request),
                ConsumerErrorKind::JetStream(error) => transient::jetstream(&error),
                _ => false,
            },
            ConsumerSetupError::Mismatch { .. } => false,
        }
    }
}

/// Binds the model's shared durable consumer, creating it when absent, and checks that the
/// server holds the settings asked for.
pub async fn bind(
    js: &Context,
    settings: &ConsumerSettings,
) -> Result<PullConsumer, ConsumerSetupError> {
    let stream = existing_stream(js, subject::JOBS_STREAM).await?;
    let consumer: PullConsumer = stream
        .get_or_create_consumer(&settings.durable_name, settings.pull_config())
        .await
        .map_err(|source| ConsumerSetupError::Bind {
            name: settings.durable_name.clone(),
            source,
        })?;
    let differences = settings.differences(&consumer.cached_info().config);
    if !differences.is_empty() {
        return Err(ConsumerSetupError::Mismatch {
            name: settings.durable_name.clone(),
            differences,
        });
    }
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::{self, context::RequestErrorKind};

    use super::*;

    fn answered(status: u16, code: u64) -> ConsumerSetupError {
        let error: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": status,
            "err_code": code,
            "description": "as the server words it",
        }))
        .expect("a JetStream API error");
        ConsumerSetupError::Bind {
            name: "fleet-worker-m".to_owned(),
            source: ConsumerError::new(ConsumerErrorKind::JetStream(error)),
        }
    }

    fn requested(kind: RequestErrorKind) -> ConsumerSetupError {
        ConsumerSetupError::Bind {
            name: "fleet-worker-m".to_owned(),
            source: ConsumerError::with_source(ConsumerErrorKind::Request, RequestError::new(kind)),
        }
    }

    #[test]
    fn a_cluster_without_the_leader_it_needs_is_asked_again() {
        for code in [10008, 10009, 10004, 10005] {
            assert!(answered(503, code).is_transient(), "{code}");
        }
        let timed_out = ConsumerSetupError::Bind {
            name: "fleet-worker-m".to_owned(),
            source: ConsumerError::new(ConsumerErrorKind::TimedOut),
        };
        assert!(timed_out.is_transient());
        assert!(requested(RequestErrorKind::TimedOut).is_transient());
        assert!(requested(RequestErrorKind::Other).is_transient());
    }

    #[test]
    fn a_refusal_or_a_server_without_jetstream_stops_the_worker() {
        // Consumer create failed, stream not found, JetStream not enabled for the account.
        for code in [10012, 10059, 10039] {
            assert!(!answered(400, code).is_transient(), "{code}");
        }
        assert!(!requested(RequestErrorKind::NoResponders).is_transient());
        let mismatch = ConsumerSetupError::Mismatch {
            name: "fleet-worker-m".to_owned(),
            differences: Vec::new(),
        };
        assert!(!mismatch.is_transient());
    }
}
