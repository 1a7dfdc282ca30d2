//! Real `worker` processes on the real model: scaling out by starting another process, failover
//! by redelivery when a worker dies holding jobs, and a graceful SIGTERM (even with NATS gone).

use std::{collections::BTreeSet, time::Duration};

use fleet_schemas::{Job, JobResult, Output, ResultStatus};
use fleet_tests::{NatsServer, Process, Signal, Streams, model_dir, write_tenants_file};

const MODEL: &str = "all-minilm-l6-v2";
const WAIT: Duration = Duration::from_secs(60);

struct Fleet {
    server: NatsServer,
    streams: Streams,
    /// The tenants file the workers verify jobs against.
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

    /// A `worker` process on the real model with a short ack wait, plus `extra` flags.
    fn worker(&self, name: &str, extra: &[&str]) -> Process {
        let model_dir = model_dir();
        let model_dir = model_dir.to_string_lossy();
        let tenants = self.tenants.path().join("tenants.toml");
        let tenants = tenants.to_string_lossy();
        let mut args = vec![
            "--nats-url",
            self.server.url(),
            "--tenants",
            &tenants,
            "--model-dir",
            &model_dir,
            "--worker-name",
            name,
            "--metrics-addr",
            "127.0.0.1:0",
            "--ack-wait",
            "2s",
        ];
        args.extend_from_slice(extra);
        Process::spawn_binary("worker", &args, &[("RUST_LOG", "warn")])
    }

    async fn enqueue_all(&self, jobs: &[Job]) {
        for job in jobs {
            self.streams.enqueue(job, None).await;
        }
    }

    /// Waits for every job's stored result.
    async fn all_results(&self, jobs: &[Job]) -> Vec<JobResult> {
        let mut results = Vec::new();
        for job in jobs {
            results.push(self.streams.wait_result(job, WAIT).await);
        }
        results
    }

    /// Jobs held unacknowledged; the consumer must exist by then (a worker created it).
    async fn held(&self) -> usize {
        self.streams
            .held(MODEL)
            .await
            .expect("the workers' consumer exists")
    }
}

fn jobs(prefix: &str, count: usize) -> Vec<Job> {
    (0..count)
        .map(|i| {
            let inputs = vec![
                format!("sentence number {i} about {prefix}"),
                "a second input".to_owned(),
            ];
            Job::embed(format!("{prefix}-{i}"), "acme", MODEL, inputs, 0)
        })
        .collect()
}

fn assert_embedded(result: &JobResult) {
    assert_eq!(result.status, ResultStatus::Ok, "{result:?}");
    match &result.output {
        Some(Output::Embeddings { dims, vectors }) => {
            assert_eq!(*dims, 384);
            assert_eq!(vectors.len(), 2);
            let norm: f32 = vectors[0].iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-3, "normalised, got {norm}");
        }
        None => panic!("no output: {result:?}"),
    }
}

#[tokio::test]
async fn two_worker_processes_share_one_consumer_and_both_work() {
    let fleet = Fleet::start().await;
    // Small in-flight bounds, so one worker cannot take the whole queue at once.
    let small = [
        "--max-in-flight",
        "2",
        "--fetch-batch",
        "2",
        "--max-batch-size",
        "4",
    ];
    let _a = fleet.worker("worker-a", &small);
    let _b = fleet.worker("worker-b", &small);
    let jobs = jobs("shared", 40);
    fleet.enqueue_all(&jobs).await;
    let results = fleet.all_results(&jobs).await;
    results.iter().for_each(assert_embedded);
    let workers: BTreeSet<&str> = results.iter().map(|r| r.worker.as_str()).collect();
    assert_eq!(workers, BTreeSet::from(["worker-a", "worker-b"]));
    assert_eq!(fleet.streams.stored_results().await, 40);
}

#[tokio::test]
async fn jobs_held_by_a_killed_worker_are_answered_once_by_the_other() {
    let fleet = Fleet::start().await;
    // This worker holds jobs for a minute waiting for a fuller batch, then dies.
    let mut doomed = fleet.worker("doomed", &["--max-delay", "60s", "--max-batch-size", "64"]);
    let jobs = jobs("failover", 5);
    fleet.enqueue_all(&jobs).await;
    fleet.streams.wait_held(MODEL, 5, WAIT).await;
    let _survivor = fleet.worker("survivor", &[]);
    doomed.signal(Signal::SIGKILL);
    doomed.wait_exit(Duration::from_secs(10));

    let results = fleet.all_results(&jobs).await;
    for result in &results {
        assert_embedded(result);
        assert_eq!(result.worker, "survivor");
    }
    fleet.streams.wait_held(MODEL, 0, WAIT).await;
    assert_eq!(
        fleet.streams.stored_results().await,
        5,
        "one result per job"
    );
    assert_eq!(fleet.streams.results_stored_again().await, 0);
}

#[tokio::test]
async fn sigterm_finishes_the_jobs_in_flight_and_exits_zero() {
    let fleet = Fleet::start().await;
    let mut worker = fleet.worker(
        "graceful",
        &["--max-delay", "60s", "--max-batch-size", "64"],
    );
    let jobs = jobs("graceful", 5);
    fleet.enqueue_all(&jobs).await;
    fleet.streams.wait_held(MODEL, 5, WAIT).await;
    worker.signal(Signal::SIGTERM);
    assert_eq!(worker.wait_exit(Duration::from_secs(30)), Some(0));
    // Answered before the exit, not after a redelivery: no worker runs any more.
    for job in &jobs {
        assert_embedded(
            &fleet
                .streams
                .stored_result(job)
                .await
                .expect("answered before exit"),
        );
    }
    assert_eq!(fleet.held().await, 0);
    assert_eq!(fleet.streams.stored_results().await, 5);
}

#[tokio::test]
async fn sigterm_while_nats_is_down_still_exits_zero_when_nothing_is_in_flight() {
    let mut fleet = Fleet::start().await;
    let mut worker = fleet.worker("cut-off", &[]);
    fleet_tests::eventually(WAIT, "the worker's consumer", || async {
        fleet.streams.consumer_info(MODEL).await
    })
    .await;
    fleet.server.stop(Signal::SIGKILL);
    worker.signal(Signal::SIGTERM);
    // Bounded waits for what NATS would confirm (advisories, the last flush), not the 30 s
    // drain timeout, which ends in a failing exit.
    assert_eq!(worker.wait_exit(Duration::from_secs(25)), Some(0));
}
