//! A `dispatcher` process's HTTP endpoints against a nats-server that demands a password: ready
//! once connected and subscribed, not ready as soon as NATS is gone, `/info` naming how it
//! authenticates but never the password, `/metrics` in OpenMetrics, 404 elsewhere; stopped while
//! NATS is gone, it still exits.

use std::{process::Command, time::Duration};

use fleet_tests::{
    NatsServer, Signal,
    http::{Serving, get, wait_ready_status},
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
const PASSWORD: &str = "pw-never-shown-7h2k";

#[tokio::test]
async fn a_dispatcher_serves_its_endpoints_and_never_shows_its_password() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("jetstream");
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "jetstream {{ store_dir: {store:?} }}\n\
             authorization {{ users = [ {{ user: \"fleet\", password: \"{PASSWORD}\" }} ] }}\n"
        ),
    )
    .unwrap();
    let mut nats = NatsServer::start_with_config(&conf);
    let tenants = fleet_tests::write_tenants_file(dir.path(), &["acme"]);
    let mut command = Command::new(env!("CARGO_BIN_EXE_dispatcher"));
    command
        .args(["--nats-url", nats.url(), "--nats-user", "fleet"])
        .args(["--metrics-addr", "127.0.0.1:0", "--name", "d-endpoints"])
        .arg("--tenants")
        .arg(&tenants)
        .env("NATS_PASSWORD", PASSWORD)
        .env("RUST_LOG", "warn,fleet_service::http=info")
        .env_remove("FLEET_CONFIG");
    let mut dispatcher = Serving::spawn("dispatcher", command, WAIT);
    let addr = dispatcher.addr;

    let ready = wait_ready_status(addr, 200, WAIT).await;
    assert_eq!(ready.content_type, "application/json");
    assert_eq!(ready.json(), json!({"ready": true}));
    let health = get(addr, "/health").await;
    assert_eq!(
        (health.status, health.json()),
        (200, json!({"alive": true}))
    );

    let info = get(addr, "/info").await;
    assert_eq!(info.status, 200);
    let info_json = info.json();
    assert_eq!(info_json["role"], "dispatcher");
    assert_eq!(info_json["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info_json["name"], "d-endpoints");
    assert_eq!(info_json["models"], json!(["all-minilm-l6-v2"]));
    assert_eq!(info_json["limits"]["max_inputs"], 256);
    assert_eq!(
        info_json["nats"],
        json!({
            "url": nats.url(),
            "auth": "user and password",
            "user": "fleet",
            "tls": false,
            "tls_client_certificate": false,
        })
    );
    assert!(!info.body.contains(PASSWORD), "{}", info.body);

    let metrics = get(addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metrics.content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(
        metrics.body.contains("# TYPE fleet_dispatcher_"),
        "{}",
        metrics.body
    );
    for path in ["/", "/metrics/", "/readyz", "/info/x"] {
        assert_eq!(get(addr, path).await.status, 404, "{path}");
    }

    // Without NATS it takes no work: not ready, though alive.
    nats.stop(Signal::SIGKILL);
    let gone = wait_ready_status(addr, 503, WAIT).await;
    let reasons = gone.json()["reasons"].clone();
    assert!(
        reasons.as_array().is_some_and(|reasons| reasons
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.starts_with("NATS")))),
        "{reasons}"
    );
    assert_eq!(get(addr, "/health").await.status, 200);
    assert!(dispatcher.process.is_running());
    // Stopped while NATS is gone, it still exits, and cleanly.
    dispatcher.process.signal(Signal::SIGTERM);
    assert_eq!(dispatcher.process.wait_exit(WAIT), Some(0));
    for line in dispatcher.log() {
        assert!(!line.contains(PASSWORD), "{line}");
    }
}
