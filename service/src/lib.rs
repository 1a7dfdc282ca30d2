//! Process plumbing shared by Fleet's binaries, so each states only what is its own.

mod config;
mod discovery;
mod events;
mod http;
mod logging;
pub mod metrics;
pub mod nats;
pub mod trace;

pub use config::{ConfigError, load_config, load_config_or_exit, positive_duration};
pub use discovery::{DISPATCHER_SERVICE, Discovery, DiscoveryError, WORKER_SERVICE};
pub use events::ConnectionEvents;
/// The target of audit events, shipped to their own index: `tracing::info!(target: AUDIT_TARGET, ...)`.
pub use fleet_shipping::AUDIT_TARGET;
pub use http::{Check, Endpoints, HttpServer, Info, Readiness, nats_summary, serve_http};
pub use logging::{
    LOG_ES_PASSWORD_ENV, LogArgs, LogFormat, Logging, LoggingError, init_cli_logging, init_logging,
    init_logging_to,
};
pub use nats::{NatsArgs, NatsAuthArgs, NatsError, Secret, redact_url};
pub use trace::TraceParent;

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
