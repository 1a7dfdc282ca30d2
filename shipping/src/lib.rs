//! Ships a process's log lines and audit events to Elasticsearch (8.x), without ever making the
//! code that logs wait on the network.
//!
//! - [`ShippingLayer`], a `tracing_subscriber` layer, turns each event into one JSON document:
//!   `@timestamp`, `service`, `level`, `target`, `message`, the job's ids (`job_id`, `tenant`,
//!   `model`, `key_id`, `trace_id`: the event's own, else its spans') on top, the event's other
//!   fields under `fields` and its spans' under `span`. An audit event (target
//!   [`AUDIT_TARGET`]) keeps its fields on top and goes to the audit index.
//! - The document goes into a bounded buffer (a capacity in lines, a cap on a line's size):
//!   when full, the oldest line is dropped and counted, so memory stays bounded whatever the
//!   server does.
//! - A background task puts the index templates (`ops/observability/elasticsearch/`), then
//!   sends batches with `_bulk` to the daily indices `<prefix>-logs-YYYY.MM.DD` and
//!   `<prefix>-audit-YYYY.MM.DD`, when a batch is full or the flush interval has passed,
//!   retrying with jittered backoff while the server is down or slow.
//! - Every 10 s in which lines were dropped, a summary line is logged with target
//!   `fleet_shipping` (on stdout with the other logs, never shipped itself).
//! - [`Shipper::shutdown`] sends what is buffered within a deadline, for short-lived commands.

mod buffer;
mod layer;
mod metrics;
mod sender;

use std::{sync::Arc, time::Duration};

use elasticsearch::{
    Elasticsearch,
    auth::Credentials,
    http::{
        Url,
        transport::{SingleNodeConnectionPool, TransportBuilder},
    },
};
use tokio::{sync::watch, task::JoinHandle};

pub use buffer::{Buffer, Day, Line};
pub use layer::ShippingLayer;
pub use metrics::{BulkFailure, DropReason, ShippingMetrics};
pub use sender::index_template;

/// The target of audit events: `tracing::info!(target: fleet_shipping::AUDIT_TARGET, ...)`.
pub const AUDIT_TARGET: &str = "fleet::audit";

/// How often a summary of dropped lines is logged, when there were any.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);
/// How long one request may take before it counts as failed (and is retried).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Which index a line goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Index {
    Logs = 0,
    Audit = 1,
}

impl Index {
    pub const ALL: [Index; 2] = [Index::Logs, Index::Audit];

    /// The index's name after the prefix: `<prefix>-logs-…`, `<prefix>-audit-…`.
    pub fn as_str(self) -> &'static str {
        match self {
            Index::Logs => "logs",
            Index::Audit => "audit",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShippingError {
    #[error("the Elasticsearch URL {0:?} is not a valid http(s) URL")]
    Url(String),
    #[error(
        "the Elasticsearch URL must not hold credentials (every user of the host can read a \
         command line): give the user name and a password file or variable instead"
    )]
    CredentialsInUrl,
    #[error(
        "index prefix {0:?}: lowercase letters, digits, '-' and '_' only, starting with a letter"
    )]
    IndexPrefix(String),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("cannot build the Elasticsearch client: {0}")]
    Client(#[from] elasticsearch::http::transport::BuildError),
}

/// A user name and password for basic authentication; the password is never shown.
#[derive(Clone)]
pub struct BasicAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BasicAuth({}, <redacted>)", self.username)
    }
}

/// Where and how to ship.
#[derive(Debug, Clone)]
pub struct ShippingConfig {
    /// `http(s)://host:port` of Elasticsearch, without credentials.
    pub url: String,
    pub auth: Option<BasicAuth>,
    /// Indices are `<prefix>-logs-YYYY.MM.DD` and `<prefix>-audit-YYYY.MM.DD`.
    pub index_prefix: String,
    /// Most lines buffered; past it the oldest are dropped.
    pub capacity: usize,
    /// Most lines in one bulk request; a full batch is sent at once.
    pub batch_lines: usize,
    /// A partial batch is sent after this long.
    pub flush_interval: Duration,
    /// A line (one JSON document) larger than this is dropped.
    pub max_line_bytes: usize,
    /// The process's name, in every document (`service`): dispatcher, worker, fleet.
    pub service: String,
}

impl ShippingConfig {
    /// The URL fit to be logged: see [`shown_url`].
    pub fn shown_url(&self) -> String {
        shown_url(&self.url)
    }

    /// Refuses what [`start`] would refuse: a bad URL or one with credentials, a bad prefix, a
    /// zero size.
    pub fn validate(&self) -> Result<(), ShippingError> {
        self.check().map(drop)
    }

    fn check(&self) -> Result<Url, ShippingError> {
        let url = Url::parse(&self.url).map_err(|_| ShippingError::Url(self.shown_url()))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(ShippingError::Url(self.shown_url()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(ShippingError::CredentialsInUrl);
        }
        let prefix = &self.index_prefix;
        let valid = prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if !valid {
            return Err(ShippingError::IndexPrefix(prefix.clone()));
        }
        for (value, what) in [
            (self.capacity, "the buffer capacity"),
            (self.batch_lines, "the batch size"),
            (self.max_line_bytes, "the line size cap"),
        ] {
            if value == 0 {
                return Err(ShippingError::Zero(what));
            }
        }
        Ok(url)
    }
}

/// A URL's scheme, host and port only (no credentials, path or query), fit to be logged.
pub fn shown_url(url: &str) -> String {
    Url::parse(url)
        .map(|url| url.origin().ascii_serialization())
        .unwrap_or_else(|_| "<unparsable URL>".to_owned())
}

/// Starts shipping: returns the layer to add to the subscriber and the handle that stops it.
/// Must be called within a tokio runtime (the sender is a task).
pub fn start(
    config: &ShippingConfig,
    metrics: ShippingMetrics,
) -> Result<(ShippingLayer, Shipper), ShippingError> {
    let url = config.check()?;
    let mut transport = TransportBuilder::new(SingleNodeConnectionPool::new(url))
        .timeout(REQUEST_TIMEOUT)
        // Bodies are small NDJSON batches; compressing them costs CPU on the job path's cores.
        .request_body_compression(false);
    if let Some(auth) = &config.auth {
        transport = transport.auth(Credentials::Basic(
            auth.username.clone(),
            auth.password.clone(),
        ));
    }
    let client = Elasticsearch::new(transport.build()?);
    let buffer = Arc::new(Buffer::new(
        config.capacity,
        config.max_line_bytes,
        config.batch_lines,
        metrics.clone(),
    ));
    let (stop, stopped) = watch::channel(false);
    let sender = sender::Sender {
        client,
        buffer: buffer.clone(),
        metrics: metrics.clone(),
        index_prefix: config.index_prefix.clone(),
        batch_lines: config.batch_lines,
        flush_interval: config.flush_interval,
        shown_url: config.shown_url(),
    };
    let sending = tokio::spawn(sender.run(stopped));
    let summary = tokio::spawn(summarise_drops(metrics));
    let layer = ShippingLayer::new(buffer.clone(), &config.service);
    Ok((
        layer,
        Shipper {
            buffer,
            stop,
            sending,
            summary,
        },
    ))
}

/// Stops shipping: see [`Shipper::shutdown`].
pub struct Shipper {
    buffer: Arc<Buffer>,
    stop: watch::Sender<bool>,
    sending: JoinHandle<()>,
    summary: JoinHandle<()>,
}

impl Shipper {
    /// Sends what is buffered and stops, waiting at most `deadline`; lines still unsent then
    /// are reported on the process's own log. Lines logged after this are not shipped.
    pub async fn shutdown(self, deadline: Duration) {
        let _ = self.stop.send(true);
        self.summary.abort();
        let mut sending = self.sending;
        if tokio::time::timeout(deadline, &mut sending).await.is_err() {
            sending.abort();
            tracing::warn!(target: "fleet_shipping", unsent = self.buffer.len(),
                "stopped before Elasticsearch took every buffered log line");
        }
    }
}

/// Logs how many lines were dropped, by reason, every [`SUMMARY_INTERVAL`] in which some were.
async fn summarise_drops(metrics: ShippingMetrics) {
    let mut last = DropReason::ALL.map(|reason| metrics.dropped_total(reason));
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = DropReason::ALL.map(|reason| metrics.dropped_total(reason));
        if now != last {
            let [buffer_full, rejected, too_large] = [0, 1, 2].map(|i| now[i] - last[i]);
            tracing::warn!(target: "fleet_shipping", buffer_full, rejected, too_large,
                interval = ?SUMMARY_INTERVAL,
                "log lines dropped unshipped (buffer_full: the oldest, while Elasticsearch was \
                 down or slow)");
            last = now;
        }
    }
}
