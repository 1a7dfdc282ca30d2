//! A `dispatcher` process's HTTP endpoints against a nats-server that demands a password: ready
//! once connected and subscribed, not ready as soon as NATS is gone, `/info` naming how it
//! authenticates but never the password, `/metrics` in OpenMetrics, 404 elsewhere.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use fleet_tests::{NatsServer, Process, Signal};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);
const PASSWORD: &str = "pw-never-shown-7h2k";

struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// `GET path`; the server closes the connection after its answer.
async fn get(addr: SocketAddr, path: &str) -> Answer {
    let mut socket = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: dispatcher\r\n\r\n").as_bytes())
        .await
        .expect("sends");
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(5), socket.read_to_string(&mut response))
        .await
        .expect("answered in time")
        .expect("reads");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    Answer {
        status: head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head}")),
        content_type: head
            .lines()
            .find_map(|line| line.strip_prefix("content-type: "))
            .unwrap_or_default()
            .to_owned(),
        body: body.to_owned(),
    }
}

/// Polls `/ready` until it answers `status`; returns that answer.
async fn wait_ready_status(addr: SocketAddr, status: u16) -> Answer {
    let started = Instant::now();
    loop {
        let answer = get(addr, "/ready").await;
        if answer.status == status {
            return answer;
        }
        assert!(
            started.elapsed() < WAIT,
            "/ready never answered {status}: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

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
    let mut child = Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(["--nats-url", nats.url(), "--nats-user", "fleet"])
        .args(["--metrics-addr", "127.0.0.1:0", "--name", "d-endpoints"])
        .arg("--tenants")
        .arg(&tenants)
        .env("NATS_PASSWORD", PASSWORD)
        .env("RUST_LOG", "warn,fleet_service::http=info")
        .env_remove("FLEET_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // The dispatcher binds port 0 and logs where; its log keeps being read so it never blocks.
    let stdout = child.stdout.take().expect("piped stdout");
    let (found, address) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            assert!(!line.contains(PASSWORD), "{line}");
            let addr = serde_json::from_str::<Value>(&line).ok().and_then(|log| {
                log["fields"]["local_addr"]
                    .as_str()
                    .and_then(|addr| addr.parse::<SocketAddr>().ok())
            });
            if let Some(addr) = addr {
                let _ = found.send(addr);
            }
        }
    });
    let mut dispatcher = Process::adopt("dispatcher", child);
    let addr: SocketAddr = address
        .recv_timeout(WAIT)
        .expect("the dispatcher logs where it serves HTTP");

    let ready = wait_ready_status(addr, 200).await;
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
    let gone = wait_ready_status(addr, 503).await;
    let reasons = gone.json()["reasons"].clone();
    assert!(
        reasons.as_array().is_some_and(|reasons| reasons
            .iter()
            .any(|r| r.as_str().is_some_and(|r| r.starts_with("NATS")))),
        "{reasons}"
    );
    assert_eq!(get(addr, "/health").await.status, 200);
    assert!(dispatcher.is_running());
}
