//! Logs: lines a person reads on a terminal, JSON lines a machine reads everywhere else.
//!
//! JSON lines carry the fields of the span they were written in (`span`), so a line written
//! while a job is handled carries that job's `job_id`, `tenant`, `model`, `key_id`, delivery
//! count and `trace_id`, and one job's lines are found by its id.

use std::io::IsTerminal;

use tracing_subscriber::fmt::MakeWriter;

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

/// The logging flags every Fleet binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log format: text (for a person), json (for a machine), or auto: text when stdout is a
    /// terminal, JSON otherwise. The level is set by RUST_LOG (default info).
    #[arg(long, env = "FLEET_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub log_format: LogFormat,
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

/// The filter from `RUST_LOG`, by default `info` with async-nats at `warn`.
fn filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env()
        // async-nats logs each (re)connection at info without the server; Fleet logs its own.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"))
}

/// Logs to stdout in `format`, filtered by `RUST_LOG`.
pub fn init_logging(format: LogFormat) {
    let terminal = std::io::stdout().is_terminal();
    init_logging_to(format, terminal, std::io::stdout);
}

/// Logs to `writer` in `format` (`Auto` read as if `terminal` told whether it is a terminal),
/// filtered by `RUST_LOG`. Does nothing if the process already logs.
pub fn init_logging_to<W>(format: LogFormat, terminal: bool, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
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
    use super::*;

    #[test]
    fn auto_is_text_on_a_terminal_and_json_elsewhere() {
        assert_eq!(LogFormat::Auto.resolve(true), LogFormat::Text);
        assert_eq!(LogFormat::Auto.resolve(false), LogFormat::Json);
        assert_eq!(LogFormat::Json.resolve(true), LogFormat::Json);
        assert_eq!(LogFormat::Text.resolve(false), LogFormat::Text);
    }
}
