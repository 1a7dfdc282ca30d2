use std::{collections::HashMap, sync::Arc};

use anyhow::{Context as _, bail};
use clap::Parser;
use fleet_service::{
    Check, ConnectionEvents, Discovery, Endpoints, Logging, NatsAuthArgs, Readiness, WORKER_SERVICE,
};
use fleet_worker::{
    WorkerArgs, WorkerConfig,
    cache::{CacheMode, model_version},
    embedder::warm_up,
    metrics::Metrics,
    model,
};
use prometheus_client::{metrics::counter::Counter, registry::Registry};

/// Fleet worker: pulls jobs of one model from JetStream, runs them in dynamic batches, stores and
/// sends the results.
#[derive(Debug, Parser)]
// A flag given twice takes the last value, so scripts can append overrides.
#[command(name = "worker", version, args_override_self = true)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,
    #[command(flatten)]
    nats: NatsAuthArgs,
    #[command(flatten)]
    log: fleet_service::LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = fleet_service::load_config_or_exit();
    let logging = fleet_service::init_logging(&cli.log, "worker")?;
    let worked = work(cli, &logging).await;
    // The last lines (why it stopped) still reach Elasticsearch.
    logging.shutdown().await;
    worked
}

async fn work(cli: Cli, logging: &Logging) -> anyhow::Result<()> {
    let mut config = WorkerConfig::from_args(cli.worker)?;
    let nats_url = fleet_service::redact_url(&config.nats_url);
    tracing::info!(
        worker = %config.worker_name,
        model = %config.model,
        device = %config.device,
        nats_url = %nats_url,
        "starting worker"
    );
    if !config.model_dir.join("model.safetensors").is_file() {
        let shown = std::path::absolute(&config.model_dir).unwrap_or(config.model_dir.clone());
        bail!(
            "no model at {} (model.safetensors missing): fetch it with ops/fetch-model.sh in \
             Fleet's repository, or point --model-dir (FLEET_MODEL_DIR) at a copy",
            shown.display()
        );
    }
    // Connect before the slow model load, so an unreachable server is reported at once; a
    // connection made once is kept up by reconnecting.
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry, &config.model);
    // Every job is verified against its tenant's key before it runs, as at admission.
    let keys = config
        .key_store
        .start()
        .await
        .context("cannot read the tenants' keys")?;
    keys.metrics().register(&mut registry);
    logging.register(&mut registry);
    let dropped = Counter::default();
    registry.register(
        "fleet_worker_nats_messages_dropped",
        "Messages (jobs, advisories) the NATS client dropped unread because this worker's buffer \
         for them was full",
        dropped.clone(),
    );
    let events = ConnectionEvents::new(
        nats_url,
        dropped,
        "dropped jobs are redelivered after the ack wait",
    );
    let options = events.options(async_nats::ConnectOptions::new().name(&config.worker_name));
    let client = fleet_service::nats::connect(&config.nats_url, &cli.nats, options).await?;
    // Served before the model loads, so /health answers and /ready says why not during the load.
    let readiness = Readiness::worker();
    readiness.watch_nats(&client);
    let endpoints = Endpoints {
        registry: Arc::new(registry),
        readiness: readiness.clone(),
        info: config.info(&cli.nats, keys.describe()),
    };
    let http = fleet_service::serve_http(config.metrics_addr, endpoints)
        .await
        .with_context(|| format!("cannot serve HTTP on {}", config.metrics_addr))?;
    // Listed from now (while the model loads too: /ready tells when it takes jobs) until the
    // drain begins. Workers take no requests, so the service has no endpoints.
    let metadata = HashMap::from([
        ("name".to_owned(), config.worker_name.clone()),
        ("model".to_owned(), config.model.clone()),
        ("device".to_owned(), config.device.to_string()),
        ("consumer".to_owned(), config.consumer.durable_name.clone()),
        ("http".to_owned(), http.local_addr.to_string()),
    ]);
    let discovery = Discovery::register(
        &client,
        WORKER_SERVICE,
        env!("CARGO_PKG_VERSION"),
        "Fleet worker: runs queued jobs of one model",
        metadata,
    )
    .await?;
    let embedder = model::load(&config.model_dir, config.device, config.precision)
        .with_context(|| format!("cannot load model from {}", config.model_dir.display()))?;
    if config.result_cache.mode != CacheMode::Off {
        // Cached vectors are found again only by the model (its files, the device kind and the
        // precision it runs in) that made them.
        config.result_cache.model_version =
            model_version(&config.model_dir, config.device, embedder.precision()).with_context(
                || format!("cannot read the model at {}", config.model_dir.display()),
            )?;
    }
    warm_up(&embedder).await?;
    metrics.model_ready.set(1);
    readiness.pass(Check::Model);
    fleet_worker::run_with_readiness(
        &config,
        client.clone(),
        embedder,
        keys,
        metrics,
        &readiness,
        async {
            fleet_service::shutdown_signal().await;
            // A draining worker leaves discovery at once, as it turns not ready.
            discovery.stop().await;
        },
    )
    .await?;
    // Acks and results went out as requests and were confirmed; flush what is left on the wire,
    // bounded: with the connection gone a flush waits for a reconnect that may never come.
    match tokio::time::timeout(FINAL_FLUSH_WAIT, client.flush()).await {
        Ok(flushed) => flushed.context("cannot flush NATS connection")?,
        Err(_) => tracing::warn!("NATS did not take the last messages before the stop"),
    }
    Ok(())
}

/// How long a stopping worker waits for NATS to take what is left on the wire.
const FINAL_FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
