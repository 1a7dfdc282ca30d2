use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use fleet_streams::StreamLimits;
use serde_json::json;

use crate::{validate::AdmissionLimits, workers::WorkerWatchSettings};

/// Fleet dispatcher: verifies signed jobs and queues them on JetStream.
///
/// Every flag can also be set by its environment variable or, by its long name, in the TOML
/// file given with --config (flags win over the environment, the environment over the file).
#[derive(Debug, Clone, Parser)]
#[command(name = "dispatcher", version)]
pub struct DispatcherConfig {
    /// TOML file of settings (keys are the long flag names).
    #[arg(long, env = "FLEET_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub nats: fleet_service::NatsArgs,
    #[command(flatten)]
    pub key_store: fleet_keys::KeyStoreArgs,
    #[command(flatten)]
    pub log: fleet_service::LogArgs,
    /// Models this fleet serves; jobs for others are answered `unknown_model`.
    #[arg(
        long,
        env = "FLEET_MODELS",
        value_delimiter = ',',
        default_value = fleet_schemas::DEFAULT_MODEL
    )]
    pub models: Vec<String>,
    /// Name reported in rejections and logs.
    #[arg(long, env = "FLEET_DISPATCHER_NAME", default_value = "dispatcher")]
    pub name: String,
    /// Largest envelope accepted, in bytes.
    #[arg(long, env = "FLEET_MAX_ENVELOPE_BYTES", default_value_t = 1 << 20)]
    pub max_envelope_bytes: usize,
    /// Most input texts per job.
    #[arg(long, env = "FLEET_MAX_INPUTS", default_value_t = 256)]
    pub max_inputs: usize,
    /// Largest input text, in bytes.
    #[arg(long, env = "FLEET_MAX_INPUT_BYTES", default_value_t = 32 << 10)]
    pub max_input_bytes: usize,
    /// Oldest job accepted, since its `created_at_ms` (replay bound).
    #[arg(long, env = "FLEET_MAX_JOB_AGE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_job_age: Duration,
    /// How far in the future a job's `created_at_ms` may be.
    #[arg(long, env = "FLEET_MAX_CLOCK_SKEW", default_value = "30s", value_parser = humantime::parse_duration)]
    pub max_clock_skew: Duration,
    /// Jobs being checked or awaiting their JetStream ack at once; past it, new jobs are
    /// answered `overloaded` at once.
    #[arg(long, env = "FLEET_MAX_PENDING_PUBLISHES", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_publishes: u32,
    /// How long a job may wait for its JetStream ack before `overloaded`.
    #[arg(long, env = "FLEET_PUBLISH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub publish_timeout: Duration,
    /// Requests NATS holds for this dispatcher, per subject, while it is busy; past it NATS drops
    /// them (each drop counted in `fleet_dispatcher_requests_dropped` and logged).
    #[arg(long, env = "FLEET_MAX_BUFFERED_REQUESTS", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_buffered_requests: u32,
    /// How long an `infer` repeating a queued job id waits for that job's stored result.
    #[arg(long, env = "FLEET_RELAY_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub relay_wait: Duration,
    /// Most repeated `infer` calls waiting for a stored result at once; past it they are
    /// answered `overloaded`.
    #[arg(long, env = "FLEET_MAX_RELAYS", default_value_t = 1024)]
    pub max_relays: usize,
    /// Most jobs held in FLEET_JOBS; past it new jobs are answered `overloaded`.
    #[arg(long, env = "FLEET_JOBS_MAX_MSGS", default_value_t = 1_000_000)]
    pub jobs_max_msgs: i64,
    /// Most bytes held in FLEET_JOBS.
    #[arg(long, env = "FLEET_JOBS_MAX_BYTES", default_value_t = 4 << 30)]
    pub jobs_max_bytes: i64,
    /// Window in which a repeated job id is stored once.
    #[arg(long, env = "FLEET_DUPLICATE_WINDOW", default_value = "2m", value_parser = humantime::parse_duration)]
    pub duplicate_window: Duration,
    /// How long results stay on FLEET_RESULTS.
    #[arg(long, env = "FLEET_RESULTS_MAX_AGE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub results_max_age: Duration,
    /// How long dead letters stay on FLEET_DLQ.
    #[arg(long, env = "FLEET_DLQ_MAX_AGE", default_value = "7days", value_parser = humantime::parse_duration)]
    pub dlq_max_age: Duration,
    /// Copies of each stream: 1 on a single nats-server, 3 on a JetStream cluster (survives the
    /// loss of one node). Checked like every other stream setting: every dispatcher must agree.
    #[arg(long, env = "FLEET_STREAM_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub replicas: u8,
    /// How often the dispatcher asks which workers are live (NATS service discovery,
    /// `$SRV.PING.fleet-worker`), to refuse an `infer` for a model nobody serves.
    #[arg(long, env = "FLEET_WORKER_CHECK_EVERY", default_value = "1s", value_parser = humantime::parse_duration)]
    pub worker_check_every: Duration,
    /// How long no worker of a model answers, while the dispatcher hears answers throughout,
    /// before an `infer` for it is refused `no_worker` (and a `submit` told so). Also the grace
    /// after the dispatcher starts or its asks go unanswered, during which nothing is refused.
    #[arg(long, env = "FLEET_NO_WORKER_AFTER", default_value = "5s", value_parser = humantime::parse_duration)]
    pub no_worker_after: Duration,
    /// Address of the HTTP endpoints: /metrics (Prometheus), /health, /ready, /info (port 0:
    /// any free port, logged at start).
    #[arg(
        long,
        env = "FLEET_DISPATCHER_METRICS_ADDR",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_addr: SocketAddr,
}

/// A duration as a person writes it in a flag (`1m 30s`), for `/info`.
fn shown(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "max_job_age + max_clock_skew ({}) must not exceed duplicate_window ({}): \
         a job replayed after the duplicate window would be queued again",
        humantime::format_duration(*.0),
        humantime::format_duration(*.1)
    )]
    ReplayWindow(Duration, Duration),
    #[error(
        "publish_timeout ({}) must not exceed duplicate_window ({}): a job published again \
         within the timeout must be stored once",
        humantime::format_duration(*.0),
        humantime::format_duration(*.1)
    )]
    PublishRetryWindow(Duration, Duration),
    #[error("at least one model must be served")]
    NoModels,
    #[error(
        "no_worker_after ({}) must exceed worker_check_every ({}): a model would be refused \
         between two answers of its live worker",
        humantime::format_duration(*.0),
        humantime::format_duration(*.1)
    )]
    NoWorkerWindow(Duration, Duration),
    #[error(transparent)]
    BadModelName(#[from] fleet_schemas::InvalidName),
}

impl DispatcherConfig {
    /// Checks settings that are only valid together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let replay = self.max_job_age.saturating_add(self.max_clock_skew);
        if replay > self.duplicate_window {
            return Err(ConfigError::ReplayWindow(replay, self.duplicate_window));
        }
        if self.publish_timeout > self.duplicate_window {
            return Err(ConfigError::PublishRetryWindow(
                self.publish_timeout,
                self.duplicate_window,
            ));
        }
        if self.models.is_empty() {
            return Err(ConfigError::NoModels);
        }
        if self.worker_check_every.is_zero() || self.no_worker_after <= self.worker_check_every {
            return Err(ConfigError::NoWorkerWindow(
                self.no_worker_after,
                self.worker_check_every,
            ));
        }
        for model in &self.models {
            fleet_schemas::validate_name("model", model)?;
        }
        Ok(())
    }

    pub fn admission_limits(&self) -> AdmissionLimits {
        AdmissionLimits {
            max_envelope_bytes: self.max_envelope_bytes,
            max_inputs: self.max_inputs,
            max_input_bytes: self.max_input_bytes,
            max_job_age: self.max_job_age,
            max_clock_skew: self.max_clock_skew,
        }
    }

    pub fn worker_watch(&self) -> WorkerWatchSettings {
        WorkerWatchSettings {
            check_every: self.worker_check_every,
            no_worker_after: self.no_worker_after,
        }
    }

    pub fn stream_limits(&self) -> StreamLimits {
        StreamLimits {
            jobs_max_msgs: self.jobs_max_msgs,
            jobs_max_bytes: self.jobs_max_bytes,
            duplicate_window: self.duplicate_window,
            results_max_age: self.results_max_age,
            dlq_max_age: self.dlq_max_age,
            replicas: usize::from(self.replicas),
        }
    }

    /// What `/info` shows: models, limits, stream settings and where NATS and the tenants are,
    /// without secrets. `tenants` names the key store as its logs do.
    pub fn info(&self, tenants: &str) -> fleet_service::Info {
        let details = json!({
            "models": self.models,
            "limits": {
                "max_envelope_bytes": self.max_envelope_bytes,
                "max_inputs": self.max_inputs,
                "max_input_bytes": self.max_input_bytes,
                "max_job_age": shown(self.max_job_age),
                "max_clock_skew": shown(self.max_clock_skew),
                "max_pending_publishes": self.max_pending_publishes,
                "publish_timeout": shown(self.publish_timeout),
                "max_buffered_requests": self.max_buffered_requests,
                "relay_wait": shown(self.relay_wait),
                "max_relays": self.max_relays,
                "worker_check_every": shown(self.worker_check_every),
                "no_worker_after": shown(self.no_worker_after),
            },
            "streams": {
                "jobs_max_msgs": self.jobs_max_msgs,
                "jobs_max_bytes": self.jobs_max_bytes,
                "duplicate_window": shown(self.duplicate_window),
                "results_max_age": shown(self.results_max_age),
                "dlq_max_age": shown(self.dlq_max_age),
                "replicas": self.replicas,
            },
            "nats": fleet_service::nats_summary(&self.nats.nats_url, &self.nats.auth),
            "tenants": tenants,
        });
        fleet_service::Info {
            role: "dispatcher",
            version: env!("CARGO_PKG_VERSION"),
            name: self.name.clone(),
            details,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> DispatcherConfig {
        DispatcherConfig::parse_from(std::iter::once("dispatcher").chain(args.iter().copied()))
    }

    #[test]
    fn replay_bound_must_fit_the_duplicate_window() {
        assert!(parse(&[]).validate().is_ok());
        let err = parse(&["--max-job-age", "200s"]).validate().unwrap_err();
        assert!(
            matches!(err, ConfigError::ReplayWindow(replay, window)
                if replay == Duration::from_secs(230) && window == Duration::from_secs(120)),
            "{err}"
        );
        // A sum past the largest duration must not wrap around into a small, accepted window.
        let huge = format!("{}s", u64::MAX);
        let err = parse(&["--max-job-age", &huge]).validate().unwrap_err();
        assert!(
            matches!(err, ConfigError::ReplayWindow(replay, _) if replay == Duration::MAX),
            "{err}"
        );
        assert!(matches!(
            parse(&["--publish-timeout", "3m"]).validate(),
            Err(ConfigError::PublishRetryWindow(..))
        ));
        assert!(matches!(
            parse(&["--models", "a.b"]).validate(),
            Err(ConfigError::BadModelName(_))
        ));
        // A live worker answers once per check: a window of one check would lose it between two.
        assert!(matches!(
            parse(&["--worker-check-every", "2s", "--no-worker-after", "2s"]).validate(),
            Err(ConfigError::NoWorkerWindow(..))
        ));
        assert!(matches!(
            parse(&["--worker-check-every", "0s"]).validate(),
            Err(ConfigError::NoWorkerWindow(..))
        ));
    }

    #[test]
    fn info_shows_settings_and_no_secret() {
        let config = parse(&[
            "--nats-url",
            "nats://fleet:pa55-SECRET@127.0.0.1:4222",
            "--models",
            "m1,m2",
            "--max-inputs",
            "7",
        ]);
        let info = config.info("file tenants.toml");
        assert_eq!(info.role, "dispatcher");
        assert_eq!(info.details["models"], json!(["m1", "m2"]));
        assert_eq!(info.details["limits"]["max_inputs"], 7);
        assert_eq!(info.details["limits"]["relay_wait"], "1m");
        assert_eq!(info.details["streams"]["dlq_max_age"], "7days");
        assert_eq!(info.details["nats"]["url"], "nats://127.0.0.1:4222");
        assert_eq!(info.details["tenants"], "file tenants.toml");
        let shown = info.details.to_string();
        assert!(!shown.contains("SECRET"), "{shown}");
    }
}
