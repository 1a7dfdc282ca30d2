//! `loadtest latency` against a stand-in dispatcher whose answers take a known time: the
//! percentiles it reports are that time, refusals are counted by code, and in open loop a
//! fleet that cannot keep up shows in the latencies (counted from when each request was due),
//! where a closed loop would hide it.

use std::{process::Command, time::Duration};

use fleet_schemas::{ErrorBody, ErrorCode, Job, JobResult, ResultStatus, SignedJob, decode};
use fleet_tests::NatsServer;
use futures::StreamExt;
use serde_json::Value;

const ANSWER_AFTER: Duration = Duration::from_millis(40);

/// How the stand-in takes requests: all at once, or one after another.
#[derive(Clone, Copy)]
enum StandIn {
    Concurrent,
    Serial,
}

/// Answers `fleet.infer.m` after [`ANSWER_AFTER`]; every fifth request is refused
/// `rate_limited`.
async fn stand_in(client: async_nats::Client, mode: StandIn) {
    let mut calls = client.subscribe("fleet.infer.m").await.unwrap();
    client.flush().await.unwrap();
    tokio::spawn(async move {
        let mut count = 0u64;
        while let Some(call) = calls.next().await {
            count += 1;
            let refuse = count.is_multiple_of(5);
            let client = client.clone();
            let answer = async move {
                tokio::time::sleep(ANSWER_AFTER).await;
                let envelope: SignedJob = decode(&call.payload, 1 << 20).unwrap();
                let job: Job = decode(&envelope.body, 1 << 20).unwrap();
                let result = JobResult {
                    job_id: job.job_id,
                    tenant: job.tenant,
                    model: job.model,
                    status: if refuse {
                        ResultStatus::Rejected
                    } else {
                        ResultStatus::Ok
                    },
                    output: None,
                    error: refuse.then(|| ErrorBody {
                        code: ErrorCode::RateLimited,
                        message: "stand-in".into(),
                    }),
                    worker: "stand-in".into(),
                    timings: Default::default(),
                };
                let body = fleet_schemas::encode(&result).unwrap();
                client
                    .publish(call.reply.unwrap(), body.into())
                    .await
                    .unwrap();
            };
            match mode {
                StandIn::Concurrent => {
                    tokio::spawn(answer);
                }
                StandIn::Serial => answer.await,
            }
        }
    });
}

fn key_file(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("key.toml");
    let made = Command::new(fleet_tests::binary("fleet"))
        .args(["keygen", "--tenant", "acme", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    path
}

/// Runs `loadtest latency` with `args`; returns the report file's JSON.
fn loadtest(nats: &NatsServer, dir: &std::path::Path, args: &[&str]) -> Value {
    let report = dir.join("report.json");
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["--nats-url", nats.url(), "--model", "m", "--key"])
        .arg(key_file(dir))
        .args(args)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let _ = std::fs::remove_file(dir.join("key.toml"));
    serde_json::from_str(&std::fs::read_to_string(report).unwrap()).unwrap()
}

fn ms(report: &Value, percentile: &str) -> f64 {
    report["latency_ms"][percentile].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_percentiles_are_the_fleets_answer_time_and_refusals_are_counted() {
    let nats = NatsServer::start();
    stand_in(nats.client().await, StandIn::Concurrent).await;
    let dir = tempfile::tempdir().unwrap();
    let report = loadtest(
        &nats,
        dir.path(),
        &["latency", "--rate", "50", "--duration", "2s"],
    );
    assert_eq!(report["loop"], "open");
    assert_eq!(report["requests"], 100);
    assert_eq!(report["not_sent"], 0);
    assert_eq!(report["ok"], 80, "{report}");
    assert_eq!(report["errors"]["rate_limited"], 20, "{report}");
    let answer_ms = ANSWER_AFTER.as_secs_f64() * 1000.0;
    for percentile in ["p50", "p90"] {
        let value = ms(&report, percentile);
        assert!(
            (answer_ms..answer_ms + 60.0).contains(&value),
            "{percentile} {value} ms for answers that take {answer_ms} ms"
        );
    }
    let timeline = report["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 2, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwhelmed_fleet_shows_in_open_loop_latencies_and_hides_in_closed_loop() {
    let nats = NatsServer::start();
    // One request at a time, 40 ms each: at most 25 answers a second.
    stand_in(nats.client().await, StandIn::Serial).await;
    let dir = tempfile::tempdir().unwrap();

    // Offered 50 a second for 2 s: the backlog grows to ~50 requests, ~2 s of waiting.
    let open = loadtest(
        &nats,
        dir.path(),
        &["latency", "--rate", "50", "--duration", "2s"],
    );
    assert!(ms(&open, "p99") > 1000.0, "{open}");

    // With at most 10 awaiting an answer, the requests due beyond them are counted, not sent.
    let capped = loadtest(
        &nats,
        dir.path(),
        &[
            "latency",
            "--rate",
            "50",
            "--duration",
            "2s",
            "--max-outstanding",
            "10",
        ],
    );
    assert_eq!(capped["requests"], 100, "{capped}");
    assert!(capped["not_sent"].as_u64().unwrap() > 20, "{capped}");

    // Closed loop, one in flight: each request waits only for its own answer.
    let closed = loadtest(
        &nats,
        dir.path(),
        &["--in-flight", "1", "latency", "--duration", "1s"],
    );
    assert_eq!(closed["loop"], "closed");
    assert!(ms(&closed, "p99") < 200.0, "{closed}");
}
