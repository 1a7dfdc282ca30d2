//! Fleet's dispatcher: the only way into the queue. It checks every signed job (envelope,
//! key, signature, tenant rights, clock window, sizes, rate) and queues the admitted ones on
//! JetStream, deduplicated by job id; everything refused is answered with a typed code and
//! leaves nothing behind.

pub mod config;
pub mod metrics;
pub mod rate;
pub mod service;
pub mod validate;
pub mod workers;

use std::sync::Arc;

use async_nats::jetstream;
use fleet_keys::KeyStore;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

/// How often a dispatcher asks again for its streams while the cluster cannot answer yet.
const STREAMS_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

pub use config::DispatcherConfig;
pub use service::{Dispatcher, ServeError};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(
        "{0} defines no tenant, so every job would be refused: add one with \
         `fleet keygen --tenant <name> --out <name>-key.toml >> tenants.toml`"
    )]
    NoTenants(String),
    #[error(transparent)]
    Nats(#[from] fleet_service::NatsError),
    #[error(transparent)]
    Topology(#[from] fleet_streams::TopologyError),
}

impl Dispatcher {
    /// Connects, creates or verifies the streams, and readies a dispatcher to serve.
    pub async fn start(
        config: &DispatcherConfig,
        keys: KeyStore,
        registry: &mut Registry,
    ) -> Result<Arc<Dispatcher>, StartError> {
        config.validate()?;
        if keys.snapshot().is_empty() {
            return Err(StartError::NoTenants(keys.describe().to_owned()));
        }
        let metrics = metrics::DispatcherMetrics::register(registry);
        let events = fleet_service::ConnectionEvents::new(
            config.nats.shown_url(),
            metrics.requests_dropped.clone(),
            "dropped requests go unanswered (their callers time out): add dispatchers or raise \
             --max-buffered-requests",
        );
        let options = events.options(
            async_nats::ConnectOptions::new()
                .name(config.name.clone())
                .subscription_capacity(config.max_buffered_requests as usize),
        );
        let client = config.nats.connect(options).await?;
        let jetstream = jetstream::new(client.clone());
        // A cluster restarting or without a quorum cannot tell yet whether the streams exist:
        // waited out, as the workers do, instead of exiting.
        let streams = fleet_streams::ensure_all_when_available(
            &jetstream,
            &config.stream_limits(),
            STREAMS_RETRY,
        )
        .await?;
        let rate_limits = rate::TenantRateLimits::default();
        let validator =
            validate::Validator::new(keys, config.models.clone(), config.admission_limits())
                .timing_verification(metrics.signature_verification_seconds.clone());
        Ok(Arc::new(Dispatcher {
            name: config.name.clone(),
            client,
            jetstream,
            validator,
            rate_limits,
            metrics,
            publish_slots: Arc::new(Semaphore::new(config.max_pending_publishes as usize)),
            publish_slots_capacity: config.max_pending_publishes,
            publish_timeout: config.publish_timeout,
            results: streams.results,
            relay_wait: config.relay_wait,
            relay_slots: Arc::new(Semaphore::new(config.max_relays)),
            workers: workers::Workers::default(),
        }))
    }
}
