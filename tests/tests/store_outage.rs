//! A worker whose results stream cannot take writes for a while (its node frozen) while the
//! queue works: the jobs it has run wait for the store, holding their deliveries, and end `ok`
//! once the stream is back. A broker outage is not the jobs' fault and must not spend their
//! deliveries (before, each failed store was naked and counted, and a long enough outage
//! dead-lettered good jobs as `internal`).

use std::time::Duration;

use async_nats::jetstream;
use fleet_schemas::{Job, ResultStatus, now_ms, subject};
use fleet_streams::StreamLimits;
use fleet_tests::{Process, Signal, Streams, cluster::NatsCluster, model_dir, write_tenants_file};

const MODEL: &str = "all-minilm-l6-v2";
const TENANT: &str = "acme";
/// The worker's delivery budget: two deliveries, a second apart, each failed store costing one
/// (a store that gets no answer fails after a JetStream request's 5 s timeout).
const MAX_DELIVER: &str = "2";
const RETRY_DELAY: &str = "1s";
/// How long the results stream's node stays frozen: longer than the old worker took to spend
/// every delivery of a job on failed stores (two of 5 s each, a second apart, then its dead
/// letter's store of 5 s more), so that it fails them.
const OUTAGE: Duration = Duration::from_secs(25);
/// How long the fleet may take to store every result once the node is back.
const RESUME_LIMIT: Duration = Duration::from_secs(60);
const JOBS: usize = 4;

/// Places Fleet's streams (one replica each) so that the queue and the results live on
/// different nodes, and returns the node keeping the results. JetStream picks a node for each
/// stream itself; streams placed together are made again.
async fn streams_apart(cluster: &NatsCluster, js: &jetstream::Context) -> usize {
    for _ in 0..20 {
        fleet_streams::ensure_all(js, &StreamLimits::default())
            .await
            .expect("Fleet's streams");
        let jobs = cluster.stream_leader(js, subject::JOBS_STREAM).await;
        let results = cluster.stream_leader(js, subject::RESULTS_STREAM).await;
        if jobs != results {
            return results;
        }
        for stream in [
            subject::JOBS_STREAM,
            subject::RESULTS_STREAM,
            subject::DLQ_STREAM,
        ] {
            js.delete_stream(stream).await.expect("delete stream");
        }
    }
    panic!("JetStream placed the queue and the results on the same node 20 times");
}

fn job(id: &str) -> Job {
    Job::embed(id, TENANT, MODEL, vec![format!("text of {id}")], now_ms())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_whose_results_cannot_be_stored_for_a_while_wait_and_end_ok() {
    let cluster = NatsCluster::start(3).await;
    let setup = jetstream::new(cluster.client().await);
    let results_node = streams_apart(&cluster, &setup).await;
    // The worker and the test talk to the other two nodes: only the results stream is out.
    let live: Vec<&str> = cluster
        .urls()
        .split(',')
        .enumerate()
        .filter_map(|(node, url)| (node != results_node).then_some(url))
        .collect();
    let live_urls = live.join(",");
    let client = async_nats::ConnectOptions::new()
        .ping_interval(Duration::from_secs(2))
        .connect(live.clone())
        .await
        .expect("connect to the live nodes");
    let streams = Streams::connect_client(client);
    let tenants = tempfile::tempdir().expect("temporary directory");
    let tenants_file = write_tenants_file(tenants.path(), &[TENANT]);
    let mut worker = Process::spawn_binary(
        "worker",
        &[
            "--nats-url",
            &live_urls,
            "--tenants",
            &tenants_file.to_string_lossy(),
            "--model-dir",
            &model_dir().to_string_lossy(),
            "--metrics-addr",
            "127.0.0.1:0",
            "--max-deliver",
            MAX_DELIVER,
            "--retry-delay",
            RETRY_DELAY,
        ],
        &[("RUST_LOG", "warn")],
    );
    // A job run before the outage: the worker has loaded its model and pulls.
    let warm_up = job("warm-up");
    streams.enqueue(&warm_up, None).await;
    let warmed = streams.wait_result(&warm_up, RESUME_LIMIT).await;
    assert_eq!(warmed.status, ResultStatus::Ok, "{warmed:?}");

    cluster.signal(results_node, Signal::SIGSTOP);
    let jobs: Vec<Job> = (0..JOBS).map(|n| job(&format!("job-{n}"))).collect();
    for job in &jobs {
        streams.enqueue(job, None).await;
    }
    tokio::time::sleep(OUTAGE).await;
    assert!(worker.is_running(), "the worker exited during the outage");
    cluster.signal(results_node, Signal::SIGCONT);

    for job in &jobs {
        let result = streams.wait_result(job, RESUME_LIMIT).await;
        assert_eq!(
            result.status,
            ResultStatus::Ok,
            "{} ended {result:?}",
            job.job_id
        );
    }
    streams.wait_queue_empty(RESUME_LIMIT).await;
    assert_eq!(
        streams.messages_in(subject::DLQ_STREAM).await,
        0,
        "a job was dead-lettered"
    );
    assert_eq!(
        streams.results_stored_again().await,
        0,
        "a result was stored twice"
    );
    assert!(worker.is_running(), "the worker exited");
}
