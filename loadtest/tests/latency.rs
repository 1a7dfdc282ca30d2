//! `loadtest latency` against a stand-in fleet whose answers take a known time: the
//! percentiles it reports are that time, by `infer` and by `submit` and the stored result;
//! refusals are counted by code; and in open loop a fleet that cannot keep up shows in the
//! latencies (counted from when each request was due), where a closed loop would hide it.

mod support;

use std::time::Duration;

use fleet_tests::{NatsServer, Streams};
use serde_json::Value;
use support::{StandIn, loadtest, stand_in};

const ANSWER_AFTER: Duration = Duration::from_millis(40);

fn ms(report: &Value, percentile: &str) -> f64 {
    report["latency_ms"][percentile].as_f64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_percentiles_are_the_fleets_answer_time_and_refusals_are_counted() {
    let nats = NatsServer::start();
    let stand_in_config = StandIn {
        answer_after: ANSWER_AFTER,
        capacity: 1000,
        refuse_every: Some(5),
    };
    stand_in(nats.client().await, stand_in_config).await;
    let dir = tempfile::tempdir().unwrap();
    let report = loadtest(
        &nats,
        dir.path(),
        &["latency", "--rate", "50", "--duration", "2s"],
    );
    assert_eq!(report["loop"], "open");
    assert_eq!(report["mode"], "sync");
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
    // 50 requests due in each of the two seconds, at a fixed rate.
    let timeline = report["timeline"].as_array().unwrap();
    assert!(timeline.len() >= 2, "{report}");
    for (second, entry) in timeline.iter().take(2).enumerate() {
        assert_eq!(entry["second"], second, "{report}");
        assert_eq!(entry["sent"], 50, "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_percentiles_are_the_time_until_the_stored_result_is_read() {
    let nats = NatsServer::start();
    // The stand-in stores results on FLEET_RESULTS as a worker does.
    let _streams = Streams::create(&nats).await;
    let texts = stand_in(
        nats.client().await,
        StandIn {
            answer_after: ANSWER_AFTER,
            capacity: 1000,
            refuse_every: None,
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    let corpus_texts = ["one short text", "a second, somewhat longer text to embed"];
    let lines: Vec<String> = corpus_texts
        .iter()
        .enumerate()
        .map(|(id, text)| serde_json::json!({ "id": id, "text": text }).to_string())
        .collect();
    std::fs::write(&corpus, lines.join("\n")).unwrap();
    let report = loadtest(
        &nats,
        dir.path(),
        &[
            "latency",
            "--mode",
            "async",
            "--poll-interval",
            "5ms",
            "--corpus",
            corpus.to_str().unwrap(),
            "--texts-per-job",
            "1..3",
            "--rate",
            "40",
            "--duration",
            "2s",
        ],
    );
    assert_eq!(report["mode"], "async", "{report}");
    assert_eq!(report["requests"], 80, "{report}");
    assert_eq!(report["ok"], 80, "{report}");
    // Answers take 40 ms; polling every 5 ms reads each result up to 5 ms late.
    let answer_ms = ANSWER_AFTER.as_secs_f64() * 1000.0;
    for percentile in ["p50", "p90"] {
        let value = ms(&report, percentile);
        assert!(
            (answer_ms..answer_ms + 60.0).contains(&value),
            "{percentile} {value} ms for results stored after {answer_ms} ms"
        );
    }
    // The dispatcher's acceptance comes first, at once.
    let accepted = report["accepted_ms"]["p50"].as_f64().unwrap();
    assert!(accepted < answer_ms, "{report}");
    // One to three texts per job, every one from the corpus.
    let texts_ok = report["texts_ok"].as_u64().unwrap();
    assert!((80..=240).contains(&texts_ok), "{report}");
    let seen = texts.lock().unwrap().clone();
    assert_eq!(seen.len() as u64, texts_ok);
    assert!(seen.iter().all(|t| corpus_texts.contains(&t.as_str())));
    assert!(
        seen.len() > 80,
        "some jobs carry more than one text: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overwhelmed_fleet_shows_in_open_loop_latencies_and_hides_in_closed_loop() {
    let nats = NatsServer::start();
    // One request at a time, 40 ms each: at most 25 answers a second.
    let serial = StandIn {
        answer_after: ANSWER_AFTER,
        capacity: 1,
        refuse_every: None,
    };
    stand_in(nats.client().await, serial).await;
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
