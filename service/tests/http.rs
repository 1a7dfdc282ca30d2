//! The HTTP endpoints every Fleet process serves, on a real socket and with a real nats-server:
//! what each path answers, when `/ready` says yes, and that `/info` shows no secret.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use fleet_service::{Check, Endpoints, Info, NatsArgs, Readiness, nats_summary, serve_http};
use fleet_tests::{
    NatsServer, Signal,
    http::{get, request},
};
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use serde_json::{Value, json};

fn info(details: Value) -> Info {
    Info {
        role: "worker",
        version: env!("CARGO_PKG_VERSION"),
        name: "w-1".into(),
        details,
    }
}

async fn serve(registry: Registry, readiness: &Readiness, info: Info) -> SocketAddr {
    serve_http(
        "127.0.0.1:0".parse().unwrap(),
        Endpoints {
            registry: Arc::new(registry),
            readiness: readiness.clone(),
            info,
        },
    )
    .await
    .expect("binds")
    .local_addr
}

async fn reasons(addr: SocketAddr) -> Vec<String> {
    let answer = get(addr, "/ready").await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.content_type, "application/json");
    let body = answer.json();
    assert_eq!(body["ready"], false);
    body["reasons"]
        .as_array()
        .expect("reasons")
        .iter()
        .map(|reason| reason.as_str().expect("text").to_owned())
        .collect()
}

#[tokio::test]
async fn ready_only_when_connected_every_check_passed_and_not_draining() {
    let mut server = NatsServer::start();
    let readiness = Readiness::worker();
    let addr = serve(Registry::default(), &readiness, info(json!({}))).await;

    assert_eq!(
        reasons(addr).await,
        [
            "not connected to NATS yet",
            "streams not checked yet",
            "consumer not bound yet",
            "model not loaded and warmed up yet"
        ]
    );
    readiness.watch_nats(&server.client().await);
    readiness.pass(Check::Streams);
    readiness.pass(Check::Consumer);
    // Connected, streams and consumer checked: a worker whose model still loads is not ready.
    assert_eq!(reasons(addr).await, ["model not loaded and warmed up yet"]);

    readiness.pass(Check::Model);
    let ready = get(addr, "/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json(), json!({"ready": true}));

    // A lost connection shows at once, without anyone telling the readiness.
    server.stop(Signal::SIGKILL);
    let started = Instant::now();
    loop {
        let answer = get(addr, "/ready").await;
        if answer.status == 503 {
            assert_eq!(answer.json()["reasons"], json!(["NATS disconnected"]));
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "still ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn draining_is_not_ready_and_health_stays_ok() {
    let server = NatsServer::start();
    let readiness = Readiness::dispatcher();
    let addr = serve(Registry::default(), &readiness, info(json!({}))).await;
    readiness.watch_nats(&server.client().await);
    readiness.pass(Check::Streams);
    assert_eq!(reasons(addr).await, ["not subscribed yet"]);
    readiness.pass(Check::Subscriptions);
    assert_eq!(get(addr, "/ready").await.status, 200);

    readiness.drain();
    assert_eq!(reasons(addr).await, ["draining"]);
    let health = get(addr, "/health").await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), json!({"alive": true}));
}

#[tokio::test]
async fn metrics_info_and_unknown_paths() {
    let mut registry = Registry::default();
    let jobs = Counter::<u64>::default();
    registry.register("fleet_test_jobs", "Jobs seen by the test", jobs.clone());
    jobs.inc_by(3);
    let readiness = Readiness::worker();
    let addr = serve(
        registry,
        &readiness,
        info(json!({"limits": {"max_batch_size": 32}})),
    )
    .await;

    let metrics = get(addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(
        metrics.body.contains("fleet_test_jobs_total 3"),
        "{}",
        metrics.body
    );
    assert!(metrics.body.ends_with("# EOF\n"), "{}", metrics.body);

    let info = get(addr, "/info").await;
    assert_eq!(info.status, 200);
    assert_eq!(info.content_type, "application/json");
    assert_eq!(
        info.json(),
        json!({
            "role": "worker",
            "version": env!("CARGO_PKG_VERSION"),
            "name": "w-1",
            "limits": {"max_batch_size": 32},
        })
    );

    for path in [
        "/",
        "/metric",
        "/metrics/x",
        "/ready/",
        "/healthz",
        "/info.json",
    ] {
        assert_eq!(get(addr, path).await.status, 404, "{path}");
    }
    assert_eq!(request(addr, "POST", "/ready").await.status, 405);
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
}

#[test]
fn the_nats_summary_names_the_way_of_authenticating_never_the_secret() {
    let summary = |args: &[&str]| {
        let Cli { nats } =
            Cli::try_parse_from(std::iter::once("fleet").chain(args.iter().copied()))
                .expect("valid arguments");
        nats_summary(&nats.nats_url, &nats.auth)
    };
    let token = summary(&[
        "--nats-url",
        "tls://a:4222,nats://b:4222",
        "--nats-token",
        "t0ken-SECRET",
    ]);
    assert_eq!(
        token,
        json!({
            "url": "tls://a:4222,nats://b:4222",
            "auth": "token",
            "user": null,
            "tls": true,
            "tls_client_certificate": false,
        })
    );
    let password = summary(&["--nats-user", "fleet", "--nats-password", "pa55-SECRET"]);
    assert_eq!(password["auth"], "user and password");
    assert_eq!(password["user"], "fleet");
    let in_url = summary(&["--nats-url", "nats://fleet:url-SECRET@h:4222"]);
    assert_eq!(in_url["auth"], "in the URL");
    assert_eq!(in_url["url"], "nats://h:4222");
    for shown in [token, password, in_url] {
        assert!(!shown.to_string().contains("SECRET"), "{shown}");
    }
}
