//! The worker's metrics after a known workload, against a real nats-server with the fake
//! embedder in-process: every job counted once by its final outcome (a retried job once as
//! finished and once as retried), dead letters by reason, and the queue's own gauges read from
//! JetStream. The metrics are read as a scrape would read them: the registry's OpenMetrics text.

// Shared with the pipeline tests, which use the rest of it.
#[allow(dead_code)]
mod support;

use std::time::Duration;

use async_nats::HeaderMap;
use fleet_schemas::{ErrorCode, Job, ResultStatus, SigningKey, Task, encode, subject};
use fleet_tests::{NatsServer, Streams, eventually, openmetrics::Scrape, write_tenants_file};
use fleet_worker::Metrics;
use prometheus_client::registry::Registry;
use support::{FakeEmbedder, MODEL, RunningWorker, config, job};

const WAIT: Duration = Duration::from_secs(15);

struct Fleet {
    server: NatsServer,
    streams: Streams,
    tenants: tempfile::TempDir,
}

impl Fleet {
    async fn start() -> Fleet {
        let server = NatsServer::start();
        let streams = Streams::create(&server).await;
        let tenants = tempfile::tempdir().expect("temporary directory");
        write_tenants_file(tenants.path(), &["acme"]);
        Fleet {
            server,
            streams,
            tenants,
        }
    }

    /// A worker running in this process with `extra` flags on `embedder`.
    async fn worker(&self, extra: &[&str], embedder: FakeEmbedder) -> RunningWorker {
        RunningWorker::start(
            self.server.client().await,
            support::key_store(self.tenants.path()).await,
            config(self.server.url(), extra),
            embedder,
        )
        .await
    }
}

fn untruncated(mut job: Job) -> Job {
    job.task = Task::Embed {
        inputs: job.task.inputs().to_vec(),
        normalize: true,
        truncate: false,
    };
    job
}

/// A worker series as scraped: every one carries the model the worker serves.
fn series(name: &str, labels: &str) -> String {
    match labels {
        "" => format!("{name}{{model=\"{MODEL}\"}}"),
        labels => format!("{name}{{model=\"{MODEL}\",{labels}}}"),
    }
}

fn jobs_series(outcome: &str, code: &str) -> String {
    series(
        "fleet_worker_jobs_total",
        &format!("outcome=\"{outcome}\",code=\"{code}\""),
    )
}

fn dead_letters_series(reason: &str) -> String {
    series(
        "fleet_worker_dead_letters_total",
        &format!("reason=\"{reason}\""),
    )
}

/// Ten jobs, each with a known fate: four answered with vectors (one of them only on its
/// second delivery), one expired, five dead-lettered for five different reasons. The metrics
/// count each job once, by its final outcome and code; the retry and the redelivery apart.
#[tokio::test]
async fn after_a_known_workload_the_job_metrics_equal_the_workload() {
    let fleet = Fleet::start().await;
    let embedder = FakeEmbedder::new(16, 64);
    let worker = fleet
        .worker(&["--max-deliver", "2"], embedder.clone())
        .await;
    let streams = &fleet.streams;

    // Fails on its first delivery, answered on its second.
    embedder.fail_next(1);
    let retried = job("retried", &["flaky model"]);
    streams.enqueue(&retried, None).await;
    assert_eq!(
        streams.wait_result(&retried, WAIT).await.status,
        ResultStatus::Ok
    );
    // Fails on both deliveries it is allowed: dead-lettered out of retries.
    embedder.fail_next(2);
    let doomed = job("doomed", &["broken model"]);
    streams.enqueue(&doomed, None).await;
    let stored = streams.wait_result(&doomed, WAIT).await;
    assert_eq!(stored.error_code(), Some(ErrorCode::Internal));
    // The model fails on its input whatever the batch: dead-lettered as poison.
    embedder.poison("kaboom");
    let poison = job("poison", &["kaboom"]);
    streams.enqueue(&poison, None).await;
    let stored = streams.wait_result(&poison, WAIT).await;
    assert_eq!(stored.error_code(), Some(ErrorCode::Internal));

    let ok: Vec<Job> = (0..3)
        .map(|i| job(&format!("ok-{i}"), &["one text", &format!("and {i} more")]))
        .collect();
    for job in &ok {
        streams.enqueue(job, None).await;
    }
    let mut late = job("late", &["too late"]);
    late.deadline_ms = Some(1_000);
    streams.enqueue(&late, None).await;
    let too_long = untruncated(job("too-long", &[&"word ".repeat(100)]));
    streams.enqueue(&too_long, None).await;
    streams
        .enqueue_raw(MODEL, b"not messagepack".to_vec(), HeaderMap::new())
        .await;
    let forged = job("forged", &["text"]);
    // Acme's key id with a signature its key did not make.
    let envelope = SigningKey::from_secret_bytes("acme-key", &[9; 32])
        .sign_job(&forged)
        .expect("sign");
    streams
        .enqueue_raw(MODEL, encode(&envelope).expect("encode"), HeaderMap::new())
        .await;
    for job in ok.iter().chain([&late, &too_long]) {
        streams.wait_result(job, WAIT).await;
    }
    streams.wait_queue_empty(WAIT).await;

    let scrape = eventually(WAIT, "ten jobs counted", || async {
        let scrape = Scrape::of(&worker.registry);
        (scrape.sum("fleet_worker_jobs_total") >= 10.0).then_some(scrape)
    })
    .await;
    assert_eq!(
        scrape.sum("fleet_worker_jobs_total"),
        10.0,
        "one count per job"
    );
    assert_eq!(scrape.value(&jobs_series("ok", "")), 4.0);
    assert_eq!(scrape.value(&jobs_series("expired", "expired")), 1.0);
    for (code, count) in [
        ("internal", 2.0),
        ("input_too_long", 1.0),
        ("malformed", 1.0),
        ("bad_signature", 1.0),
    ] {
        assert_eq!(
            scrape.value(&jobs_series("dead_lettered", code)),
            count,
            "{code}"
        );
    }
    // The retried job's and the doomed job's first deliveries, given back.
    assert_eq!(
        scrape.value(&series("fleet_worker_job_retries_total", "")),
        2.0
    );
    assert_eq!(
        scrape.value(&series("fleet_worker_redeliveries_total", "")),
        2.0
    );
    for reason in [
        "out_of_retries",
        "poison_input",
        "input_too_long",
        "unreadable",
        "refused",
    ] {
        assert_eq!(scrape.value(&dead_letters_series(reason)), 1.0, "{reason}");
    }
    assert_eq!(scrape.sum("fleet_worker_dead_letters_total"), 5.0);
    assert_eq!(
        streams.messages_in(subject::DLQ_STREAM).await,
        5,
        "one dead letter each"
    );

    // Each job's end to end time once, by outcome; queue wait for the jobs that reached a batch
    // and were answered with vectors.
    assert_eq!(
        scrape.value(&series("fleet_worker_job_seconds_count", r#"outcome="ok""#)),
        4.0
    );
    assert_eq!(
        scrape.value(&series(
            "fleet_worker_job_seconds_count",
            r#"outcome="dead_lettered""#
        )),
        5.0
    );
    assert_eq!(
        scrape.value(&series("fleet_worker_queue_wait_seconds_count", "")),
        4.0
    );
    // Every input that reached the model, in every batch, failed ones included.
    let batches = embedder.batches();
    assert_eq!(
        scrape.value(&series("fleet_worker_batch_inputs_sum", "")),
        batches.iter().map(Vec::len).sum::<usize>() as f64
    );
    assert_eq!(
        scrape.value(&series("fleet_worker_batch_inputs_count", "")),
        batches.len() as f64
    );
    assert_eq!(
        scrape.value(&series("fleet_worker_batch_tokens_sum", "")),
        batches
            .iter()
            .flatten()
            .map(|input| input.token_ids.len() as f64)
            .sum::<f64>(),
        "real tokens"
    );
    assert!(
        scrape.value(&series("fleet_worker_batch_padded_tokens_sum", ""))
            >= scrape.value(&series("fleet_worker_batch_tokens_sum", ""))
    );
    assert_eq!(
        scrape.value(&series("fleet_worker_inference_seconds_count", "")),
        batches.len() as f64
    );
    assert!(scrape.value(&series("fleet_worker_tokenize_seconds_count", "")) >= 9.0);
    assert_eq!(
        scrape.value(&series("fleet_worker_jobs_in_flight", "")),
        0.0
    );
    assert_eq!(
        scrape.value(&series("fleet_worker_batcher_pending_inputs", "")),
        0.0
    );

    scrape.assert_family("fleet_worker_jobs", "counter", None);
    scrape.assert_family("fleet_worker_job_seconds", "histogram", Some("seconds"));
    scrape.assert_family(
        "fleet_worker_queue_wait_seconds",
        "histogram",
        Some("seconds"),
    );
    scrape.assert_family(
        "fleet_worker_tokenize_seconds",
        "histogram",
        Some("seconds"),
    );
    scrape.assert_family(
        "fleet_worker_inference_seconds",
        "histogram",
        Some("seconds"),
    );
    scrape.assert_family("fleet_worker_batch_tokens", "histogram", Some("tokens"));
    scrape.assert_family("fleet_worker_batch_inputs", "histogram", Some("inputs"));
    worker.stop().await.expect("clean stop");
}

/// The queue's gauges, read from JetStream by the worker every `--queue-metrics-every`: the
/// consumer's lag (what an autoscaler scales on) counts the jobs waiting and the jobs held, and
/// falls to zero once they are done; the streams' messages and bytes follow.
#[tokio::test]
async fn the_queue_gauges_follow_jetstream() {
    let fleet = Fleet::start().await;
    let embedder = FakeEmbedder::new(16, 64);
    embedder.set_delay(Duration::from_millis(1500));
    let worker = fleet
        .worker(
            &["--queue-metrics-every", "100ms", "--worker-name", "w-1"],
            embedder.clone(),
        )
        .await;
    let labels = format!("{{model=\"{MODEL}\",worker=\"w-1\"}}");
    let stream = |name: &str| format!("{{stream=\"{name}\",worker=\"w-1\"}}");
    let jobs: Vec<Job> = (0..3).map(|i| job(&format!("q-{i}"), &["text"])).collect();
    // The worker has bound the consumer and read the queue once.
    eventually(WAIT, "the queue read", || async {
        let scrape = Scrape::of(&worker.registry);
        (scrape
            .samples
            .contains_key(&format!("fleet_queue_consumer_lag{labels}")))
        .then_some(())
    })
    .await;
    for job in &jobs {
        fleet.streams.enqueue(job, None).await;
    }
    eventually(WAIT, "a lag of three jobs", || async {
        let scrape = Scrape::of(&worker.registry);
        (scrape.value(&format!("fleet_queue_consumer_lag{labels}")) == 3.0
            && scrape.value(&format!(
                "fleet_queue_stream_messages{}",
                stream("FLEET_JOBS")
            )) == 3.0)
            .then_some(())
    })
    .await;
    let scrape = Scrape::of(&worker.registry);
    assert!(scrape.value(&format!("fleet_queue_stream_bytes{}", stream("FLEET_JOBS"))) > 0.0);
    for job in &jobs {
        fleet.streams.wait_result(job, WAIT).await;
    }
    let scrape = eventually(WAIT, "no lag", || async {
        let scrape = Scrape::of(&worker.registry);
        (scrape.value(&format!("fleet_queue_consumer_lag{labels}")) == 0.0
            && scrape.value(&format!(
                "fleet_queue_stream_messages{}",
                stream("FLEET_RESULTS")
            )) == 3.0)
            .then_some(scrape)
    })
    .await;
    assert_eq!(
        scrape.value(&format!(
            "fleet_queue_stream_messages{}",
            stream("FLEET_JOBS")
        )),
        0.0
    );
    assert_eq!(
        scrape.value(&format!("fleet_queue_consumer_redelivered{labels}")),
        0.0
    );
    scrape.assert_family("fleet_queue_stream_bytes", "gauge", Some("bytes"));
    scrape.assert_family("fleet_queue_consumer_lag", "gauge", None);
    let info = fleet
        .streams
        .consumer_info(MODEL)
        .await
        .expect("consumer exists");
    assert_eq!(info.num_pending + info.num_ack_pending as u64, 0);
    worker.stop().await.expect("clean stop");
}

#[test]
fn every_labelled_series_is_there_at_zero_before_its_first_event() {
    // Prometheus takes a series' first sample as its start: one born at 1 never shows in rate().
    let mut registry = Registry::default();
    let _metrics = Metrics::new(&mut registry, MODEL);
    let scrape = Scrape::of(&registry);
    for (name, labels) in [
        ("fleet_worker_jobs_total", r#"outcome="ok",code="""#),
        (
            "fleet_worker_jobs_total",
            r#"outcome="expired",code="expired""#,
        ),
        (
            "fleet_worker_jobs_total",
            r#"outcome="dead_lettered",code="bad_signature""#,
        ),
        (
            "fleet_worker_job_seconds_count",
            r#"outcome="dead_lettered""#,
        ),
        ("fleet_worker_dead_letters_total", r#"reason="unreadable""#),
        (
            "fleet_worker_dead_letters_total",
            r#"reason="out_of_deliveries""#,
        ),
        (
            "fleet_worker_deliveries_unfinished_total",
            r#"reason="handed_back""#,
        ),
        ("fleet_worker_reconciled_total", r#"kind="orphan""#),
    ] {
        let series = series(name, labels);
        assert_eq!(scrape.value(&series), 0.0, "{series}");
    }
}
