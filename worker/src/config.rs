//! Every setting of a worker, from flags, environment variables or a TOML file (keys are the
//! long flag names), checked once into a [`WorkerConfig`].

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration};

use clap::Parser;
use fleet_model::Precision;
use fleet_schemas::{InvalidName, validate_name};
use fleet_service::{Info, NatsAuthArgs, nats_summary};
use serde_json::json;

use fleet_keys::KeyStoreArgs;

use fleet_streams::cache::CacheLimits;

use crate::{
    batcher::BatchLimits,
    cache::{CacheMode, CacheSettings},
    consumer::ConsumerSettings,
};

/// Fleet worker: pulls jobs of one model from JetStream, runs them in dynamic batches, stores and
/// sends the results.
#[derive(Debug, Clone, Parser)]
// A flag given twice takes the last value, so scripts can append overrides.
#[command(name = "worker", version, args_override_self = true)]
pub struct WorkerArgs {
    /// TOML file of settings; keys are the long flag names. Flags and environment win over it.
    #[arg(long, env = "FLEET_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(flatten)]
    pub key_store: KeyStoreArgs,

    /// NATS server to connect to.
    #[arg(long, env = "NATS_URL", default_value = fleet_schemas::DEFAULT_NATS_URL)]
    pub nats_url: String,

    /// Model served, as named in subjects (`fleet.jobs.<model>`).
    #[arg(long, env = "FLEET_MODEL", default_value = fleet_schemas::DEFAULT_MODEL)]
    pub model: String,

    /// Directory of the model's files (safetensors weights, tokenizer.json, config.json).
    #[arg(
        long,
        env = "FLEET_MODEL_DIR",
        default_value = "models/all-MiniLM-L6-v2"
    )]
    pub model_dir: PathBuf,

    /// Device the model runs on: `cpu` or `cuda:<ordinal>`.
    #[arg(long, env = "FLEET_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,

    /// Precision of the linear layers: `f32`; `bf16` (AVX512-BF16 CPUs: about 1.6x f32's
    /// throughput, vectors within 5e-3 of f32's); `bf16x3` (compensated bf16, f32's accuracy);
    /// `auto`, the fastest mode that keeps f32's accuracy on this machine. A mode the machine
    /// cannot run stops the worker at start.
    #[arg(long, env = "FLEET_PRECISION", default_value = "auto")]
    pub precision: Precision,

    /// Most inputs in one batch.
    #[arg(long, env = "FLEET_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,

    /// Most padded tokens in one batch (longest input times input count).
    #[arg(long, env = "FLEET_MAX_BATCH_TOKENS", default_value_t = 16384)]
    pub max_batch_tokens: usize,

    /// Longest an input waits for more work before a batch that is not full runs.
    #[arg(long, env = "FLEET_MAX_DELAY", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub max_delay: Duration,

    /// Most jobs this worker holds unacknowledged at once; it pulls no more until some finish.
    #[arg(long, env = "FLEET_MAX_IN_FLIGHT", default_value_t = 256)]
    pub max_in_flight: usize,

    /// Most jobs one pull request asks for.
    #[arg(long, env = "FLEET_FETCH_BATCH", default_value_t = 64)]
    pub fetch_batch: usize,

    /// Most jobs unacknowledged at once across all workers of the model (consumer setting).
    #[arg(long, env = "FLEET_MAX_ACK_PENDING", default_value_t = 1024)]
    pub max_ack_pending: i64,

    /// How long the server waits for an ack before redelivering a job (e.g. `3s`, `500ms`).
    /// Workers send in-progress acks three times per ack wait while they hold a job, so this
    /// bounds failover: a killed worker's jobs go to another worker within it.
    #[arg(long, env = "FLEET_ACK_WAIT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub ack_wait: Duration,

    /// Deliveries of a job before it goes to the dead-letter stream.
    #[arg(long, env = "FLEET_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,

    /// Redelivery delays, one per delivery (comma-separated, e.g. `30s,60s`). The server takes
    /// the first as the ack wait of the first delivery, so it must equal `--ack-wait`. Empty:
    /// every redelivery waits `--ack-wait`.
    #[arg(long, env = "FLEET_BACKOFF", value_delimiter = ',', value_parser = humantime::parse_duration)]
    pub backoff: Vec<Duration>,

    /// Delay before a job that failed transiently (results not stored, model error) is retried.
    #[arg(long, env = "FLEET_RETRY_DELAY", default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_delay: Duration,

    /// How often a worker looks for queued jobs the server will not deliver again (out of
    /// deliveries, or orphaned by a broker crash) and settles them; also once at start.
    #[arg(long, env = "FLEET_RECONCILE_EVERY", default_value = "30s", value_parser = humantime::parse_duration)]
    pub reconcile_every: Duration,

    /// How often the worker reads the queue's state from JetStream for its metrics (the
    /// consumer's lag, the streams' sizes): one request per stream and one for the consumer.
    #[arg(long, env = "FLEET_QUEUE_METRICS_EVERY", default_value = "5s", value_parser = humantime::parse_duration)]
    pub queue_metrics_every: Duration,

    /// Longest a batch may run on the model, before the per-token allowance below; past it the
    /// model is taken to be hung: the worker hands its jobs back and exits.
    #[arg(long, env = "FLEET_BATCH_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub batch_timeout: Duration,

    /// Extra time a batch may run per padded token.
    #[arg(long, env = "FLEET_BATCH_TIMEOUT_PER_TOKEN", default_value = "1ms", value_parser = humantime::parse_duration)]
    pub batch_timeout_per_token: Duration,

    /// Failed batches in a row after which the worker stops pulling and exits (a broken model
    /// or device), instead of draining the queue into the dead-letter stream.
    #[arg(long, env = "FLEET_MAX_MODEL_FAILURES", default_value_t = 5)]
    pub max_model_failures: u32,

    /// Largest job message accepted, in bytes; a larger one is dead-lettered.
    #[arg(long, env = "FLEET_MAX_JOB_BYTES", default_value_t = 8 << 20)]
    pub max_job_bytes: usize,

    /// Name in results and logs (default: hostname-pid).
    #[arg(long, env = "FLEET_WORKER_NAME")]
    pub worker_name: Option<String>,

    /// Address of the HTTP endpoints: /metrics (Prometheus), /health, /ready, /info (port 0:
    /// any free port, logged at start).
    #[arg(long, env = "FLEET_METRICS_ADDR", default_value = "127.0.0.1:9184")]
    pub metrics_addr: SocketAddr,

    /// On SIGTERM/SIGINT, how long to finish the jobs in flight before giving up on them.
    #[arg(long, env = "FLEET_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Result cache (JetStream bucket FLEET_CACHE): `off`; `tenant`: a text already embedded
    /// for the same tenant, model and options skips the model; `shared`: hits across tenants
    /// (one tenant's job then reveals, by its speed, what another embedded).
    #[arg(long, env = "FLEET_RESULT_CACHE", value_enum, default_value = "off")]
    pub result_cache: CacheMode,

    /// How long a cached vector is kept after it was computed. Every caching worker must use
    /// the same.
    #[arg(long, env = "FLEET_RESULT_CACHE_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub result_cache_ttl: Duration,

    /// Most bytes the result cache holds (1.5 KiB per vector of 384 dimensions); past it the
    /// oldest entries go. Every caching worker must use the same.
    #[arg(long, env = "FLEET_RESULT_CACHE_MAX_BYTES", default_value_t = 1 << 30)]
    pub result_cache_max_bytes: i64,
}

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {0:?} is neither `cpu` nor `cuda:<ordinal>`")]
pub struct BadDevice(String);

impl FromStr for DeviceSpec {
    type Err = BadDevice;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| BadDevice(s.to_owned())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Name(#[from] InvalidName),
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{0} must be longer than zero")]
    ZeroDuration(&'static str),
    #[error("{0} must be at most {1}")]
    TooLarge(&'static str, u32),
    #[error(
        "--backoff starts with {first:?} but --ack-wait is {ack_wait:?}; the server makes the first backoff the ack wait, so they must agree"
    )]
    BackoffAckWait { first: Duration, ack_wait: Duration },
    #[error(
        "--max-deliver ({max_deliver}) must be greater than the number of --backoff delays ({backoff})"
    )]
    BackoffTooLong { max_deliver: i64, backoff: usize },
}

/// When a worker stops trusting its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelGuard {
    pub batch_timeout: Duration,
    pub batch_timeout_per_token: Duration,
    pub max_model_failures: u32,
}

/// A worker's checked settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub key_store: KeyStoreArgs,
    pub nats_url: String,
    pub model: String,
    pub model_dir: PathBuf,
    pub device: DeviceSpec,
    pub precision: Precision,
    pub batch: BatchLimits,
    pub consumer: ConsumerSettings,
    pub max_in_flight: usize,
    pub fetch_batch: usize,
    pub retry_delay: Duration,
    pub reconcile_every: Duration,
    pub queue_metrics_every: Duration,
    pub model_guard: ModelGuard,
    pub max_job_bytes: usize,
    pub worker_name: String,
    pub metrics_addr: SocketAddr,
    pub shutdown_timeout: Duration,
    pub result_cache: CacheSettings,
}

impl WorkerConfig {
    pub fn from_args(args: WorkerArgs) -> Result<WorkerConfig, ConfigError> {
        validate_name("model", &args.model)?;
        for (name, value) in [
            ("--max-batch-size", args.max_batch_size),
            ("--max-batch-tokens", args.max_batch_tokens),
            ("--max-in-flight", args.max_in_flight),
            ("--fetch-batch", args.fetch_batch),
            ("--max-model-failures", args.max_model_failures as usize),
            (
                "--result-cache-max-bytes",
                usize::try_from(args.result_cache_max_bytes).unwrap_or(0),
            ),
            (
                "--max-deliver",
                usize::try_from(args.max_deliver).unwrap_or(0),
            ),
            (
                "--max-ack-pending",
                usize::try_from(args.max_ack_pending).unwrap_or(0),
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        for (name, value) in [
            ("--reconcile-every", args.reconcile_every),
            ("--queue-metrics-every", args.queue_metrics_every),
            ("--batch-timeout", args.batch_timeout),
            ("--ack-wait", args.ack_wait),
            ("--result-cache-ttl", args.result_cache_ttl),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration(name));
            }
        }
        // In-flight jobs are counted with a semaphore taken whole (u32 permits) at shutdown.
        for (name, value) in [
            ("--max-in-flight", args.max_in_flight),
            ("--fetch-batch", args.fetch_batch),
        ] {
            if value > u32::MAX as usize {
                return Err(ConfigError::TooLarge(name, u32::MAX));
            }
        }
        if let Some(first) = args.backoff.first()
            && *first != args.ack_wait
        {
            return Err(ConfigError::BackoffAckWait {
                first: *first,
                ack_wait: args.ack_wait,
            });
        }
        if args.backoff.len() as i64 >= args.max_deliver {
            return Err(ConfigError::BackoffTooLong {
                max_deliver: args.max_deliver,
                backoff: args.backoff.len(),
            });
        }
        let worker_name = args.worker_name.unwrap_or_else(default_worker_name);
        Ok(WorkerConfig {
            consumer: ConsumerSettings {
                durable_name: format!("fleet-worker-{}", args.model),
                filter_subject: fleet_schemas::subject::jobs(&args.model),
                ack_wait: args.ack_wait,
                max_deliver: args.max_deliver,
                backoff: args.backoff,
                max_ack_pending: args.max_ack_pending,
            },
            key_store: args.key_store,
            nats_url: args.nats_url,
            model: args.model,
            model_dir: args.model_dir,
            device: args.device,
            precision: args.precision,
            batch: BatchLimits {
                max_batch_size: args.max_batch_size,
                max_batch_tokens: args.max_batch_tokens,
                max_delay: args.max_delay,
            },
            max_in_flight: args.max_in_flight,
            fetch_batch: args.fetch_batch,
            retry_delay: args.retry_delay,
            reconcile_every: args.reconcile_every,
            queue_metrics_every: args.queue_metrics_every,
            model_guard: ModelGuard {
                batch_timeout: args.batch_timeout,
                batch_timeout_per_token: args.batch_timeout_per_token,
                max_model_failures: args.max_model_failures,
            },
            max_job_bytes: args.max_job_bytes,
            worker_name,
            metrics_addr: args.metrics_addr,
            shutdown_timeout: args.shutdown_timeout,
            result_cache: CacheSettings {
                mode: args.result_cache,
                limits: CacheLimits {
                    ttl: args.result_cache_ttl,
                    max_bytes: args.result_cache_max_bytes,
                },
                // The binary sets it from the model's files once it has found them.
                model_version: String::new(),
            },
        })
    }
}

impl WorkerConfig {
    /// What `/info` shows: the model, the batching and in-flight limits, the consumer's settings
    /// and where NATS and the tenants are, without secrets. `tenants` names the key store as
    /// its logs do.
    pub fn info(&self, nats: &NatsAuthArgs, tenants: &str) -> Info {
        let consumer = &self.consumer;
        let guard = &self.model_guard;
        let details = json!({
            "model": {
                "name": self.model,
                "dir": self.model_dir,
                "device": self.device.to_string(),
                "precision": self.precision.to_string(),
            },
            "limits": {
                "max_batch_size": self.batch.max_batch_size,
                "max_batch_tokens": self.batch.max_batch_tokens,
                "max_delay": humantime::format_duration(self.batch.max_delay).to_string(),
                "max_in_flight": self.max_in_flight,
                "fetch_batch": self.fetch_batch,
                "max_job_bytes": self.max_job_bytes,
                "batch_timeout": humantime::format_duration(guard.batch_timeout).to_string(),
                "batch_timeout_per_token": humantime::format_duration(guard.batch_timeout_per_token).to_string(),
                "max_model_failures": guard.max_model_failures,
            },
            "consumer": {
                "durable_name": consumer.durable_name,
                "filter_subject": consumer.filter_subject,
                "ack_wait": humantime::format_duration(consumer.ack_wait).to_string(),
                "max_deliver": consumer.max_deliver,
                "backoff": consumer.backoff.iter().map(|step| format!("{step:?}")).collect::<Vec<_>>(),
                "max_ack_pending": consumer.max_ack_pending,
            },
            "retry_delay": humantime::format_duration(self.retry_delay).to_string(),
            "reconcile_every": humantime::format_duration(self.reconcile_every).to_string(),
            "queue_metrics_every": humantime::format_duration(self.queue_metrics_every).to_string(),
            "shutdown_timeout": humantime::format_duration(self.shutdown_timeout).to_string(),
            "result_cache": {
                "mode": format!("{:?}", self.result_cache.mode).to_lowercase(),
                "ttl": humantime::format_duration(self.result_cache.limits.ttl).to_string(),
                "max_bytes": self.result_cache.limits.max_bytes,
            },
            "nats": nats_summary(&self.nats_url, nats),
            "tenants": tenants,
        });
        Info {
            role: "worker",
            version: env!("CARGO_PKG_VERSION"),
            name: self.worker_name.clone(),
            details,
        }
    }
}

fn default_worker_name() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> WorkerArgs {
        WorkerArgs::try_parse_from(std::iter::once("worker").chain(args.iter().copied()))
            .expect("valid arguments")
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = WorkerConfig::from_args(parse(&[])).expect("valid");
        assert_eq!(config.model, "all-minilm-l6-v2");
        assert_eq!(config.device, DeviceSpec::Cpu);
        assert_eq!(config.precision, Precision::Auto);
        assert_eq!(config.batch.max_batch_size, 32);
        assert_eq!(config.batch.max_batch_tokens, 16384);
        assert_eq!(config.batch.max_delay, Duration::from_millis(5));
        assert_eq!(config.consumer.ack_wait, Duration::from_secs(3));
        assert_eq!(config.consumer.max_deliver, 5);
        assert_eq!(
            config.consumer.durable_name,
            "fleet-worker-all-minilm-l6-v2"
        );
        assert_eq!(
            config.consumer.filter_subject,
            "fleet.jobs.all-minilm-l6-v2"
        );
        assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
        // Caching is the operator's choice: it keeps what tenants embedded for a day.
        assert_eq!(config.result_cache.mode, CacheMode::Off);
        assert_eq!(
            config.result_cache.limits.ttl,
            Duration::from_secs(24 * 3600)
        );
        assert!(
            config
                .worker_name
                .ends_with(&format!("-{}", std::process::id()))
        );
    }

    #[test]
    fn durations_devices_and_lists_parse() {
        let args = parse(&[
            "--ack-wait",
            "2s",
            "--backoff",
            "2s,500ms,1m",
            "--device",
            "cuda:1",
            "--max-deliver",
            "4",
            "--precision",
            "bf16x3",
        ]);
        assert_eq!(args.device, DeviceSpec::Cuda(1));
        assert_eq!(args.precision, Precision::Bf16x3);
        let config = WorkerConfig::from_args(args).expect("valid");
        assert_eq!(
            config.consumer.backoff,
            [
                Duration::from_secs(2),
                Duration::from_millis(500),
                Duration::from_secs(60)
            ]
        );
        assert!(WorkerArgs::try_parse_from(["worker", "--device", "tpu"]).is_err());
        let cached = parse(&["--result-cache", "shared", "--result-cache-ttl", "90m"]);
        assert_eq!(cached.result_cache, CacheMode::Shared);
        assert_eq!(cached.result_cache_ttl, Duration::from_secs(5400));
        assert!(WorkerArgs::try_parse_from(["worker", "--result-cache", "everyone"]).is_err());
        assert!(WorkerArgs::try_parse_from(["worker", "--ack-wait", "3 fortnights"]).is_err());
        let minutes = format!("{}m", u64::MAX);
        assert!(WorkerArgs::try_parse_from(["worker", "--ack-wait", &minutes]).is_err());
    }

    #[test]
    fn inconsistent_settings_are_refused_with_the_reason() {
        let too_many = (u64::from(u32::MAX) + 1).to_string();
        let err = WorkerConfig::from_args(parse(&["--max-in-flight", &too_many])).unwrap_err();
        assert!(
            matches!(err, ConfigError::TooLarge("--max-in-flight", _)),
            "{err}"
        );
        let err = WorkerConfig::from_args(parse(&["--backoff", "1s"])).unwrap_err();
        assert!(matches!(err, ConfigError::BackoffAckWait { .. }), "{err}");
        let err = WorkerConfig::from_args(parse(&[
            "--ack-wait",
            "1s",
            "--backoff",
            "1s,2s",
            "--max-deliver",
            "2",
        ]))
        .unwrap_err();
        assert!(matches!(err, ConfigError::BackoffTooLong { .. }), "{err}");
        let err = WorkerConfig::from_args(parse(&["--max-batch-size", "0"])).unwrap_err();
        assert!(
            matches!(err, ConfigError::Zero("--max-batch-size")),
            "{err}"
        );
        let err = WorkerConfig::from_args(parse(&["--model", "a.b"])).unwrap_err();
        assert!(matches!(err, ConfigError::Name(_)), "{err}");
    }

    #[test]
    fn info_shows_model_limits_and_no_secret() {
        let config = WorkerConfig::from_args(parse(&[
            "--nats-url",
            "nats://fleet:pa55-SECRET@127.0.0.1:4222",
            "--max-batch-size",
            "8",
            "--worker-name",
            "w-1",
        ]))
        .expect("valid");
        let nats = NatsAuthArgs {
            nats_token: Some("t0ken-SECRET".parse().expect("any text")),
            ..NatsAuthArgs::default()
        };
        let info = config.info(&nats, "file tenants.toml");
        assert_eq!((info.role, info.name.as_str()), ("worker", "w-1"));
        let details = &info.details;
        assert_eq!(details["model"]["name"], "all-minilm-l6-v2");
        assert_eq!(details["limits"]["max_batch_size"], 8);
        assert_eq!(details["limits"]["max_delay"], "5ms");
        assert_eq!(details["consumer"]["ack_wait"], "3s");
        assert_eq!(details["nats"]["url"], "nats://127.0.0.1:4222");
        assert_eq!(details["nats"]["auth"], "token");
        assert!(!details.to_string().contains("SECRET"), "{details}");
    }
}
