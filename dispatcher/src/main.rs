use std::sync::Arc;

use anyhow::Context;
use fleet_dispatcher::{Dispatcher, DispatcherConfig};
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
    let mut registry = Registry::default();
    keys.metrics().register(&mut registry);
    let dispatcher = Dispatcher::start(&config, keys, &mut registry).await?;
    fleet_service::serve_metrics(config.metrics_addr, Arc::new(registry))
        .await
        .with_context(|| format!("cannot serve metrics on {}", config.metrics_addr))?;
    dispatcher.serve(fleet_service::shutdown_signal()).await?;
    Ok(())
}
