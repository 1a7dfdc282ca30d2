//! A worker's HTTP endpoints: a real `worker` process on the real model says it is alive at
//! once, ready only once its model is warm and the dispatcher's streams and its consumer are
//! there, what it runs (without secrets) on `/info`, and 404 elsewhere; an in-process worker is
//! not ready from the moment it starts draining until it ends.

// Shared with the pipeline tests, which use the rest of it.
#[allow(dead_code)]
mod support;

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use clap::Parser;
use fleet_keys::{FileSource, KeyStore, StoreOptions};
use fleet_schemas::Job;
use fleet_service::{Check, Endpoints, Readiness};
use fleet_tests::{
    NatsServer, Process, Signal, Streams, binary,
    http::{Serving, get},
    model_dir, write_tenants_file,
};
use fleet_worker::{Metrics, WorkerArgs, WorkerConfig};
use prometheus_client::registry::Registry;
use serde_json::json;
use support::{FakeEmbedder, MODEL};

const WAIT: Duration = Duration::from_secs(60);
/// Shown nowhere: the NATS token the worker is started with (the test server takes any).
const TOKEN: &str = "t0ken-never-shown";

/// The reasons `/ready` gives for not being ready; panics when it is ready.
async fn not_ready(addr: SocketAddr) -> Vec<String> {
    let answer = get(addr, "/ready").await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    serde_json::from_value(answer.json()["reasons"].clone()).expect("a list of reasons")
}

/// A `worker` process serving HTTP on a port of its choosing.
fn spawn_worker(server: &NatsServer, tenants: &std::path::Path) -> (Process, SocketAddr) {
    let mut command = Command::new(binary("worker"));
    command
        .args(["--nats-url", server.url(), "--tenants"])
        .arg(tenants)
        .arg("--model-dir")
        .arg(model_dir())
        .args([
            "--worker-name",
            "w-endpoints",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("NATS_TOKEN", TOKEN)
        .env("RUST_LOG", "warn,fleet_service::http=info");
    let worker = Serving::spawn("worker", command, WAIT);
    (worker.process, worker.addr)
}

#[tokio::test]
async fn a_worker_process_is_ready_once_its_model_is_warm_and_the_queue_is_there() {
    let server = NatsServer::start();
    let tenants = tempfile::tempdir().expect("temporary directory");
    let tenants_file = write_tenants_file(tenants.path(), &["acme"]);
    // No dispatcher has made the streams yet.
    let (mut worker, addr) = spawn_worker(&server, &tenants_file);

    // Its first answer: not ready, with no streams yet (and its model perhaps still loading).
    let first = not_ready(addr).await;
    assert!(
        first.contains(&"streams not checked yet".to_owned()),
        "{first:?}"
    );
    let health = get(addr, "/health").await;
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"alive": true}))
    );

    // Model loaded and warmed up: still not ready without the streams and the consumer.
    let started = Instant::now();
    loop {
        let reasons = not_ready(addr).await;
        if reasons == ["streams not checked yet", "consumer not bound yet"] {
            break;
        }
        assert!(started.elapsed() < WAIT, "model never warm: {reasons:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let info = get(addr, "/info").await;
    assert_eq!(
        (info.status, info.content_type.as_str()),
        (200, "application/json")
    );
    let info_json = info.json();
    assert_eq!(info_json["role"], "worker");
    assert_eq!(info_json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info_json["name"], "w-endpoints");
    assert_eq!(info_json["model"]["name"], "all-minilm-l6-v2");
    assert_eq!(info_json["limits"]["max_batch_size"], 32);
    assert_eq!(info_json["limits"]["max_batch_tokens"], 16384);
    assert_eq!(info_json["nats"]["url"], server.url());
    assert_eq!(info_json["nats"]["auth"], "token");
    assert!(!info.body.contains(TOKEN), "{}", info.body);

    let metrics = get(addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(
        metrics
            .body
            .contains("fleet_worker_ready{model=\"all-minilm-l6-v2\"} 0"),
        "{}",
        metrics.body
    );
    for path in ["/", "/metricsx", "/ready/now", "/v2/health/ready"] {
        assert_eq!(get(addr, path).await.status, 404, "{path}");
    }

    let _streams = Streams::create(&server).await;
    let started = Instant::now();
    while get(addr, "/ready").await.status != 200 {
        assert!(
            started.elapsed() < WAIT,
            "never ready: {:?}",
            not_ready(addr).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(addr, "/ready").await.json(), json!({"ready": true}));
    worker.signal(Signal::SIGTERM);
    assert_eq!(worker.wait_exit(WAIT), Some(0));
}

#[tokio::test]
async fn a_worker_is_not_ready_while_it_drains() {
    let server = NatsServer::start();
    let streams = Streams::create(&server).await;
    let tenants = tempfile::tempdir().expect("temporary directory");
    let tenants_file = write_tenants_file(tenants.path(), &["acme"]);
    let keys = KeyStore::start(FileSource::new(tenants_file), StoreOptions::default())
        .await
        .expect("key store");
    let args = [
        "worker",
        "--nats-url",
        server.url(),
        "--model",
        "fake-model",
    ]
    .into_iter()
    .chain(["--max-batch-tokens", "4096", "--max-delay", "0s"]);
    let config = WorkerConfig::from_args(WorkerArgs::try_parse_from(args).expect("arguments"))
        .expect("config");
    // Each batch takes a while, so the drain of a held job lasts long enough to be seen.
    let embedder = FakeEmbedder::new(16, 64);
    embedder.set_delay(Duration::from_secs(3));
    let readiness = Readiness::worker();
    // In the binary the model check passes once it is loaded and warm; the fake is warm.
    readiness.pass(Check::Model);
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry, MODEL);
    let addr = fleet_service::serve_http(
        "127.0.0.1:0".parse().unwrap(),
        Endpoints {
            registry: registry.into(),
            readiness: readiness.clone(),
            info: config.info(&Default::default(), "test tenants"),
        },
    )
    .await
    .expect("binds")
    .local_addr;
    let client = server.client().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn({
        let embedder = embedder.clone();
        let readiness = readiness.clone();
        async move {
            fleet_worker::run_with_readiness(
                &config,
                client,
                embedder,
                keys,
                metrics,
                &readiness,
                async {
                    let _ = stopped.await;
                },
            )
            .await
        }
    });
    let started = Instant::now();
    while get(addr, "/ready").await.status != 200 {
        assert!(
            started.elapsed() < WAIT,
            "never ready: {:?}",
            not_ready(addr).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let job = Job::embed("drained-1", "acme", "fake-model", vec!["hold me".into()], 0);
    streams.enqueue(&job, None).await;
    let started = Instant::now();
    while embedder.batches().is_empty() {
        assert!(started.elapsed() < WAIT, "the job never reached the model");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    // Draining: the job still runs, and the worker already turns new work away.
    let started = Instant::now();
    while get(addr, "/ready").await.status == 200 {
        assert!(started.elapsed() < Duration::from_secs(1), "still ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(not_ready(addr).await, ["draining"]);
    assert!(!worker.is_finished(), "the drain is still under way");
    tokio::time::timeout(WAIT, worker)
        .await
        .expect("drains in time")
        .expect("no panic")
        .expect("drains cleanly");
    assert!(
        streams.stored_result(&job).await.is_some(),
        "the held job was finished"
    );
    assert_eq!(not_ready(addr).await, ["draining"]);
}
