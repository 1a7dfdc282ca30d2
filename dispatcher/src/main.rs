use std::sync::Arc;

use anyhow::Context;
use fleet_dispatcher::{Dispatcher, DispatcherConfig};
use fleet_service::{Check, Endpoints, Readiness};
use prometheus_client::registry::Registry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: DispatcherConfig = fleet_service::load_config_or_exit();
    fleet_service::init_logging();
    let keys = config
        .key_store
        .start()
        .await
        .context("the dispatcher needs its tenants to start")?;
    tracing::info!(
        name = %config.name,
        nats_url = %config.nats.shown_url(),
        tenants = %keys.describe(),
        "starting dispatcher"
    );
    let info = config.info(keys.describe());
    let mut registry = Registry::default();
    keys.metrics().register(&mut registry);
    let dispatcher = Dispatcher::start(&config, keys, &mut registry).await?;
    // Started means connected, with the streams created or verified.
    let readiness = Readiness::dispatcher();
    readiness.watch_nats(&dispatcher.client);
    readiness.pass(Check::Streams);
    let endpoints = Endpoints {
        registry: Arc::new(registry),
        readiness: readiness.clone(),
        info,
    };
    fleet_service::serve_http(config.metrics_addr, endpoints)
        .await
        .with_context(|| format!("cannot serve HTTP on {}", config.metrics_addr))?;
    let listening = dispatcher.listen().await?;
    readiness.pass(Check::Subscriptions);
    listening
        .run(async {
            fleet_service::shutdown_signal().await;
            readiness.drain();
        })
        .await;
    Ok(())
}
