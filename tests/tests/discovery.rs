//! NATS service discovery (`$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`, the `nats micro`
//! convention) with the real `dispatcher` and `worker` binaries: every running process answers
//! with its own id and metadata, a stopped one no longer does, and under the shipped broker
//! configuration operators see the fleet while tenants cannot ask.

use std::{
    collections::{BTreeSet, HashSet},
    net::SocketAddr,
    path::Path,
    time::Duration,
};

use async_nats::{Client, Event, ServerError};
use fleet_schemas::DEFAULT_MODEL;
use fleet_tests::{
    NatsServer, Process, Signal, eventually, http, model_dir, shipped_broker::ShippedBroker,
    write_tenants_file,
};
use futures::StreamExt;
use serde_json::Value;

/// How long the answers to one discovery request are gathered (every instance answers once).
const GATHER: Duration = Duration::from_millis(500);
/// Processes start in parallel with other tests on a busy machine.
const STARTUP: Duration = Duration::from_secs(120);

/// Sends one discovery request and returns every answer that came within [`GATHER`].
async fn ask(client: &Client, subject: &str) -> Vec<Value> {
    let inbox = client.new_inbox();
    // Subscribed before the request is sent: the server handles one connection in order.
    let mut replies = client.subscribe(inbox.clone()).await.expect("subscribe");
    client
        .publish_with_reply(subject.to_owned(), inbox, "".into())
        .await
        .expect("publish");
    let mut answers = Vec::new();
    let deadline = tokio::time::Instant::now() + GATHER;
    while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, replies.next()).await {
        // With nobody listening the server says "no responders" (a status, no payload).
        if reply.status.is_some() {
            continue;
        }
        answers.push(serde_json::from_slice(&reply.payload).expect("a JSON answer"));
    }
    answers
}

/// Asks until exactly `count` instances answer.
async fn ask_until(client: &Client, subject: &str, count: usize) -> Vec<Value> {
    eventually(STARTUP, &format!("{count} answers to {subject}"), || {
        let client = client.clone();
        async move {
            let answers = ask(&client, subject).await;
            (answers.len() == count).then_some(answers)
        }
    })
    .await
}

/// (service, process name) of each answer.
fn who(answers: &[Value]) -> BTreeSet<(String, String)> {
    answers
        .iter()
        .map(|answer| {
            (
                answer["name"].as_str().unwrap_or_default().to_owned(),
                answer["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

fn set(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs
        .iter()
        .map(|(service, name)| (service.to_string(), name.to_string()))
        .collect()
}

/// The answer of the process called `name`.
fn of<'a>(answers: &'a [Value], name: &str) -> &'a Value {
    answers
        .iter()
        .find(|answer| answer["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no answer from {name}: {answers:?}"))
}

fn http_addr(answer: &Value) -> SocketAddr {
    answer["metadata"]["http"]
        .as_str()
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP address in {answer}"))
}

fn spawn(dir: &Path, binary: &str, name: &str, args: &[String]) -> Process {
    let log = dir.join(format!("{name}.log"));
    Process::spawn_binary_logged(binary, args, &[("RUST_LOG", "warn")], &log)
}

fn dispatcher_args(name: &str, tenants: &Path) -> Vec<String> {
    let tenants = tenants.to_string_lossy();
    [
        "--tenants",
        &tenants,
        "--name",
        name,
        "--metrics-addr",
        "127.0.0.1:0",
    ]
    .map(str::to_owned)
    .to_vec()
}

fn worker_args(name: &str, tenants: &Path) -> Vec<String> {
    let (tenants, model) = (tenants.to_string_lossy(), model_dir());
    [
        "--tenants",
        &tenants,
        "--model-dir",
        &model.to_string_lossy(),
        "--worker-name",
        name,
        "--metrics-addr",
        "127.0.0.1:0",
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_running_dispatcher_and_worker_answers_ping_info_and_stats() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let tenants = write_tenants_file(dir.path(), &["acme"]);
    let url = ["--nats-url".to_owned(), nats.url().to_owned()];
    let with_url = |args: Vec<String>| [url.to_vec(), args].concat();
    let mut processes: Vec<(&str, Process)> = Vec::new();
    for name in ["dispatcher-a", "dispatcher-b"] {
        let args = with_url(dispatcher_args(name, &tenants));
        processes.push((name, spawn(dir.path(), "dispatcher", name, &args)));
    }
    for name in ["worker-a", "worker-b"] {
        let args = with_url(worker_args(name, &tenants));
        processes.push((name, spawn(dir.path(), "worker", name, &args)));
    }
    let client = nats.client().await;
    let version = env!("CARGO_PKG_VERSION");

    let pings = ask_until(&client, "$SRV.PING", 4).await;
    assert_eq!(
        who(&pings),
        set(&[
            ("fleet-dispatcher", "dispatcher-a"),
            ("fleet-dispatcher", "dispatcher-b"),
            ("fleet-worker", "worker-a"),
            ("fleet-worker", "worker-b"),
        ])
    );
    let ids: HashSet<&str> = pings.iter().filter_map(|p| p["id"].as_str()).collect();
    assert_eq!(
        ids.len(),
        4,
        "every process answers with an id of its own: {pings:?}"
    );
    for ping in &pings {
        assert_eq!(ping["type"], "io.nats.micro.v1.ping_response");
        assert_eq!(ping["version"], version);
        // The address in the metadata is the process's own HTTP endpoints.
        assert_eq!(http::get(http_addr(ping), "/health").await.status, 200);
    }
    for name in ["dispatcher-a", "dispatcher-b"] {
        let metadata = &of(&pings, name)["metadata"];
        assert_eq!(metadata["models"], DEFAULT_MODEL);
        assert_eq!(metadata["subjects"], "fleet.infer.*,fleet.submit.*");
        assert_eq!(metadata["queue_group"], "dispatchers");
    }
    for name in ["worker-a", "worker-b"] {
        let metadata = &of(&pings, name)["metadata"];
        assert_eq!(metadata["model"], DEFAULT_MODEL);
        assert_eq!(metadata["device"], "cpu");
        assert_eq!(
            metadata["consumer"],
            format!("fleet-worker-{DEFAULT_MODEL}")
        );
    }

    // By service name, then by instance id.
    let dispatchers = ask(&client, "$SRV.PING.fleet-dispatcher").await;
    assert_eq!(
        who(&dispatchers),
        set(&[
            ("fleet-dispatcher", "dispatcher-a"),
            ("fleet-dispatcher", "dispatcher-b")
        ])
    );
    let worker_a = of(&pings, "worker-a")["id"].as_str().unwrap().to_owned();
    let info = ask(&client, &format!("$SRV.INFO.fleet-worker.{worker_a}")).await;
    assert_eq!(who(&info), set(&[("fleet-worker", "worker-a")]));
    assert_eq!(info[0]["type"], "io.nats.micro.v1.info_response");
    assert_eq!(info[0]["id"], worker_a.as_str());
    assert_eq!(info[0]["version"], version);
    assert!(!info[0]["description"].as_str().unwrap().is_empty());
    assert_eq!(info[0]["endpoints"], serde_json::json!([]));
    let infos = ask(&client, "$SRV.INFO").await;
    assert_eq!(who(&infos), who(&pings));

    // STATS has no name in its metadata (the library sends none): matched by id.
    let stats = ask(&client, "$SRV.STATS").await;
    let stats_ids: HashSet<&str> = stats.iter().filter_map(|s| s["id"].as_str()).collect();
    assert_eq!(stats_ids, ids);
    for answer in &stats {
        assert_eq!(answer["type"], "io.nats.micro.v1.stats_response");
        assert!(answer["started"].as_str().is_some_and(|s| !s.is_empty()));
        assert_eq!(answer["endpoints"], serde_json::json!([]));
    }

    // One dispatcher and one worker stop (the worker serving, so it goes through its drain):
    // they no longer answer, the others still do.
    http::wait_ready_status(http_addr(of(&pings, "worker-a")), 200, STARTUP).await;
    for (name, process) in &mut processes {
        if name.ends_with("-a") {
            process.signal(Signal::SIGTERM);
            assert_eq!(
                process.wait_exit(Duration::from_secs(60)),
                Some(0),
                "{name}"
            );
        }
    }
    let left = ask(&client, "$SRV.PING").await;
    assert_eq!(
        who(&left),
        set(&[
            ("fleet-dispatcher", "dispatcher-b"),
            ("fleet-worker", "worker-b")
        ])
    );
}

/// Connects to the shipped broker as user `name` (a tenant with its own inbox prefix), with the
/// server's refusals sent to `errors`.
async fn connect(
    broker: &ShippedBroker,
    name: &str,
    errors: tokio::sync::mpsc::UnboundedSender<String>,
) -> Client {
    let mut options = broker
        .tls()
        .nkey(broker.seed(name))
        .event_callback(move |event| {
            let errors = errors.clone();
            async move {
                if let Event::ServerError(ServerError::Other(message)) = event {
                    let _ = errors.send(message.to_lowercase());
                }
            }
        });
    if broker.is_tenant(name) {
        options = options.custom_inbox_prefix(format!("_INBOX.{name}"));
    }
    broker.server.connect_with(options).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_shipped_config_operators_see_the_fleet_and_tenants_cannot_ask() {
    // Each user named after its role, the tenant acme.
    let broker = ShippedBroker::start(&[
        ("dispatcher", "dispatcher"),
        ("worker", "worker"),
        ("operator", "operator"),
        ("tenant", "acme"),
    ]);
    let tenants = write_tenants_file(broker.dir.path(), &["acme"]);
    let dir = broker.dir.path();
    let args = [
        broker.process_args("dispatcher"),
        dispatcher_args("dispatcher-1", &tenants),
    ]
    .concat();
    let _dispatcher = spawn(dir, "dispatcher", "dispatcher-1", &args);
    let args = [
        broker.process_args("worker"),
        worker_args("worker-1", &tenants),
    ]
    .concat();
    let _worker = spawn(dir, "worker", "worker-1", &args);

    let (errors_tx, mut errors) = tokio::sync::mpsc::unbounded_channel();
    let operator = connect(&broker, "operator", errors_tx.clone()).await;
    let expected = set(&[
        ("fleet-dispatcher", "dispatcher-1"),
        ("fleet-worker", "worker-1"),
    ]);
    assert_eq!(who(&ask_until(&operator, "$SRV.PING", 2).await), expected);
    assert_eq!(who(&ask(&operator, "$SRV.INFO").await), expected);
    assert_eq!(ask(&operator, "$SRV.STATS").await.len(), 2);

    // Tenants live in another account, which neither imports nor may publish `$SRV.*`: the
    // server refuses the request and nothing answers; listening to it is refused too.
    let tenant = connect(&broker, "acme", errors_tx).await;
    let _listening = tenant.subscribe("$SRV.>").await.unwrap();
    for subject in ["$SRV.PING", "$SRV.INFO.fleet-worker", "$SRV.STATS"] {
        assert!(ask(&tenant, subject).await.is_empty(), "{subject} answered");
    }
    let mut refused = Vec::new();
    while let Ok(Some(error)) = tokio::time::timeout(GATHER, errors.recv()).await {
        refused.push(error);
    }
    for wanted in [
        "permissions violation for subscription to \"$srv.>\"",
        "permissions violation for publish to \"$srv.ping\"",
        "permissions violation for publish to \"$srv.stats\"",
    ] {
        assert!(
            refused.iter().any(|e| e == wanted),
            "{wanted} not in {refused:?}"
        );
    }

    // The processes themselves were refused nothing.
    for name in ["dispatcher-1", "worker-1"] {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap();
        assert!(
            !log.to_lowercase().contains("permissions violation"),
            "{name} was refused a subject: {log}"
        );
    }
}
