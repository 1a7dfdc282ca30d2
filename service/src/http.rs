//! The HTTP endpoints every Fleet process serves on `--metrics-addr`: `/metrics` (OpenMetrics),
//! `/health` (the process runs), `/ready` (it may be sent work), `/info` (version, model, limits,
//! settings without secrets). Every other path is 404. axum routes; hyper serves each
//! connection, one request per connection, so a silent or slow peer is cut off after a bound.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use prometheus_client::{encoding::text::encode, registry::Registry};
use serde_json::{Map, Value, json};
use tokio::{net::TcpListener, sync::Semaphore};

use crate::{NatsAuthArgs, redact_url};

/// How long one connection may take, from accept to close: a peer that connects and sends
/// nothing must not hold a task and a file descriptor for good.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait to be accepted.
const MAX_CONNECTIONS: usize = 32;
/// Pause after a failed accept (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const JSON: &str = "application/json";

/// A step a process must have completed before it may be sent work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Fleet's streams exist with the settings asked for.
    Streams,
    /// The worker's durable consumer is bound and its settings verified.
    Consumer,
    /// The dispatcher's queue-group subscriptions are registered with the server.
    Subscriptions,
    /// The model is loaded and has run one forward pass.
    Model,
}

impl Check {
    const ALL: [Check; 4] = [
        Check::Streams,
        Check::Consumer,
        Check::Subscriptions,
        Check::Model,
    ];

    fn bit(self) -> u8 {
        1 << self as u8
    }

    fn pending(self) -> &'static str {
        match self {
            Check::Streams => "streams not checked yet",
            Check::Consumer => "consumer not bound yet",
            Check::Subscriptions => "not subscribed yet",
            Check::Model => "model not loaded and warmed up yet",
        }
    }
}

/// Whether a process may be sent work, as `/ready` reports it: connected to NATS (asked of the
/// client at each request, so a lost connection shows at once), every required [`Check`] passed,
/// and not draining. Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<ReadinessInner>,
}

struct ReadinessInner {
    required: u8,
    passed: AtomicU8,
    draining: AtomicBool,
    nats: OnceLock<async_nats::Client>,
}

impl Readiness {
    /// Not ready until NATS is connected and every check in `required` has passed.
    pub fn new(required: &[Check]) -> Readiness {
        Readiness {
            inner: Arc::new(ReadinessInner {
                required: required.iter().fold(0, |bits, check| bits | check.bit()),
                passed: AtomicU8::new(0),
                draining: AtomicBool::new(false),
                nats: OnceLock::new(),
            }),
        }
    }

    /// What a worker needs: streams, its consumer and a warm model.
    pub fn worker() -> Readiness {
        Readiness::new(&[Check::Streams, Check::Consumer, Check::Model])
    }

    /// What a dispatcher needs: streams and its subscriptions.
    pub fn dispatcher() -> Readiness {
        Readiness::new(&[Check::Streams, Check::Subscriptions])
    }

    /// Readiness follows this client's connection state from now on.
    pub fn watch_nats(&self, client: &async_nats::Client) {
        // Each process has one client; a second call changes nothing.
        let _ = self.inner.nats.set(client.clone());
    }

    pub fn pass(&self, check: Check) {
        self.inner.passed.fetch_or(check.bit(), Ordering::Release);
    }

    /// Not ready from now on: the process stops taking work (SIGTERM, or a model it stopped
    /// trusting) and finishes or hands back what it holds.
    pub fn drain(&self) {
        self.inner.draining.store(true, Ordering::Release);
    }

    /// `Ok` when ready, otherwise every reason it is not.
    pub fn status(&self) -> Result<(), Vec<String>> {
        let inner = &self.inner;
        let mut reasons = Vec::new();
        if inner.draining.load(Ordering::Acquire) {
            reasons.push("draining".to_owned());
        }
        match inner.nats.get().map(|client| client.connection_state()) {
            Some(async_nats::connection::State::Connected) => {}
            Some(state) => reasons.push(format!("NATS {state}")),
            None => reasons.push("not connected to NATS yet".to_owned()),
        }
        let passed = inner.passed.load(Ordering::Acquire);
        reasons.extend(
            Check::ALL
                .iter()
                .filter(|check| inner.required & check.bit() != 0 && passed & check.bit() == 0)
                .map(|check| check.pending().to_owned()),
        );
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons)
        }
    }
}

/// What `/info` shows. Everything in it is visible to anyone who can reach the port: it must
/// hold no secret (no credentials, tokens, key material; URLs through [`redact_url`]).
pub struct Info {
    /// `dispatcher` or `worker`.
    pub role: &'static str,
    /// The binary's version (its `CARGO_PKG_VERSION`).
    pub version: &'static str,
    /// The process's name in logs and results.
    pub name: String,
    /// The role's own fields (model, limits, settings), as a JSON object whose fields join the
    /// ones above.
    pub details: Value,
}

impl Info {
    fn render(self) -> String {
        let mut object = Map::new();
        object.insert("role".into(), self.role.into());
        object.insert("version".into(), self.version.into());
        object.insert("name".into(), self.name.into());
        match self.details {
            Value::Object(details) => object.extend(details),
            other => {
                object.insert("details".into(), other);
            }
        }
        Value::Object(object).to_string()
    }
}

/// How a process reaches NATS, fit for `/info`: the URL without credentials, which way it
/// authenticates (never with what), and whether TLS is on.
pub fn nats_summary(url: &str, auth: &NatsAuthArgs) -> Value {
    let method = if auth.nats_creds.is_some() {
        "credentials file"
    } else if auth.nats_nkey_file.is_some() {
        "nkey"
    } else if auth.nats_user.is_some() {
        "user and password"
    } else if auth.nats_token.is_some() || auth.nats_token_file.is_some() {
        "token"
    } else if url.contains('@') {
        // Only user information puts an `@` into a NATS URL.
        "in the URL"
    } else {
        "none"
    };
    let tls = auth.nats_tls
        || auth.nats_tls_ca.is_some()
        || auth.nats_tls_cert.is_some()
        || url.split(',').any(|url| url.trim().starts_with("tls://"));
    json!({
        "url": redact_url(url),
        "auth": method,
        "user": auth.nats_user,
        "tls": tls,
        "tls_client_certificate": auth.nats_tls_cert.is_some(),
    })
}

/// What the endpoints serve.
pub struct Endpoints {
    pub registry: Arc<Registry>,
    pub readiness: Readiness,
    pub info: Info,
}

/// A bound HTTP server; the address is known before serving starts (port 0 works).
pub struct HttpServer {
    pub local_addr: SocketAddr,
}

/// Serves the endpoints on `addr` until the process ends.
pub async fn serve_http(addr: SocketAddr, endpoints: Endpoints) -> std::io::Result<HttpServer> {
    serve_within(addr, endpoints, CONNECTION_TIMEOUT).await
}

struct Served {
    registry: Arc<Registry>,
    readiness: Readiness,
    info: String,
}

async fn serve_within(
    addr: SocketAddr,
    endpoints: Endpoints,
    connection_timeout: Duration,
) -> std::io::Result<HttpServer> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/info", get(info))
        .with_state(Arc::new(Served {
            registry: endpoints.registry,
            readiness: endpoints.readiness,
            info: endpoints.info.render(),
        }));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let socket = match listener.accept().await {
                Ok((socket, _)) => socket,
                Err(error) => {
                    tracing::warn!(%error, "HTTP endpoint cannot accept");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            let service = TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(socket), service);
                let _ = tokio::time::timeout(connection_timeout, connection).await;
                drop(slot);
            });
        }
    });
    tracing::info!(%local_addr, "serving /metrics, /health, /ready, /info");
    Ok(HttpServer { local_addr })
}

async fn metrics(State(served): State<Arc<Served>>) -> Response {
    let mut body = String::new();
    match encode(&mut body, &served.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, OPENMETRICS)], body).into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn health() -> Response {
    json_response(StatusCode::OK, json!({"alive": true}).to_string())
}

async fn ready(State(served): State<Arc<Served>>) -> Response {
    match served.readiness.status() {
        Ok(()) => json_response(StatusCode::OK, json!({"ready": true}).to_string()),
        Err(reasons) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"ready": false, "reasons": reasons}).to_string(),
        ),
    }
}

async fn info(State(served): State<Arc<Served>>) -> Response {
    json_response(StatusCode::OK, served.info.clone())
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, JSON)], body).into_response()
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;

    #[tokio::test]
    async fn a_silent_peer_is_cut_off_and_others_are_still_served() {
        let endpoints = Endpoints {
            registry: Arc::new(Registry::default()),
            readiness: Readiness::worker(),
            info: Info {
                role: "test",
                version: "0",
                name: "test".into(),
                details: json!({}),
            },
        };
        let server = serve_within(
            "127.0.0.1:0".parse().unwrap(),
            endpoints,
            Duration::from_millis(200),
        )
        .await
        .expect("binds");
        let mut silent: Vec<TcpStream> = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            silent.push(
                TcpStream::connect(server.local_addr)
                    .await
                    .expect("connects"),
            );
        }
        // Every connection slot is held by a silent peer; each is closed after the timeout.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), silent[0].read_to_end(&mut rest))
            .await
            .expect("the silent peer is closed");
        assert!(closed.is_ok());
        let mut scrape = TcpStream::connect(server.local_addr)
            .await
            .expect("connects");
        scrape
            .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(5), scrape.read_to_string(&mut response))
            .await
            .expect("served once the silent peers are gone")
            .unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    }
}
