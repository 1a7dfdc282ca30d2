//! Logs: lines a person reads on a terminal, JSON lines a machine reads everywhere else, and,
//! when `--log-es-url` is set, the same lines and the audit events shipped to Elasticsearch
//! (`fleet_shipping`).
//!
//! JSON lines carry the fields of the span they were written in (`span`), so a line written
//! while a job is handled carries that job's `job_id`, `tenant`, `model`, `key_id`, delivery
//! count and `trace_id`, and one job's lines are found by its id.

use std::{io::IsTerminal, path::PathBuf, time::Duration};

use fleet_shipping::{AUDIT_TARGET, BasicAuth, Shipper, ShippingConfig, ShippingMetrics};
use prometheus_client::registry::Registry;
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::{FilterExt, filter_fn},
    fmt::MakeWriter,
    layer::SubscriberExt,
    util::SubscriberInitExt,
};

/// How long a stopping process waits for Elasticsearch to take its last lines.
const SHIPPING_SHUTDOWN_DEADLINE: Duration = Duration::from_secs(3);

/// The variable the Elasticsearch password may come from (never a flag: a command line is
/// visible to every user of the host).
pub const LOG_ES_PASSWORD_ENV: &str = "FLEET_LOG_ES_PASSWORD";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Text when stdout is a terminal, JSON otherwise.
    Auto,
    /// One line of text per event, its span's fields in front (colored on a terminal).
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `span`).
    Json,
}

/// The logging flags every Fleet binary takes. They are global, so the `fleet` command takes
/// them after any subcommand too.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: text (for a person), json (for a machine), or auto: text when stdout is a
    /// terminal, JSON otherwise. The level is set by RUST_LOG (default info).
    #[arg(long, env = "FLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto, global = true)]
    pub log_format: LogFormat,
    /// Elasticsearch (8.x) to ship log lines and audit events to, `http(s)://host:port`
    /// without credentials. Off unless set.
    #[arg(long, env = "FLEET_LOG_ES_URL", global = true)]
    pub log_es_url: Option<String>,
    /// User name for Elasticsearch; the password comes from --log-es-password-file or the
    /// variable FLEET_LOG_ES_PASSWORD.
    #[arg(long, env = "FLEET_LOG_ES_USERNAME", global = true)]
    pub log_es_username: Option<String>,
    /// File holding the Elasticsearch password of --log-es-username.
    #[arg(long, env = "FLEET_LOG_ES_PASSWORD_FILE", global = true)]
    pub log_es_password_file: Option<PathBuf>,
    /// Indices are <prefix>-logs-YYYY.MM.DD and <prefix>-audit-YYYY.MM.DD (UTC days).
    #[arg(
        long,
        env = "FLEET_LOG_ES_INDEX_PREFIX",
        default_value = "fleet",
        global = true
    )]
    pub log_es_index_prefix: String,
    /// Most lines waiting to be shipped; past it the oldest are dropped (counted). Memory is
    /// bounded by this times --log-es-max-line-bytes.
    #[arg(
        long,
        env = "FLEET_LOG_ES_BUFFER_LINES",
        default_value_t = 10_000,
        global = true
    )]
    pub log_es_buffer_lines: usize,
    /// Most lines in one _bulk request; a full batch is sent at once.
    #[arg(
        long,
        env = "FLEET_LOG_ES_BATCH_LINES",
        default_value_t = 500,
        global = true
    )]
    pub log_es_batch_lines: usize,
    /// How long a partial batch waits before it is sent.
    #[arg(long, env = "FLEET_LOG_ES_FLUSH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration, global = true)]
    pub log_es_flush_interval: Duration,
    /// A line (one JSON document) larger than this is dropped (counted), not shipped.
    #[arg(long, env = "FLEET_LOG_ES_MAX_LINE_BYTES", default_value_t = 16 << 10, global = true)]
    pub log_es_max_line_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("cannot read the Elasticsearch password file {path}: {source}")]
    ReadPassword {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the Elasticsearch password file {0} is empty")]
    EmptyPassword(PathBuf),
    #[error("an Elasticsearch password was given without --log-es-username")]
    PasswordWithoutUser,
    #[error("--log-es-username needs a password: --log-es-password-file or {LOG_ES_PASSWORD_ENV}")]
    UserWithoutPassword,
    #[error(
        "give the Elasticsearch password once: --log-es-password-file or {LOG_ES_PASSWORD_ENV}"
    )]
    TwoPasswords,
    #[error(transparent)]
    Shipping(#[from] fleet_shipping::ShippingError),
}

impl LogArgs {
    /// What to ship, if shipping is on; `env_password` is the value of `FLEET_LOG_ES_PASSWORD`.
    pub fn shipping_config(
        &self,
        service: &str,
        env_password: Option<String>,
    ) -> Result<Option<ShippingConfig>, LoggingError> {
        let Some(url) = &self.log_es_url else {
            return Ok(None);
        };
        let password = match (&self.log_es_password_file, env_password) {
            (Some(_), Some(_)) => return Err(LoggingError::TwoPasswords),
            (Some(path), None) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| LoggingError::ReadPassword {
                        path: path.clone(),
                        source,
                    })?;
                // Files end in a newline; a password does not.
                let text = text.trim_end_matches(['\n', '\r']);
                if text.is_empty() {
                    return Err(LoggingError::EmptyPassword(path.clone()));
                }
                Some(text.to_owned())
            }
            (None, password) => password,
        };
        let auth = match (&self.log_es_username, password) {
            (Some(username), Some(password)) => Some(BasicAuth {
                username: username.clone(),
                password,
            }),
            (Some(_), None) => return Err(LoggingError::UserWithoutPassword),
            (None, Some(_)) => return Err(LoggingError::PasswordWithoutUser),
            (None, None) => None,
        };
        let config = ShippingConfig {
            url: url.clone(),
            auth,
            index_prefix: self.log_es_index_prefix.clone(),
            capacity: self.log_es_buffer_lines,
            batch_lines: self.log_es_batch_lines,
            flush_interval: self.log_es_flush_interval,
            max_line_bytes: self.log_es_max_line_bytes,
            service: service.to_owned(),
        };
        config.validate()?;
        Ok(Some(config))
    }
}

impl LogFormat {
    /// `Text` or `Json`: what `Auto` means when stdout is or is not a terminal.
    pub fn resolve(self, terminal: bool) -> LogFormat {
        match self {
            LogFormat::Auto if terminal => LogFormat::Text,
            LogFormat::Auto => LogFormat::Json,
            chosen => chosen,
        }
    }
}

/// A process's logging once started: the shipping metrics (registered whether shipping is on
/// or not, so dashboards and alerts find them everywhere) and, when on, the shipper to stop.
pub struct Logging {
    metrics: ShippingMetrics,
    shipper: Option<Shipper>,
}

impl Logging {
    /// Registers the shipping metrics (`fleet_log_shipping_*`).
    pub fn register(&self, registry: &mut Registry) {
        self.metrics.register(registry);
    }

    /// Ships what is buffered (waiting a few seconds at most); call it before the process
    /// exits, so the last lines of a short command reach the server.
    pub async fn shutdown(self) {
        if let Some(shipper) = self.shipper {
            shipper.shutdown(SHIPPING_SHUTDOWN_DEADLINE).await;
        }
    }
}

/// The filter from `RUST_LOG`, else `default`.
fn filter(default: &str) -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default))
}

/// async-nats logs each (re)connection at info without the server; Fleet logs its own.
const SERVICE_FILTER: &str = "info,async_nats=warn";

/// Logs to stdout in `args.log_format`, filtered by `RUST_LOG`, and ships to Elasticsearch when
/// `--log-es-url` is set (audit events whatever `RUST_LOG` says). `service` names the process
/// in shipped documents. Must be called within the tokio runtime (the shipper is a task).
pub fn init_logging(args: &LogArgs, service: &str) -> Result<Logging, LoggingError> {
    let terminal = std::io::stdout().is_terminal();
    let format = args.log_format.resolve(terminal);
    install(
        args,
        service,
        format,
        terminal,
        std::io::stdout,
        SERVICE_FILTER,
    )
}

/// For a command (`fleet`): logs go to stderr (stdout is the command's output), warnings only
/// unless `RUST_LOG` says otherwise; shipping as in [`init_logging`], at info.
pub fn init_cli_logging(args: &LogArgs, service: &str) -> Result<Logging, LoggingError> {
    let terminal = std::io::stderr().is_terminal();
    let format = args.log_format.resolve(terminal);
    install(args, service, format, terminal, std::io::stderr, "warn")
}

fn install<W>(
    args: &LogArgs,
    service: &str,
    format: LogFormat,
    terminal: bool,
    writer: W,
    default_filter: &str,
) -> Result<Logging, LoggingError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let metrics = ShippingMetrics::default();
    let env_password = std::env::var(LOG_ES_PASSWORD_ENV).ok();
    let (shipping, shipper) = match args.shipping_config(service, env_password)? {
        Some(config) => {
            let (layer, shipper) = fleet_shipping::start(&config, metrics.clone())?;
            // Audit events are shipped whatever the level; other lines as RUST_LOG says.
            let audit = filter_fn(|metadata| metadata.target() == AUDIT_TARGET);
            let shipped = filter(SERVICE_FILTER).or(audit);
            (Some(layer.with_filter(shipped)), Some(shipper))
        }
        None => (None, None),
    };
    let fmt = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed(),
        _ => tracing_subscriber::fmt::layer()
            .with_ansi(terminal)
            .with_writer(writer)
            .boxed(),
    };
    // Does nothing if the process already logs (a test that started logging itself).
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter(default_filter)))
        .with(shipping)
        .try_init();
    if let Some(config) = args.log_es_url.as_deref() {
        tracing::info!(url = %fleet_shipping::shown_url(config), prefix = %args.log_es_index_prefix,
            "shipping logs and audit events to Elasticsearch");
    }
    Ok(Logging { metrics, shipper })
}

/// Logs to `writer` in `format` (`Auto` read as if `terminal` told whether it is a terminal),
/// filtered by `RUST_LOG`, without shipping. Does nothing if the process already logs.
pub fn init_logging_to<W>(format: LogFormat, terminal: bool, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter(SERVICE_FILTER))
        .with_writer(writer);
    let _ = match format.resolve(terminal) {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        _ => builder.with_ansi(terminal).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        log: LogArgs,
    }

    fn args(extra: &[&str]) -> LogArgs {
        Cli::try_parse_from(std::iter::once("prog").chain(extra.iter().copied()))
            .expect("valid flags")
            .log
    }

    #[test]
    fn auto_is_text_on_a_terminal_and_json_elsewhere() {
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Text);
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
        assert_eq!(LogFormat::Json.resolve(true), LogFormat::Json);
        assert_eq!(LogFormat::Text.resolve(false), LogFormat::Text);
    }

    #[test]
    fn shipping_is_off_unless_a_url_is_given() {
        assert!(
            args(&[])
                .shipping_config("x", None)
                .expect("valid")
                .is_none()
        );
        let config = args(&[
            "--log-es-url",
            "http://127.0.0.1:9200",
            "--log-es-flush-interval",
            "250ms",
        ])
        .shipping_config("dispatcher", None)
        .expect("valid")
        .expect("on");
        assert_eq!(config.flush_interval, Duration::from_millis(250));
        assert_eq!(config.index_prefix, "fleet");
        assert_eq!(config.service, "dispatcher");
        assert!(config.auth.is_none());
    }

    #[test]
    fn the_password_comes_from_a_file_or_the_environment_once_and_is_never_shown() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("es-password");
        std::fs::write(&file, "s3cret\n").expect("write");
        let file_arg = file.to_string_lossy().into_owned();
        let base = [
            "--log-es-url",
            "http://127.0.0.1:9200",
            "--log-es-username",
            "fleet",
        ];
        let from_file = args(&[&base[..], &["--log-es-password-file", &file_arg]].concat())
            .shipping_config("x", None)
            .expect("valid")
            .expect("on");
        let auth = from_file.auth.expect("credentials");
        assert_eq!(auth.password, "s3cret");
        assert!(!format!("{auth:?}").contains("s3cret"));
        let from_env = args(&base)
            .shipping_config("x", Some("env-pw".into()))
            .expect("valid")
            .expect("on");
        assert_eq!(from_env.auth.expect("credentials").password, "env-pw");
        let twice = args(&[&base[..], &["--log-es-password-file", &file_arg]].concat())
            .shipping_config("x", Some("env-pw".into()));
        assert!(
            matches!(twice, Err(LoggingError::TwoPasswords)),
            "{twice:?}"
        );
        let without_password = args(&base).shipping_config("x", None);
        assert!(matches!(
            without_password,
            Err(LoggingError::UserWithoutPassword)
        ));
        let without_user = args(&["--log-es-url", "http://127.0.0.1:9200"])
            .shipping_config("x", Some("pw".into()));
        assert!(matches!(
            without_user,
            Err(LoggingError::PasswordWithoutUser)
        ));
    }

    #[test]
    fn a_url_with_credentials_is_refused_and_a_shown_url_has_none() {
        let refused =
            args(&["--log-es-url", "http://user:pw@127.0.0.1:9200"]).shipping_config("x", None);
        assert!(
            matches!(
                refused,
                Err(LoggingError::Shipping(
                    fleet_shipping::ShippingError::CredentialsInUrl
                ))
            ),
            "{refused:?}"
        );
        let shown = fleet_shipping::shown_url("https://user:pw@es.example:9243/some/path");
        assert_eq!(shown, "https://es.example:9243");
    }
}
