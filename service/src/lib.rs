//! Process plumbing shared by Fleet's binaries, so each states only what is its own.

mod config;
mod discovery;
mod events;
mod http;
pub mod metrics;
pub mod nats;

pub use config::{ConfigError, load_config, load_config_or_exit};
pub use discovery::{DISPATCHER_SERVICE, Discovery, DiscoveryError, WORKER_SERVICE};
pub use events::ConnectionEvents;
pub use http::{Check, Endpoints, HttpServer, Info, Readiness, nats_summary, serve_http};
pub use nats::{NatsArgs, NatsAuthArgs, NatsError, Secret, redact_url};

/// JSON lines on stdout, filtered by `RUST_LOG` (default `info`, async-nats at `warn`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // async-nats logs each (re)connection at info without the server; Fleet logs its own.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,async_nats=warn"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(false)
        .try_init();
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        // Without signal handlers the process still stops on the default action.
        _ => std::future::pending().await,
    }
}
