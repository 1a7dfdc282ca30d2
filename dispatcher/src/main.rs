use std::{collections::HashMap, sync::Arc};

use anyhow::Context;
use fleet_dispatcher::{Dispatcher, DispatcherConfig};
use fleet_schemas::subject;
use fleet_service::{Check, DISPATCHER_SERVICE, Discovery, Endpoints, Logging, Readiness};
use prometheus_client::registry::Registry;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: DispatcherConfig = fleet_service::load_config_or_exit();
    let logging = fleet_service::init_logging(&config.log, "dispatcher")?;
    let served = serve(config, &logging).await;
    // The last lines (why it stopped) still reach Elasticsearch.
    logging.shutdown().await;
    served
}

async fn serve(config: DispatcherConfig, logging: &Logging) -> anyhow::Result<()> {
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
    logging.register(&mut registry);
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
    let http = fleet_service::serve_http(config.metrics_addr, endpoints)
        .await
        .with_context(|| format!("cannot serve HTTP on {}", config.metrics_addr))?;
    // Listed from now until the drain begins (see `fleet_dispatcher::service` for why it is
    // registered for discovery only).
    let metadata = HashMap::from([
        ("name".to_owned(), config.name.clone()),
        ("models".to_owned(), config.models.join(",")),
        (
            "subjects".to_owned(),
            [subject::INFER_WILDCARD, subject::SUBMIT_WILDCARD].join(","),
        ),
        (
            "queue_group".to_owned(),
            subject::DISPATCHER_QUEUE_GROUP.to_owned(),
        ),
        ("http".to_owned(), http.local_addr.to_string()),
    ]);
    let discovery = Discovery::register(
        &dispatcher.client,
        DISPATCHER_SERVICE,
        env!("CARGO_PKG_VERSION"),
        "Fleet dispatcher: verifies signed jobs and queues them on JetStream",
        metadata,
    )
    .await?;
    // Refuses an `infer` for a model nobody serves once it knows (see `fleet_dispatcher::workers`).
    let watching = dispatcher
        .workers
        .watch(dispatcher.client.clone(), config.worker_watch())
        .await?;
    let listening = dispatcher.listen().await?;
    readiness.pass(Check::Subscriptions);
    listening
        .run(async {
            fleet_service::shutdown_signal().await;
            readiness.drain();
            // A draining dispatcher leaves discovery at once, as it turns not ready.
            discovery.stop().await;
        })
        .await;
    watching.abort();
    Ok(())
}
