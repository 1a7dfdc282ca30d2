use std::sync::Arc;

use anyhow::Context;
use fleet_dispatcher::{Dispatcher, DispatcherConfig, StaticTenants};
use prometheus_client::registry::Registry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: DispatcherConfig = fleet_service::load_config_or_exit();
    fleet_service::init_logging();
    let tenants = StaticTenants::from_file(&config.tenants)
        .with_context(|| "the dispatcher needs its tenants to start")?;
    tracing::info!(
        name = %config.name,
        nats_url = %config.nats.shown_url(),
        tenants = %config.tenants.display(),
        "starting dispatcher"
    );
    let mut registry = Registry::default();
    let dispatcher = Dispatcher::start(&config, Arc::new(tenants), &mut registry).await?;
    fleet_service::serve_metrics(config.metrics_addr, Arc::new(registry))
        .await
        .with_context(|| format!("cannot serve metrics on {}", config.metrics_addr))?;
    dispatcher.serve(fleet_service::shutdown_signal()).await?;
    Ok(())
}
