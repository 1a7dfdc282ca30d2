//! The three streams every Fleet process relies on, and the check that the server really
//! holds them as defined. Old servers (Debian's nats-server 2.9) silently drop settings they do
//! not know, so "create succeeded" proves nothing: the config the server returns is compared,
//! field by field, with the one asked for.

use std::time::Duration;

use async_nats::jetstream::{
    self, Context,
    context::{
        CreateStreamError, CreateStreamErrorKind, GetStreamError, GetStreamErrorKind, RequestError,
        RequestErrorKind,
    },
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use fleet_schemas::subject;

pub mod cache;
pub mod transient;

/// Sizes and windows of the streams. Every process of one fleet must agree on them.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamLimits {
    /// Most jobs queued at once; past it, publishes fail and the dispatcher answers `overloaded`.
    pub jobs_max_msgs: i64,
    /// Most bytes queued at once.
    pub jobs_max_bytes: i64,
    /// A job id seen again within this window is stored once.
    pub duplicate_window: Duration,
    /// How long results stay readable on `FLEET_RESULTS`.
    pub results_max_age: Duration,
    /// How long dead letters stay on `FLEET_DLQ`.
    pub dlq_max_age: Duration,
    /// Copies of each stream kept by a JetStream cluster: 1 on a single server, 3 on a cluster
    /// (what survives one lost node; JetStream's own replication, Raft per stream).
    pub replicas: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            jobs_max_msgs: 1_000_000,
            jobs_max_bytes: 4 << 30,
            duplicate_window: Duration::from_secs(120),
            results_max_age: Duration::from_secs(24 * 3600),
            dlq_max_age: Duration::from_secs(7 * 24 * 3600),
            replicas: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read stream {stream}: {source}")]
    Get {
        stream: String,
        source: GetStreamError,
    },
    #[error("cannot create stream {stream}: {source}")]
    Create {
        stream: String,
        source: CreateStreamError,
    },
    #[error(
        "stream {stream} exists but differs from Fleet's definition in {}; \
         fix or delete the stream, or align the limits of every Fleet process",
        describe(differences)
    )]
    Mismatch {
        stream: String,
        differences: Vec<Difference>,
    },
    #[error(
        "the server dropped settings of stream {stream} it was asked to create: {}; \
         it is probably older than Fleet needs",
        describe(differences)
    )]
    Dropped {
        stream: String,
        differences: Vec<Difference>,
    },
    #[error("stream {stream} does not exist yet")]
    Missing { stream: String },
    #[error(
        "JetStream is not enabled on this NATS server (or not for this connection's account): \
         start nats-server with -js (or `jetstream {{}}` in its config)"
    )]
    JetStreamDisabled,
}

impl TopologyError {
    /// True when the same request may well succeed later without anyone changing anything: a
    /// timeout, a lost connection, or a cluster still electing the leader it needs (after its
    /// nodes restart, or while it has no quorum). Not a server without JetStream, nor streams
    /// that differ from Fleet's.
    pub fn is_transient(&self) -> bool {
        match self {
            // A request nobody answered is TopologyError::JetStreamDisabled, not this.
            TopologyError::Get { source, .. } => match source.kind() {
                GetStreamErrorKind::Request => true,
                GetStreamErrorKind::JetStream(error) => transient::jetstream(&error),
                _ => false,
            },
            TopologyError::Create { source, .. } => match source.kind() {
                CreateStreamErrorKind::TimedOut => true,
                CreateStreamErrorKind::JetStream(error) => transient::jetstream(&error),
                _ => false,
            },
            _ => false,
        }
    }
}

/// One setting that is not what Fleet defined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub field: &'static str,
    pub wanted: String,
    pub found: String,
}

/// Renders differences for an error message: `field (wanted X, found Y), ...`.
pub fn describe(differences: &[Difference]) -> String {
    differences
        .iter()
        .map(|d| format!("{} (wanted {}, found {})", d.field, d.wanted, d.found))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Compares, setting by setting, what was asked of the server with what it holds.
#[derive(Debug, Default)]
pub struct Comparison {
    differences: Vec<Difference>,
}

impl Comparison {
    pub fn field<T: std::fmt::Debug + PartialEq>(
        mut self,
        field: &'static str,
        wanted: &T,
        found: &T,
    ) -> Self {
        if wanted != found {
            self.differences.push(Difference {
                field,
                wanted: format!("{wanted:?}"),
                found: format!("{found:?}"),
            });
        }
        self
    }

    pub fn finish(self) -> Vec<Difference> {
        self.differences
    }
}

/// How JetStream spells "no limit"; the server stores it so, whatever zero the client sent.
const UNLIMITED: i64 = -1;

pub fn jobs_stream(limits: &StreamLimits) -> stream::Config {
    stream::Config {
        name: subject::JOBS_STREAM.into(),
        subjects: vec![subject::JOBS_WILDCARD.into()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::File,
        discard: DiscardPolicy::New,
        max_messages: limits.jobs_max_msgs,
        max_bytes: limits.jobs_max_bytes,
        duplicate_window: limits.duplicate_window,
        num_replicas: limits.replicas,
        ..Default::default()
    }
}

pub fn results_stream(limits: &StreamLimits) -> stream::Config {
    stream::Config {
        name: subject::RESULTS_STREAM.into(),
        subjects: vec![subject::RESULTS_WILDCARD.into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: limits.results_max_age,
        max_messages: UNLIMITED,
        max_bytes: UNLIMITED,
        duplicate_window: limits.duplicate_window,
        // One result per job for good: a redelivery that comes after the duplicate window
        // (long ack waits and backoffs) replaces the earlier copy instead of adding one.
        max_messages_per_subject: 1,
        // Results are read by subject (`fleet.results.<tenant>.<job_id>`), one message each.
        allow_direct: true,
        num_replicas: limits.replicas,
        ..Default::default()
    }
}

pub fn dlq_stream(limits: &StreamLimits) -> stream::Config {
    stream::Config {
        name: subject::DLQ_STREAM.into(),
        subjects: vec![subject::DLQ_WILDCARD.into()],
        retention: RetentionPolicy::Limits,
        storage: StorageType::File,
        max_age: limits.dlq_max_age,
        max_messages: UNLIMITED,
        max_bytes: UNLIMITED,
        duplicate_window: limits.duplicate_window,
        num_replicas: limits.replicas,
        ..Default::default()
    }
}

/// The server reports "no limit" as -1 whether it was asked for with 0 or -1.
fn limit(value: i64) -> i64 {
    if value <= 0 { UNLIMITED } else { value }
}

/// The settings Fleet defines that differ between `wanted` and `found`.
pub fn differences(wanted: &stream::Config, found: &stream::Config) -> Vec<Difference> {
    Comparison::default()
        .field("subjects", &wanted.subjects, &found.subjects)
        .field("retention", &wanted.retention, &found.retention)
        .field("storage", &wanted.storage, &found.storage)
        .field("discard", &wanted.discard, &found.discard)
        .field(
            "max_messages",
            &limit(wanted.max_messages),
            &limit(found.max_messages),
        )
        .field(
            "max_bytes",
            &limit(wanted.max_bytes),
            &limit(found.max_bytes),
        )
        .field("max_age", &wanted.max_age, &found.max_age)
        .field(
            "max_messages_per_subject",
            &limit(wanted.max_messages_per_subject),
            &limit(found.max_messages_per_subject),
        )
        .field(
            "max_message_size",
            &limit(wanted.max_message_size.into()),
            &limit(found.max_message_size.into()),
        )
        // Settings Fleet leaves at their defaults, any of which breaks it when set: acks
        // (work-queue removal and publish acks), deletes (exhausted jobs), purges (load tests),
        // and a stream fed from elsewhere.
        .field("no_ack", &wanted.no_ack, &found.no_ack)
        .field("sealed", &wanted.sealed, &found.sealed)
        .field("deny_delete", &wanted.deny_delete, &found.deny_delete)
        .field("deny_purge", &wanted.deny_purge, &found.deny_purge)
        .field("mirror", &wanted.mirror, &found.mirror)
        .field("sources", &wanted.sources, &found.sources)
        .field(
            "duplicate_window",
            &wanted.duplicate_window,
            &found.duplicate_window,
        )
        .field("allow_direct", &wanted.allow_direct, &found.allow_direct)
        // A single server reports 1 for a stream asked for with 0 (its default).
        .field(
            "num_replicas",
            &wanted.num_replicas.max(1),
            &found.num_replicas.max(1),
        )
        .finish()
}

/// Creates the stream if it is missing, then insists the server holds exactly Fleet's settings.
pub async fn ensure_stream(
    js: &Context,
    wanted: stream::Config,
) -> Result<stream::Stream, TopologyError> {
    let name = wanted.name.clone();
    match js.get_stream(&name).await {
        Ok(mut existing) => {
            let found = existing
                .info()
                .await
                .map_err(|e| TopologyError::Get {
                    stream: name.clone(),
                    source: GetStreamError::with_source(GetStreamErrorKind::Request, e),
                })?
                .config
                .clone();
            let differences = differences(&wanted, &found);
            if !differences.is_empty() {
                return Err(TopologyError::Mismatch {
                    stream: name,
                    differences,
                });
            }
            Ok(existing)
        }
        Err(err) if is_not_found(&err) => {
            let created =
                js.create_stream(wanted.clone())
                    .await
                    .map_err(|source| TopologyError::Create {
                        stream: name.clone(),
                        source,
                    })?;
            let differences = differences(&wanted, &created.cached_info().config);
            if !differences.is_empty() {
                return Err(TopologyError::Dropped {
                    stream: name,
                    differences,
                });
            }
            tracing::info!(stream = %name, "created stream");
            Ok(created)
        }
        Err(source) => Err(get_error(name, source)),
    }
}

/// Waits until a stream exists, for processes (workers) that use streams a dispatcher defines.
pub async fn existing_stream(js: &Context, name: &str) -> Result<stream::Stream, TopologyError> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(stream),
        Err(err) if is_not_found(&err) => Err(TopologyError::Missing {
            stream: name.to_owned(),
        }),
        Err(source) => Err(get_error(name.to_owned(), source)),
    }
}

/// A JetStream API request nobody answers means the server runs without JetStream: async-nats
/// words that "requested JetStream resource does not exist", which sends users looking for a
/// stream instead of the server's flags.
fn get_error(stream: String, source: GetStreamError) -> TopologyError {
    let unanswered = matches!(source.kind(), GetStreamErrorKind::Request)
        && std::error::Error::source(&source)
            .and_then(|inner| inner.downcast_ref::<RequestError>())
            .is_some_and(|inner| inner.kind() == RequestErrorKind::NoResponders);
    if unanswered {
        TopologyError::JetStreamDisabled
    } else {
        TopologyError::Get { stream, source }
    }
}

fn is_not_found(err: &GetStreamError) -> bool {
    matches!(
        err.kind(),
        GetStreamErrorKind::JetStream(js) if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// The three streams, created or verified.
pub struct Streams {
    pub jobs: stream::Stream,
    pub results: stream::Stream,
    pub dlq: stream::Stream,
}

pub async fn ensure_all(js: &Context, limits: &StreamLimits) -> Result<Streams, TopologyError> {
    Ok(Streams {
        jobs: ensure_stream(js, jobs_stream(limits)).await?,
        results: ensure_stream(js, results_stream(limits)).await?,
        dlq: ensure_stream(js, dlq_stream(limits)).await?,
    })
}

/// [`ensure_all`], asked again every `retry` while the server answers that it cannot tell yet
/// ([`TopologyError::is_transient`]): a dispatcher started while its cluster restarts, or has no
/// quorum, waits for it instead of exiting. Any other answer ends the wait.
pub async fn ensure_all_when_available(
    js: &Context,
    limits: &StreamLimits,
    retry: Duration,
) -> Result<Streams, TopologyError> {
    let mut unavailable = transient::Unavailable::default();
    loop {
        match ensure_all(js, limits).await {
            Err(error) if error.is_transient() => unavailable.note(&error),
            ensured => return ensured,
        }
        tokio::time::sleep(retry).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create_answered(status: u16, code: u64) -> TopologyError {
        let error: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": status,
            "err_code": code,
            "description": "as the server words it",
        }))
        .expect("a JetStream API error");
        TopologyError::Create {
            stream: "FLEET_JOBS".to_owned(),
            source: CreateStreamError::new(CreateStreamErrorKind::JetStream(error)),
        }
    }

    #[test]
    fn a_stream_the_cluster_cannot_place_or_make_yet_is_asked_for_again() {
        // Temporarily unavailable, not leader, incomplete, no suitable peers (too few nodes up
        // for the replicas asked).
        for code in [10008, 10009, 10004, 10005] {
            assert!(create_answered(503, code).is_transient(), "{code}");
        }
        let timed_out = TopologyError::Create {
            stream: "FLEET_JOBS".to_owned(),
            source: CreateStreamError::new(CreateStreamErrorKind::TimedOut),
        };
        assert!(timed_out.is_transient());
    }

    #[test]
    fn a_refused_stream_or_a_server_without_jetstream_ends_the_wait() {
        // Stream name in use with another configuration; replicas over the cluster's size.
        for code in [10058, 10074] {
            assert!(!create_answered(400, code).is_transient(), "{code}");
        }
        assert!(!TopologyError::JetStreamDisabled.is_transient());
        let mismatch = TopologyError::Mismatch {
            stream: "FLEET_JOBS".to_owned(),
            differences: Vec::new(),
        };
        assert!(!mismatch.is_transient());
    }

    #[test]
    fn a_dropped_setting_is_reported_by_name() {
        let limits = StreamLimits::default();
        let wanted = jobs_stream(&limits);
        assert!(differences(&wanted, &wanted).is_empty());
        let mut found = wanted.clone();
        found.discard = DiscardPolicy::Old;
        found.duplicate_window = Duration::ZERO;
        found.num_replicas = 3;
        let fields: Vec<_> = differences(&wanted, &found)
            .into_iter()
            .map(|d| d.field)
            .collect();
        assert_eq!(fields, ["discard", "duplicate_window", "num_replicas"]);
    }

    #[test]
    fn unlimited_is_unlimited_however_spelled() {
        let mut wanted = jobs_stream(&StreamLimits::default());
        wanted.max_messages = 0;
        wanted.max_bytes = 0;
        let mut found = wanted.clone();
        found.max_messages = UNLIMITED;
        found.max_bytes = UNLIMITED;
        found.max_message_size = -1;
        assert!(differences(&wanted, &found).is_empty());
    }

    #[test]
    fn settings_left_at_defaults_that_would_break_fleet_are_reported() {
        let wanted = jobs_stream(&StreamLimits::default());
        let mut found = wanted.clone();
        found.no_ack = true;
        found.deny_delete = true;
        found.max_message_size = 1024;
        let fields: Vec<_> = differences(&wanted, &found)
            .into_iter()
            .map(|d| d.field)
            .collect();
        assert_eq!(fields, ["max_message_size", "no_ack", "deny_delete"]);
    }
}
