//! Logs and traces with the real `dispatcher` and `worker` processes: one job's lines carry its
//! id and the trace id of the `traceparent` its client sent, in both processes, and its stored
//! result keeps that trace; a bad `traceparent` starts a new trace and refuses nothing; a lost
//! connection is a warning naming the server; `--log-format text` is for people.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use fleet_client::{Tenant, TraceParent};
use fleet_schemas::{JobResult, ResultStatus, decode, subject};
use fleet_tests::{
    NatsServer, Process, Signal, Streams, TestTenant, eventually, model_dir, write_tenants_file,
};
use serde_json::Value;

const MODEL: &str = "all-minilm-l6-v2";
/// The worker loads the real model, on a machine busy with other tests.
const STARTUP: Duration = Duration::from_secs(180);
const WAIT: Duration = Duration::from_secs(30);
/// Every job line is written at debug; the rest at info.
const RUST_LOG: &str = "info,fleet_dispatcher=debug,fleet_worker=debug";

fn spawn(dir: &Path, binary: &str, args: &[String], env: &[(&str, &str)]) -> (Process, PathBuf) {
    let log = dir.join(format!("{binary}.log"));
    let process = Process::spawn_binary_logged(binary, args, env, &log);
    (process, log)
}

fn args(nats: &NatsServer, tenants: &Path, extra: &[&str]) -> Vec<String> {
    let tenants = tenants.to_string_lossy();
    ["--nats-url", nats.url(), "--tenants", &tenants]
        .into_iter()
        .chain(["--metrics-addr", "127.0.0.1:0"])
        .chain(extra.iter().copied())
        .map(str::to_owned)
        .collect()
}

/// Every line of a log written as JSON (stdout not a terminal: `auto` means JSON).
fn json_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect()
}

/// The lines that name `job_id` anywhere; each must carry it (and `trace_id`) in its span.
fn lines_about(log: &Path, job_id: &str, trace_id: &str) -> Vec<Value> {
    let lines: Vec<Value> = json_lines(log)
        .into_iter()
        .filter(|line| line.to_string().contains(job_id))
        .collect();
    for line in &lines {
        assert_eq!(line["span"]["job_id"], job_id, "{line}");
        assert_eq!(line["span"]["trace_id"], trace_id, "{line}");
    }
    lines
}

async fn wait_lines(log: &Path, job_id: &str, trace_id: &str, message: &str) -> Vec<Value> {
    eventually(
        WAIT,
        &format!("{message:?} about {job_id} in {log:?}"),
        || {
            let lines = lines_about(log, job_id, trace_id);
            let found = lines.iter().any(|l| l["fields"]["message"] == message);
            async move { found.then_some(lines) }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_jobs_lines_share_its_id_and_trace_from_client_to_stored_result() {
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let tenants = write_tenants_file(dir.path(), &["demo"]);
    let env = [("RUST_LOG", RUST_LOG)];
    let (_dispatcher, dispatcher_log) =
        spawn(dir.path(), "dispatcher", &args(&nats, &tenants, &[]), &env);
    let model = model_dir().to_string_lossy().into_owned();
    let worker_args = args(&nats, &tenants, &["--model-dir", &model]);
    let (_worker, worker_log) = spawn(dir.path(), "worker", &worker_args, &env);
    let demo = TestTenant::new("demo");
    let tenant = Tenant {
        name: demo.name,
        key: demo.key,
    };
    let client = nats.tenant_client(&tenant.name).await;

    // Until the fleet answers (no dispatcher yet, the model loading): fresh jobs, new traces.
    eventually(STARTUP, "a first answer", || {
        let job = tenant.embed_job(MODEL, vec!["warm up".into()]);
        let (client, tenant) = (client.clone(), &tenant);
        async move {
            let result = fleet_client::infer(&client, tenant, &job, Duration::from_secs(10)).await;
            result.ok().filter(|r| r.status == ResultStatus::Ok)
        }
    })
    .await;

    // A job sent in a known trace.
    let trace = TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .expect("a valid traceparent");
    let trace_id = trace.trace_id();
    let job = tenant.embed_job(MODEL, vec!["one traced job".into()]);
    let result = fleet_client::infer_in_trace(&client, &tenant, &job, WAIT, &trace)
        .await
        .expect("an answer");
    assert_eq!(result.status, ResultStatus::Ok, "{result:?}");

    // The dispatcher's lines about it: admitted in its span, with the caller's trace.
    let admitted = wait_lines(&dispatcher_log, &job.job_id, &trace_id, "job queued").await;
    let span = &admitted.last().expect("a line")["span"];
    assert_eq!(span["tenant"], "demo", "{span}");
    assert_eq!(span["model"], MODEL, "{span}");
    assert_eq!(span["key_id"], tenant.key.key_id, "{span}");
    // The worker's: the same trace, with the delivery count and the key.
    let ran = wait_lines(&worker_log, &job.job_id, &trace_id, "result stored").await;
    let span = &ran.last().expect("a line")["span"];
    assert_eq!(span["tenant"], "demo", "{span}");
    assert_eq!(span["model"], MODEL, "{span}");
    assert_eq!(span["key_id"], tenant.key.key_id, "{span}");
    assert_eq!(span["delivered"], 1, "{span}");
    // The stored result keeps the trace (a child of the dispatcher's hop).
    let streams = Streams::connect(&nats).await;
    let stored = streams
        .stored_result_message(&job)
        .await
        .expect("a stored result");
    let stored_trace = stored
        .headers
        .get(subject::TRACEPARENT)
        .and_then(|value| TraceParent::parse(value.as_str()))
        .expect("a traceparent on the stored result");
    assert_eq!(stored_trace.trace_id(), trace_id);
    let stored: JobResult = decode(&stored.payload, usize::MAX).expect("a result");
    assert_eq!(stored.job_id, job.job_id);

    // A traceparent not well formed refuses nothing: the job runs in a new trace, the same one
    // in both processes.
    let job = tenant.embed_job(MODEL, vec!["a badly traced job".into()]);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        subject::TRACEPARENT,
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
    );
    let mut job_with_deadline = job.clone();
    job_with_deadline.deadline_ms = Some(fleet_schemas::now_ms() + WAIT.as_millis() as u64);
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(tenant.sign(&job_with_deadline).expect("signed").into())
        .timeout(Some(WAIT));
    let answer = client
        .send_request(subject::infer(MODEL), request)
        .await
        .expect("an answer");
    let result: JobResult = decode(&answer.payload, usize::MAX).expect("a result");
    assert_eq!(result.status, ResultStatus::Ok, "{result:?}");
    let queued = eventually(WAIT, "the dispatcher's line", || {
        let found = json_lines(&dispatcher_log).into_iter().find(|l| {
            l["span"]["job_id"] == job.job_id.as_str() && l["fields"]["message"] == "job queued"
        });
        async move { found }
    })
    .await;
    let new_trace = queued["span"]["trace_id"].as_str().expect("a trace id");
    assert_eq!(new_trace.len(), 32);
    assert_ne!(new_trace, "0af7651916cd43dd8448eb211c80319c");
    wait_lines(&worker_log, &job.job_id, new_trace, "result stored").await;

    // A lost connection is a warning that names the server.
    nats.stop(Signal::SIGKILL);
    let url = nats.url().to_owned();
    for log in [&dispatcher_log, &worker_log] {
        eventually(WAIT, &format!("a disconnection warning in {log:?}"), || {
            let found = json_lines(log).into_iter().any(|l| {
                l["level"] == "WARN"
                    && l["fields"]["nats_url"] == url.as_str()
                    && l["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("lost the connection to NATS"))
            });
            async move { found.then_some(()) }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_text_is_for_people_and_json_for_machines() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let tenants = write_tenants_file(dir.path(), &["demo"]);
    for (format, json) in [("text", false), ("json", true)] {
        let log = dir.path().join(format!("dispatcher-{format}.log"));
        let dispatcher_args = args(&nats, &tenants, &["--name", format]);
        let env = [("RUST_LOG", "info"), ("FLEET_LOG_FORMAT", format)];
        let _dispatcher = Process::spawn_binary_logged("dispatcher", &dispatcher_args, &env, &log);
        let line = eventually(WAIT, "the dispatcher serving", || {
            let line = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .find(|line| line.contains("dispatcher serving"))
                .map(str::to_owned);
            async move { line }
        })
        .await;
        assert_eq!(
            serde_json::from_str::<Value>(&line).is_ok(),
            json,
            "{format}: {line}"
        );
        if !json {
            assert!(line.contains(" INFO "), "{line}");
            // Not a terminal: no color codes.
            assert!(!line.contains('\x1b'), "{line}");
        }
    }
}
