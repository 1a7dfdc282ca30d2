use std::sync::Arc;

use anyhow::Context as _;
use fleet_worker::{WorkerArgs, WorkerConfig, metrics::Metrics, model};
use prometheus_client::registry::Registry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: WorkerArgs = fleet_service::load_config(std::env::args_os())?;
    fleet_service::init_logging();
    let config = WorkerConfig::from_args(args)?;
    tracing::info!(
        worker = %config.worker_name,
        model = %config.model,
        device = %config.device,
        nats_url = %config.nats_url,
        "starting worker"
    );
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    fleet_service::serve_metrics(config.metrics_addr, Arc::new(registry))
        .await
        .with_context(|| format!("cannot serve metrics on {}", config.metrics_addr))?;
    let embedder = model::load(&config.model_dir, config.device)
        .with_context(|| format!("cannot load model from {}", config.model_dir.display()))?;
    let client = async_nats::ConnectOptions::new()
        .name(&config.worker_name)
        .retry_on_initial_connect()
        .connect(&config.nats_url)
        .await
        .with_context(|| format!("cannot connect to NATS at {}", config.nats_url))?;
    fleet_worker::run(
        &config,
        client.clone(),
        embedder,
        metrics,
        fleet_service::shutdown_signal(),
    )
    .await?;
    // Acks and results went out as requests and were confirmed; flush what is left on the wire.
    client
        .flush()
        .await
        .context("cannot flush NATS connection")?;
    Ok(())
}
