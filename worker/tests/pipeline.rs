//! The worker pipeline against a real nats-server, with the fake embedder in-process: what a
//! job in the queue turns into (stored result, reply, ack, dead letter, retry), and that
//! shutdown loses nothing.

// Shared with the other in-process tests, which do not use all of it.
#[allow(dead_code)]
mod support;

use std::time::Duration;

use async_nats::{
    HeaderMap,
    jetstream::{self, stream::Stream},
};
use fleet_keys::{FileSource, KeyStore, StoreOptions};
use fleet_schemas::{
    ErrorCode, Job, JobResult, Output, ResultStatus, SigningKey, Task, decode, encode, subject,
};
use fleet_tests::{NatsServer, Streams, TestTenant, eventually, write_tenants_file};
use fleet_worker::{
    Metrics, PipelineError, WorkerConfig, consumer,
    consumer::ConsumerSetupError,
    metrics::{Outcome, Reconciled},
    pipeline::ModelFault,
};
use futures::StreamExt;
use prometheus_client::registry::Registry;
use support::{FakeEmbedder, MODEL, RunningWorker, config, job};

const WAIT: Duration = Duration::from_secs(15);

/// A nats-server with Fleet's streams (the harness's [`Streams`]) and the tenants file the
/// in-process workers verify jobs against.
struct Fleet {
    server: NatsServer,
    streams: Streams,
    js: jetstream::Context,
    client: async_nats::Client,
    tenants: tempfile::TempDir,
}

impl Fleet {
    async fn start() -> Fleet {
        let server = NatsServer::start();
        let streams = Streams::create(&server).await;
        let tenants = tempfile::tempdir().expect("temporary directory");
        write_tenants_file(tenants.path(), &["acme", "globex"]);
        Fleet {
            js: streams.js.clone(),
            client: streams.client.clone(),
            server,
            streams,
            tenants,
        }
    }

    /// The worker's view of the tenants: acme and globex, each with its [`signer`]'s key.
    async fn key_store(&self) -> KeyStore {
        support::key_store(self.tenants.path()).await
    }

    /// A worker running in this process with `config` on `embedder`.
    async fn worker(&self, config: WorkerConfig, embedder: FakeEmbedder) -> RunningWorker {
        RunningWorker::start(
            self.server.client().await,
            self.key_store().await,
            config,
            embedder,
        )
        .await
    }

    async fn wait_queue_empty(&self) {
        self.streams.wait_queue_empty(WAIT).await;
    }

    async fn stream(&self, name: &str) -> Stream {
        self.streams.stream(name).await
    }

    async fn messages_in(&self, name: &str) -> u64 {
        self.streams.messages_in(name).await
    }

    /// Queues a job as the dispatcher does; returns its sequence on the queue.
    async fn enqueue(&self, job: &Job, reply_to: Option<&str>) -> u64 {
        self.streams.enqueue(job, reply_to).await
    }

    async fn enqueue_raw(&self, payload: Vec<u8>, headers: HeaderMap) -> u64 {
        self.streams.enqueue_raw(MODEL, payload, headers).await
    }

    async fn stored_result(&self, job: &Job) -> Option<JobResult> {
        self.streams.stored_result(job).await
    }

    async fn stored_result_message(&self, job: &Job) -> Option<jetstream::message::StreamMessage> {
        self.streams.stored_result_message(job).await
    }

    async fn wait_result(&self, job: &Job) -> JobResult {
        self.streams.wait_result(job, WAIT).await
    }

    async fn consumer_info(&self) -> jetstream::consumer::Info {
        self.streams
            .consumer_info(MODEL)
            .await
            .expect("the workers' consumer exists")
    }
}

/// The key a test tenant signs with, registered in the tenants file as `<tenant>-key`.
fn signer(tenant: &str) -> SigningKey {
    TestTenant::new(tenant).key
}

/// The next answer on a caller's inbox, decoded, with the message it came in.
async fn answer(inbox: &mut async_nats::Subscriber) -> (JobResult, async_nats::Message) {
    let reply = tokio::time::timeout(WAIT, inbox.next())
        .await
        .expect("reply in time")
        .expect("reply");
    let answered = decode(&reply.payload, 1 << 20).expect("JobResult");
    (answered, reply)
}

/// Asserts that nothing arrives on `sub` for half a second.
async fn assert_silent(sub: &mut async_nats::Subscriber, what: &str) {
    let arrived = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(arrived.is_err(), "{what}");
}

fn fake() -> FakeEmbedder {
    FakeEmbedder::new(16, 64)
}

fn vectors(result: &JobResult) -> Vec<Vec<f32>> {
    match &result.output {
        Some(Output::Embeddings { vectors, .. }) => vectors.clone(),
        None => panic!("no output in {result:?}"),
    }
}

#[tokio::test]
async fn a_job_is_answered_on_its_reply_subject_and_stored_then_acked() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    let worker = fleet
        .worker(config(fleet.server.url(), &[]), embedder.clone())
        .await;
    let mut inbox = fleet.client.subscribe("_INBOX.acme.1").await.expect("sub");
    let texts = ["the quick brown fox", "jumps", "over the lazy dog again"];
    let job = job("job-1", &texts);
    let job_seq = fleet.enqueue(&job, Some("_INBOX.acme.1")).await;

    let (answered, _) = answer(&mut inbox).await;
    assert_eq!(answered.status, ResultStatus::Ok);
    assert_eq!(answered.job_id, "job-1");
    let expected: Vec<Vec<f32>> = texts
        .iter()
        .map(|t| embedder.expected_vector(t, true))
        .collect();
    assert_eq!(
        vectors(&answered),
        expected,
        "one vector per input, in input order"
    );
    assert_eq!(fleet.wait_result(&job).await, answered);
    let stored = fleet.stored_result_message(&job).await.expect("stored");
    assert_eq!(
        stored.headers.get(subject::JOB_SEQ).map(|v| v.as_str()),
        Some(job_seq.to_string().as_str()),
        "the stored result names the queued job it answers"
    );
    fleet.wait_queue_empty().await;
    assert_eq!(worker.metrics.jobs(Outcome::Ok), 1);
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn answers_go_only_to_the_jobs_own_tenants_inboxes() {
    let fleet = Fleet::start().await;
    let worker = fleet.worker(config(fleet.server.url(), &[]), fake()).await;
    // Tenant acme's jobs name reply subjects it does not own: another tenant's inbox, and
    // another tenant's results subject (the confused deputy).
    let mut elsewhere = fleet
        .client
        .subscribe("_INBOX.globex.>")
        .await
        .expect("sub");
    let mut results = fleet
        .client
        .subscribe("fleet.results.globex.>")
        .await
        .expect("sub");
    let to_other_inbox = job("job-a", &["text"]);
    let to_results = job("job-b", &["text"]);
    fleet
        .enqueue(&to_other_inbox, Some("_INBOX.globex.abc"))
        .await;
    fleet
        .enqueue(&to_results, Some("fleet.results.globex.job-b"))
        .await;
    for job in [&to_other_inbox, &to_results] {
        assert_eq!(fleet.wait_result(job).await.status, ResultStatus::Ok);
    }
    for sub in [&mut elsewhere, &mut results] {
        assert_silent(
            sub,
            "nothing published on a subject the job's tenant does not own",
        )
        .await;
    }
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_job_its_tenants_key_did_not_sign_is_dead_lettered_never_run_stored_or_answered() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    let worker = fleet
        .worker(
            config(fleet.server.url(), &["--max-deliver", "2"]),
            embedder.clone(),
        )
        .await;
    // The tenants' inboxes (this test's own requests use other inboxes).
    let mut inboxes = fleet
        .client
        .subscribe("_INBOX.*.forged")
        .await
        .expect("sub");
    let mut results = fleet
        .client
        .subscribe("fleet.results.>")
        .await
        .expect("sub");
    // Placed straight on the queue, as a leaked dispatcher or worker credential would allow.
    let forged: Vec<(Job, SigningKey, &str)> = vec![
        // A key nobody registered.
        (
            job("by-mallory", &["text"]),
            SigningKey::generate("mallory"),
            "unknown_key",
        ),
        // Acme's own key, but used for another tenant's job.
        (
            Job::embed("as-globex", "globex", MODEL, vec!["text".into()], 0),
            signer("acme"),
            "forbidden",
        ),
        // Acme's key id with a signature its key did not make.
        (
            job("bad-signature", &["text"]),
            SigningKey::from_secret_bytes("acme-key", &[9; 32]),
            "bad_signature",
        ),
    ];
    for (job, key, _) in &forged {
        let envelope = key.sign_job(job).expect("sign");
        let mut headers = HeaderMap::new();
        let reply = format!("_INBOX.{}.forged", job.tenant);
        headers.insert(subject::REPLY_TO, reply.as_str());
        fleet
            .enqueue_raw(encode(&envelope).expect("encode"), headers)
            .await;
    }
    // An all-zero signature under acme's key id.
    let zero = job("zero-signature", &["text"]);
    let mut envelope = signer("acme").sign_job(&zero).expect("sign");
    envelope.signature = vec![0; 64];
    fleet
        .enqueue_raw(encode(&envelope).expect("encode"), HeaderMap::new())
        .await;

    eventually(WAIT, "four dead letters", || async {
        (fleet.messages_in(subject::DLQ_STREAM).await == 4).then_some(())
    })
    .await;
    fleet.wait_queue_empty().await;
    let dlq = fleet.stream(subject::DLQ_STREAM).await;
    let mut codes = Vec::new();
    for seq in 1..=4 {
        let dead = dlq.get_raw_message(seq).await.expect("dead letter");
        let code = dead.headers.get(subject::SERVICE_ERROR_CODE).expect("code");
        codes.push(code.as_str().to_owned());
    }
    codes.sort();
    assert_eq!(
        codes,
        ["bad_signature", "bad_signature", "forbidden", "unknown_key"]
    );
    assert!(embedder.batches().is_empty(), "none of them ran");
    assert_eq!(
        fleet.messages_in(subject::RESULTS_STREAM).await,
        0,
        "nothing stored"
    );
    for sub in [&mut inboxes, &mut results] {
        assert_silent(sub, "nothing answered").await;
    }
    // A job the tenant did sign still runs.
    let genuine = job("genuine", &["text"]);
    fleet.enqueue(&genuine, None).await;
    assert_eq!(fleet.wait_result(&genuine).await.status, ResultStatus::Ok);
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn jobs_of_two_tenants_with_one_id_both_store_their_results() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    let worker = fleet
        .worker(config(fleet.server.url(), &[]), embedder.clone())
        .await;
    let acme = job("row-1", &["from acme"]);
    let globex = Job::embed("row-1", "globex", MODEL, vec!["from globex".into()], 0);
    fleet.enqueue(&acme, None).await;
    fleet.enqueue(&globex, None).await;
    for (job, text) in [(&acme, "from acme"), (&globex, "from globex")] {
        let stored = fleet.wait_result(job).await;
        assert_eq!(stored.tenant, job.tenant);
        assert_eq!(vectors(&stored), [embedder.expected_vector(text, true)]);
    }
    worker.stop().await.expect("clean stop");
}

/// A result as an earlier delivery of `job` (queued at `job_seq`) stored it, by `worker`.
async fn store_earlier_result(fleet: &Fleet, job: &Job, job_seq: u64, worker: &str) {
    let mut headers = HeaderMap::new();
    headers.insert(subject::JOB_SEQ, job_seq.to_string().as_str());
    let earlier = JobResult {
        job_id: job.job_id.clone(),
        tenant: job.tenant.clone(),
        model: MODEL.to_owned(),
        status: ResultStatus::Ok,
        output: Some(Output::Embeddings {
            dims: 16,
            vectors: vec![vec![0.0; 16]],
        }),
        error: None,
        worker: worker.to_owned(),
        timings: Default::default(),
    };
    fleet
        .js
        .publish_with_headers(
            subject::results(&job.tenant, &job.job_id),
            headers,
            encode(&earlier).expect("encode").into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
}

#[tokio::test]
async fn a_redelivered_job_whose_result_is_stored_is_acked_without_running_again() {
    let fleet = Fleet::start().await;
    let job = job("job-twice", &["hello world"]);
    // A worker took the job, stored its result, and died before acking (or its ack was lost
    // in a broker restart): the job stays unacked.
    let consumer = consumer::bind(&fleet.js, &config(fleet.server.url(), &[]).consumer)
        .await
        .expect("bind");
    let job_seq = fleet.enqueue(&job, Some("_INBOX.acme.twice")).await;
    let mut inbox = fleet
        .client
        .subscribe("_INBOX.acme.twice")
        .await
        .expect("sub");
    let mut taken = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    let first = taken.next().await.expect("a job").expect("a message");
    store_earlier_result(&fleet, &job, job_seq, "dead-worker").await;
    drop(first);

    let embedder = fake();
    let worker = fleet
        .worker(config(fleet.server.url(), &[]), embedder.clone())
        .await;
    eventually(WAIT, "the redelivered job acked", || async {
        (worker.metrics.jobs(Outcome::AlreadyStored) == 1).then_some(())
    })
    .await;
    let deliveries = fleet.consumer_info().await.delivered.consumer_sequence;
    assert_eq!(deliveries, 2, "taken by the dead worker, then redelivered");
    assert!(embedder.batches().is_empty(), "the job was not run again");
    assert_eq!(fleet.messages_in(subject::RESULTS_STREAM).await, 1);
    let kept = fleet.stored_result(&job).await.expect("stored");
    assert_eq!(kept.worker, "dead-worker", "the stored result is kept");
    assert_eq!(fleet.messages_in(subject::JOBS_STREAM).await, 0);
    assert_silent(&mut inbox, "the caller is not answered a second time").await;
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_result_stored_by_another_delivery_is_neither_replaced_nor_answered_again() {
    let fleet = Fleet::start().await;
    let job = job("job-raced", &["hello world"]);
    let mut inbox = fleet
        .client
        .subscribe("_INBOX.acme.raced")
        .await
        .expect("sub");
    // Another delivery of this very job (a worker that woke up from a stall, say) stored its
    // result while this one ran: this worker's store must lose, and it must not answer.
    let job_seq = fleet.enqueue(&job, Some("_INBOX.acme.raced")).await;
    store_earlier_result(&fleet, &job, job_seq, "other-worker").await;
    let worker = fleet.worker(config(fleet.server.url(), &[]), fake()).await;
    eventually(WAIT, "the job acked", || async {
        (worker.metrics.jobs(Outcome::AlreadyStored) == 1).then_some(())
    })
    .await;
    let kept = fleet.stored_result(&job).await.expect("stored");
    assert_eq!(kept.worker, "other-worker", "the first stored result stays");
    let info = fleet
        .stream(subject::RESULTS_STREAM)
        .await
        .info()
        .await
        .expect("info")
        .clone();
    assert_eq!(info.state.last_sequence, 1, "no second store happened");
    assert_silent(&mut inbox, "only the store that won answers").await;
    fleet.wait_queue_empty().await;
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_job_id_reused_as_a_new_job_gets_its_own_result() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    let worker = fleet
        .worker(config(fleet.server.url(), &[]), embedder.clone())
        .await;
    let old = job("row-7", &["old text"]);
    let old_seq = fleet.enqueue(&old, None).await;
    fleet.wait_result(&old).await;
    // The same id again, as a new job (queued after the queue's duplicate window, as the
    // dispatcher allows), while the old result is still within the results' window.
    let new = job("row-7", &["new text"]);
    let mut headers = HeaderMap::new();
    headers.insert(subject::REPLY_TO, "_INBOX.acme.reused");
    let mut inbox = fleet
        .client
        .subscribe("_INBOX.acme.reused")
        .await
        .expect("sub");
    let envelope = signer("acme").sign_job(&new).expect("sign");
    let new_seq = fleet
        .enqueue_raw(encode(&envelope).expect("encode"), headers)
        .await;
    assert_ne!(old_seq, new_seq);
    let (answered, _) = answer(&mut inbox).await;
    assert_eq!(
        vectors(&answered),
        [embedder.expected_vector("new text", true)]
    );
    let stored = fleet.stored_result_message(&new).await.expect("stored");
    assert_eq!(
        stored.headers.get(subject::JOB_SEQ).map(|v| v.as_str()),
        Some(new_seq.to_string().as_str()),
        "the stored result is the new job's"
    );
    worker.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "current_thread")]
async fn a_worker_that_stalls_past_its_ack_wait_drops_the_job_instead_of_answering_twice() {
    let fleet = Fleet::start().await;
    let stalling = fake();
    // The stalled worker runs on this test's only thread, so the stall freezes all of it, its
    // in-progress acks too, as SIGSTOP would.
    stalling.freeze_next(Duration::from_secs(5));
    let stalled = fleet
        .worker(
            config(fleet.server.url(), &["--worker-name", "stalled"]),
            stalling.clone(),
        )
        .await;
    let job = job("job-stall", &["stalls"]);
    let inbox_client = fleet.server.client().await;
    let mut inbox = inbox_client
        .subscribe("_INBOX.acme.stall")
        .await
        .expect("sub");
    inbox_client.flush().await.expect("flush");
    // The healthy worker starts on a thread of its own a second after the stall begins, and
    // takes the job when the server redelivers it (ack wait 2 s).
    let healthy_config = config(fleet.server.url(), &["--worker-name", "healthy"]);
    let healthy_url = fleet.server.url().to_owned();
    let healthy_tenants = fleet.tenants.path().join("tenants.toml");
    let (stop_healthy, healthy_stopped) = std::sync::mpsc::channel::<()>();
    let healthy = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        runtime.block_on(async move {
            let client = async_nats::connect(&healthy_url).await.expect("connect");
            let keys = KeyStore::start(FileSource::new(healthy_tenants), StoreOptions::default())
                .await
                .expect("key store");
            let metrics = Metrics::new(&mut Registry::default(), MODEL);
            let stop = tokio::task::spawn_blocking(move || {
                let _ = healthy_stopped.recv();
            });
            fleet_worker::run(&healthy_config, client, fake(), keys, metrics, async {
                let _ = stop.await;
            })
            .await
        })
    });
    fleet.enqueue(&job, Some("_INBOX.acme.stall")).await;
    eventually(WAIT, "the stalled worker wakes up", || async {
        (!stalling.batches().is_empty()).then_some(())
    })
    .await;
    eventually(WAIT, "the stalled worker drops the job", || async {
        (stalled.metrics.jobs(Outcome::Abandoned) == 1).then_some(())
    })
    .await;
    let (first, _) = answer(&mut inbox).await;
    assert_eq!(first.worker, "healthy");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), inbox.next())
            .await
            .is_err(),
        "answered once"
    );
    let stored = fleet.stored_result(&job).await.expect("stored");
    assert_eq!(stored.worker, "healthy");
    assert_eq!(stalled.metrics.jobs(Outcome::Ok), 0);
    stop_healthy.send(()).expect("healthy worker running");
    healthy
        .join()
        .expect("healthy worker thread")
        .expect("healthy worker stops cleanly");
    stalled.stop().await.expect("clean stop");
}

#[tokio::test]
async fn one_poison_input_fails_only_its_own_job() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    embedder.poison("kaboom");
    let worker = fleet
        .worker(
            config(fleet.server.url(), &["--max-delay", "300ms"]),
            embedder.clone(),
        )
        .await;
    let good: Vec<Job> = (0..3)
        .map(|i| job(&format!("good-{i}"), &[&format!("fine text {i}")]))
        .collect();
    let poison = job("poison", &["fine", "kaboom here"]);
    for job in good.iter().chain([&poison]) {
        fleet.enqueue(job, None).await;
    }
    for job in &good {
        assert_eq!(fleet.wait_result(job).await.status, ResultStatus::Ok);
    }
    let failed = fleet.wait_result(&poison).await;
    assert_eq!(failed.error_code(), Some(ErrorCode::Internal));
    fleet.wait_queue_empty().await;
    assert!(
        embedder.batches()[0].len() > 2,
        "the poison job was batched with others first"
    );
    let info = fleet.consumer_info().await;
    assert_eq!(info.num_redelivered, 0, "no job spent a second delivery");
    assert_eq!(worker.metrics.jobs(Outcome::Retried), 0);
    assert_eq!(worker.metrics.jobs(Outcome::DeadLettered), 1);
    assert_eq!(fleet.messages_in(subject::DLQ_STREAM).await, 1);
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_batch_that_hangs_makes_the_worker_hand_back_its_jobs_and_stop() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    embedder.set_delay(Duration::from_secs(60));
    let worker = fleet
        .worker(
            config(
                fleet.server.url(),
                &[
                    "--batch-timeout",
                    "500ms",
                    "--batch-timeout-per-token",
                    "0ms",
                    "--ack-wait",
                    "10s",
                ],
            ),
            embedder.clone(),
        )
        .await;
    let hung = job("job-hung", &["never returns"]);
    fleet.enqueue(&hung, None).await;
    let stopped = tokio::time::timeout(WAIT, worker.task)
        .await
        .expect("the worker stops by itself")
        .expect("no panic");
    assert!(
        matches!(
            stopped,
            Err(PipelineError::Model(ModelFault::Stalled {
                padded_tokens: 2,
                ..
            }))
        ),
        "{stopped:?}"
    );
    assert_eq!(worker.metrics.ready.get(), 0, "reported unready");
    assert_eq!(fleet.messages_in(subject::DLQ_STREAM).await, 0);
    // Handed back at once for another worker, not after the 10 s ack wait.
    let rescuer = fleet
        .worker(config(fleet.server.url(), &["--ack-wait", "10s"]), fake())
        .await;
    let rescued = eventually(
        Duration::from_secs(5),
        "the job answered by another worker",
        || fleet.stored_result(&hung),
    )
    .await;
    assert_eq!(rescued.status, ResultStatus::Ok);
    rescuer.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "current_thread")]
async fn a_frozen_process_is_not_taken_for_a_hung_model() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    // The batch's bound is 1 s; the whole worker (on this test's only thread) then stands still
    // for 3 s inside the batch, as under SIGSTOP, and the batch needs 0.5 s more after that.
    embedder.freeze_next(Duration::from_secs(3));
    embedder.set_delay(Duration::from_millis(500));
    let worker = fleet
        .worker(
            config(
                fleet.server.url(),
                &["--batch-timeout", "1s", "--batch-timeout-per-token", "0ms"],
            ),
            embedder.clone(),
        )
        .await;
    let job = job("job-frozen", &["text"]);
    fleet.enqueue(&job, None).await;
    // Its hold on the job lapsed in the freeze (ack wait 2 s): the job comes back to it and is
    // answered then.
    assert_eq!(fleet.wait_result(&job).await.status, ResultStatus::Ok);
    assert!(!worker.task.is_finished(), "the worker kept running");
    assert_eq!(worker.metrics.ready.get(), 1);
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_model_that_keeps_failing_stops_the_worker_instead_of_draining_the_queue() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    embedder.fail_next(1000);
    let worker = fleet
        .worker(
            config(
                fleet.server.url(),
                &[
                    "--max-model-failures",
                    "3",
                    "--max-batch-size",
                    "1",
                    "--max-deliver",
                    "2",
                ],
            ),
            embedder.clone(),
        )
        .await;
    let jobs: Vec<Job> = (0..6)
        .map(|i| job(&format!("doomed-{i}"), &["text"]))
        .collect();
    for job in &jobs {
        fleet.enqueue(job, None).await;
    }
    let stopped = tokio::time::timeout(WAIT, worker.task)
        .await
        .expect("the worker stops by itself")
        .expect("no panic");
    assert!(
        matches!(
            stopped,
            Err(PipelineError::Model(ModelFault::Failing {
                failures: 3,
                ..
            }))
        ),
        "{stopped:?}"
    );
    assert_eq!(fleet.messages_in(subject::DLQ_STREAM).await, 0);
    assert_eq!(
        fleet.messages_in(subject::JOBS_STREAM).await,
        6,
        "every job still queued"
    );
}

#[tokio::test]
async fn a_job_whose_last_delivery_is_never_settled_is_dead_lettered_and_answered() {
    let fleet = Fleet::start().await;
    let config = config(fleet.server.url(), &["--max-deliver", "1"]);
    let mut inbox = fleet
        .client
        .subscribe("_INBOX.acme.exhausted")
        .await
        .expect("sub");
    let job = job("job-exhausted", &["text"]);
    fleet.enqueue(&job, Some("_INBOX.acme.exhausted")).await;
    // Another holder of the shared consumer takes the job's only delivery and never settles it,
    // as a worker killed mid-batch would.
    let holder = consumer::bind(&fleet.js, &config.consumer)
        .await
        .expect("bind");
    let mut delivery = holder
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    let _taken = delivery.next().await.expect("a delivery").expect("message");

    let worker = fleet.worker(config, fake()).await;
    eventually(WAIT, "the exhausted job dead-lettered", || async {
        (fleet.messages_in(subject::DLQ_STREAM).await == 1).then_some(())
    })
    .await;
    let dead = fleet
        .stream(subject::DLQ_STREAM)
        .await
        .get_raw_message(1)
        .await
        .expect("dead letter");
    let reason = dead.headers.get(subject::DLQ_REASON).expect("reason");
    assert!(reason.as_str().contains("delivered 1 times"), "{reason}");
    let stored = fleet.wait_result(&job).await;
    assert_eq!(stored.error_code(), Some(ErrorCode::Internal));
    let (answered, _) = answer(&mut inbox).await;
    assert_eq!(answered.status, ResultStatus::Failed);
    fleet.wait_queue_empty().await;
    assert_eq!(worker.metrics.jobs(Outcome::DeadLettered), 1);
    worker.stop().await.expect("clean stop");
}

/// Queues `job` and lets its only delivery (`--max-deliver 1`) run out unsettled while no
/// worker listens for the max-deliveries advisory: the server never delivers it again, yet
/// keeps it queued. Returns its queue sequence.
async fn strand_out_of_deliveries(
    fleet: &Fleet,
    config: &WorkerConfig,
    job: &Job,
    reply: &str,
) -> u64 {
    let job_seq = fleet.enqueue(job, Some(reply)).await;
    let holder = consumer::bind(&fleet.js, &config.consumer)
        .await
        .expect("bind");
    let mut delivery = holder
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("fetch");
    let _taken = delivery.next().await.expect("a delivery").expect("message");
    tokio::time::sleep(config.consumer.ack_wait + Duration::from_millis(500)).await;
    let mut after = holder
        .fetch()
        .max_messages(1)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .expect("fetch");
    assert!(after.next().await.is_none(), "never delivered again");
    assert_eq!(
        fleet.messages_in(subject::JOBS_STREAM).await,
        1,
        "but still queued"
    );
    job_seq
}

#[tokio::test]
async fn a_job_out_of_deliveries_while_no_worker_listened_is_settled_at_start() {
    let fleet = Fleet::start().await;
    let config = config(
        fleet.server.url(),
        &["--max-deliver", "1", "--ack-wait", "1s"],
    );
    let job = job("job-unheard", &["text"]);
    let mut inbox = fleet
        .client
        .subscribe("_INBOX.acme.unheard")
        .await
        .expect("sub");
    strand_out_of_deliveries(&fleet, &config, &job, "_INBOX.acme.unheard").await;

    let worker = fleet.worker(config, fake()).await;
    let stored = fleet.wait_result(&job).await;
    assert_eq!(stored.error_code(), Some(ErrorCode::Internal));
    let (answered, _) = answer(&mut inbox).await;
    assert_eq!(answered.status, ResultStatus::Failed);
    fleet.wait_queue_empty().await;
    assert_eq!(fleet.messages_in(subject::DLQ_STREAM).await, 1);
    assert_eq!(worker.metrics.reconciled_count(Reconciled::Exhausted), 1);
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_stranded_job_is_not_answered_on_another_tenants_inbox() {
    let fleet = Fleet::start().await;
    let config = config(
        fleet.server.url(),
        &["--max-deliver", "1", "--ack-wait", "1s"],
    );
    let job = job("job-elsewhere", &["text"]);
    let mut elsewhere = fleet
        .client
        .subscribe("_INBOX.globex.stranded")
        .await
        .expect("sub");
    strand_out_of_deliveries(&fleet, &config, &job, "_INBOX.globex.stranded").await;
    let worker = fleet.worker(config, fake()).await;
    let stored = fleet.wait_result(&job).await;
    assert_eq!(stored.error_code(), Some(ErrorCode::Internal));
    fleet.wait_queue_empty().await;
    assert_silent(&mut elsewhere, "nothing sent to another tenant's inbox").await;
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_stranded_job_whose_result_is_stored_is_removed_not_dead_lettered() {
    let fleet = Fleet::start().await;
    let config = config(
        fleet.server.url(),
        &["--max-deliver", "1", "--ack-wait", "1s"],
    );
    let job = job("job-orphan", &["text"]);
    let mut inbox = fleet
        .client
        .subscribe("_INBOX.acme.orphan")
        .await
        .expect("sub");
    // Its result was stored, but the queue kept the message (as a broker that lost the ack
    // does): it only has to go.
    let job_seq = strand_out_of_deliveries(&fleet, &config, &job, "_INBOX.acme.orphan").await;
    store_earlier_result(&fleet, &job, job_seq, "earlier-worker").await;

    let worker = fleet.worker(config, fake()).await;
    fleet.wait_queue_empty().await;
    assert_eq!(worker.metrics.reconciled_count(Reconciled::Orphan), 1);
    assert_eq!(fleet.messages_in(subject::DLQ_STREAM).await, 0);
    let kept = fleet.stored_result(&job).await.expect("stored");
    assert_eq!(kept.worker, "earlier-worker");
    assert_silent(&mut inbox, "not answered again").await;
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn the_results_stream_keeps_one_result_per_job_even_past_the_duplicate_window() {
    let fleet = Fleet::start().await;
    let job = job("job-twice", &["text"]);
    // Two different message ids stand for a redelivery answered after the window passed.
    for attempt in ["first", "second"] {
        let mut headers = HeaderMap::new();
        headers.insert(subject::MSG_ID, attempt);
        fleet
            .js
            .publish_with_headers(
                subject::results(&job.tenant, &job.job_id),
                headers,
                attempt.into(),
            )
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    assert_eq!(fleet.messages_in(subject::RESULTS_STREAM).await, 1);
}

#[tokio::test]
async fn poison_jobs_go_to_the_dead_letter_stream_and_are_not_redelivered() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    let worker = fleet
        .worker(config(fleet.server.url(), &[]), embedder.clone())
        .await;
    let mut inbox = fleet
        .client
        .subscribe("_INBOX.acme.poison")
        .await
        .expect("sub");

    let mut headers = HeaderMap::new();
    headers.insert(subject::REPLY_TO, "_INBOX.acme.poison");
    fleet
        .enqueue_raw(b"not messagepack".to_vec(), headers)
        .await;

    let mut too_long = job("job-too-long", &["short", &"word ".repeat(100)]);
    too_long.task = Task::Embed {
        inputs: too_long.task.inputs().to_vec(),
        normalize: true,
        truncate: false,
    };
    fleet.enqueue(&too_long, Some("_INBOX.acme.poison")).await;
    let stored = fleet.wait_result(&too_long).await;
    assert_eq!(stored.error_code(), Some(ErrorCode::InputTooLong));
    // The unreadable job names no tenant, so it has no inbox to be answered on: the first
    // answer is the second job's.
    let (answered, reply) = answer(&mut inbox).await;
    assert_eq!(answered.job_id, "job-too-long");
    let reply_headers = reply.headers.expect("error headers");
    assert_eq!(
        reply_headers
            .get(subject::SERVICE_ERROR_CODE)
            .map(|v| v.as_str()),
        Some("input_too_long")
    );

    // Past the dispatcher (straight onto the queue), with an id that cannot be a subject token
    // or a header value, and an error that quotes it.
    let bad_id = job("bad\r\nid", &["text"]);
    let envelope = signer("acme").sign_job(&bad_id).expect("sign");
    fleet
        .enqueue_raw(encode(&envelope).expect("encode"), HeaderMap::new())
        .await;

    let dlq = fleet.stream(subject::DLQ_STREAM).await;
    eventually(WAIT, "three dead letters", || async {
        (fleet.messages_in(subject::DLQ_STREAM).await == 3).then_some(())
    })
    .await;
    let first = dlq.get_raw_message(1).await.expect("first dead letter");
    assert_eq!(
        &first.payload[..],
        b"not messagepack",
        "the original payload is kept"
    );
    let reason = first.headers.get(subject::DLQ_REASON).expect("reason");
    assert!(reason.as_str().contains("bad envelope"), "{reason}");
    let second = dlq.get_raw_message(2).await.expect("second dead letter");
    let reason = second.headers.get(subject::DLQ_REASON).expect("reason");
    assert!(reason.as_str().contains("input 1"), "{reason}");
    let third = dlq.get_raw_message(3).await.expect("third dead letter");
    let reason = third.headers.get(subject::DLQ_REASON).expect("reason");
    assert!(reason.as_str().contains("job_id \"bad"), "{reason}");

    // Terminated, not left to time out: nothing comes back after the ack wait.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let info = fleet.consumer_info().await;
    assert_eq!(info.num_ack_pending, 0);
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(fleet.messages_in(subject::DLQ_STREAM).await, 3);
    assert!(
        embedder.batches().is_empty(),
        "poison never reaches the model"
    );
    assert_eq!(worker.metrics.jobs(Outcome::DeadLettered), 3);
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_dead_letter_whose_result_cannot_be_stored_stays_queued_until_it_can() {
    let fleet = Fleet::start().await;
    let worker = fleet
        .worker(
            config(fleet.server.url(), &["--max-deliver", "100"]),
            fake(),
        )
        .await;
    // A first job answered proves the worker is past its start-up checks of the streams.
    let first = job("job-first", &["text"]);
    fleet.enqueue(&first, None).await;
    fleet.wait_result(&first).await;
    fleet
        .js
        .delete_stream(subject::RESULTS_STREAM)
        .await
        .expect("results stream deleted");
    let mut too_long = job("job-too-long", &[&"word ".repeat(100)]);
    too_long.task = Task::Embed {
        inputs: too_long.task.inputs().to_vec(),
        normalize: true,
        truncate: false,
    };
    fleet.enqueue(&too_long, None).await;
    eventually(WAIT, "a dead letter", || async {
        (fleet.messages_in(subject::DLQ_STREAM).await == 1).then_some(())
    })
    .await;
    // Several deliveries later (200 ms apart) the job is still queued, its dead letter kept once.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(fleet.messages_in(subject::JOBS_STREAM).await, 1);
    assert_eq!(fleet.messages_in(subject::DLQ_STREAM).await, 1);
    assert_eq!(worker.metrics.jobs(Outcome::DeadLettered), 0);

    fleet_streams::ensure_all(&fleet.js, &fleet_streams::StreamLimits::default())
        .await
        .expect("results stream back");
    let stored = fleet.wait_result(&too_long).await;
    assert_eq!(stored.error_code(), Some(ErrorCode::InputTooLong));
    fleet.wait_queue_empty().await;
    assert_eq!(fleet.messages_in(subject::DLQ_STREAM).await, 1);
    assert_eq!(worker.metrics.jobs(Outcome::DeadLettered), 1);
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn an_expired_job_is_answered_expired_without_inference() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    let worker = fleet
        .worker(config(fleet.server.url(), &[]), embedder.clone())
        .await;
    let mut late = job("job-late", &["too late"]);
    late.deadline_ms = Some(1_000);
    fleet.enqueue(&late, None).await;
    let stored = fleet.wait_result(&late).await;
    assert_eq!(stored.status, ResultStatus::Failed);
    assert_eq!(stored.error_code(), Some(ErrorCode::Expired));
    let raw = fleet
        .stream(subject::RESULTS_STREAM)
        .await
        .get_last_raw_message_by_subject(&subject::results("acme", "job-late"))
        .await
        .expect("stored");
    assert_eq!(
        raw.headers
            .get(subject::SERVICE_ERROR_CODE)
            .map(|v| v.as_str()),
        Some("expired")
    );
    assert!(embedder.batches().is_empty());
    eventually(WAIT, "expired job acked", || async {
        (worker.metrics.jobs(Outcome::Expired) == 1).then_some(())
    })
    .await;
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn one_batch_mixes_inputs_of_several_jobs() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    let worker = fleet
        .worker(
            config(
                fleet.server.url(),
                &["--max-delay", "300ms", "--max-batch-size", "32"],
            ),
            embedder.clone(),
        )
        .await;
    let jobs: Vec<Job> = (0..3)
        .map(|i| {
            job(
                &format!("mix-{i}"),
                &[&format!("job {i} first"), &format!("job {i} second text")],
            )
        })
        .collect();
    for job in &jobs {
        fleet.enqueue(job, None).await;
    }
    for job in &jobs {
        let result = fleet.wait_result(job).await;
        let expected: Vec<Vec<f32>> = job
            .task
            .inputs()
            .iter()
            .map(|t| embedder.expected_vector(t, true))
            .collect();
        assert_eq!(vectors(&result), expected, "{}", job.job_id);
    }
    let largest = embedder.batches().iter().map(Vec::len).max().unwrap_or(0);
    assert!(
        largest > 2,
        "some batch held inputs of more than one job: {largest}"
    );
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_model_failure_is_retried_and_the_last_delivery_is_dead_lettered() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    embedder.fail_next(1);
    let worker = fleet
        .worker(
            config(fleet.server.url(), &["--max-deliver", "2"]),
            embedder.clone(),
        )
        .await;
    let retried = job("job-retried", &["flaky model"]);
    fleet.enqueue(&retried, None).await;
    let result = fleet.wait_result(&retried).await;
    assert_eq!(result.status, ResultStatus::Ok, "second delivery succeeds");
    assert_eq!(worker.metrics.jobs(Outcome::Retried), 1);

    embedder.fail_next(2);
    let doomed = job("job-doomed", &["broken model"]);
    fleet.enqueue(&doomed, None).await;
    let result = fleet.wait_result(&doomed).await;
    assert_eq!(result.error_code(), Some(ErrorCode::Internal));
    let dead = fleet
        .stream(subject::DLQ_STREAM)
        .await
        .get_last_raw_message_by_subject(&subject::dlq(MODEL))
        .await
        .expect("dead letter");
    let reason = dead.headers.get(subject::DLQ_REASON).expect("reason");
    assert!(reason.as_str().contains("delivery 2 of 2"), "{reason}");
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn a_long_batch_keeps_its_jobs_with_in_progress_acks() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    embedder.set_delay(Duration::from_millis(2500));
    let worker = fleet
        .worker(
            config(fleet.server.url(), &["--ack-wait", "1s"]),
            embedder.clone(),
        )
        .await;
    let slow = job("job-slow", &["takes a while"]);
    fleet.enqueue(&slow, None).await;
    fleet.wait_result(&slow).await;
    let info = fleet.consumer_info().await;
    assert_eq!(
        info.num_redelivered, 0,
        "never redelivered though inference outlasted ack wait"
    );
    assert_eq!(embedder.batches().len(), 1);
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn shutdown_answers_every_job_in_flight() {
    let fleet = Fleet::start().await;
    let embedder = fake();
    embedder.set_delay(Duration::from_millis(300));
    let worker = fleet
        .worker(
            config(fleet.server.url(), &["--max-batch-size", "2"]),
            embedder.clone(),
        )
        .await;
    let jobs: Vec<Job> = (0..10)
        .map(|i| job(&format!("drain-{i}"), &["some text"]))
        .collect();
    for job in &jobs {
        fleet.enqueue(job, None).await;
    }
    eventually(WAIT, "the first batch running", || async {
        (!embedder.batches().is_empty()).then_some(())
    })
    .await;
    let metrics = worker.metrics.clone();
    worker.stop().await.expect("clean stop");

    let mut answered: u64 = 0;
    for job in &jobs {
        if fleet.stored_result(job).await.is_some() {
            answered += 1;
        }
    }
    let info = fleet.consumer_info().await;
    assert_eq!(
        info.num_ack_pending, 0,
        "nothing left held by the stopped worker"
    );
    assert_eq!(answered, metrics.jobs(Outcome::Ok));
    assert!(
        answered > 2,
        "jobs pulled before shutdown were finished: {answered}"
    );
    assert_eq!(
        answered + fleet.messages_in(subject::JOBS_STREAM).await,
        10,
        "every job is answered or still queued"
    );
}

#[tokio::test]
async fn a_consumer_with_other_settings_is_refused() {
    let fleet = Fleet::start().await;
    let backoff = ["--backoff", "2s,4s"];
    consumer::bind(&fleet.js, &config(fleet.server.url(), &backoff).consumer)
        .await
        .expect("first bind creates, and the server keeps every setting");
    consumer::bind(&fleet.js, &config(fleet.server.url(), &backoff).consumer)
        .await
        .expect("a second worker with the same settings binds the same consumer");
    let other = config(
        fleet.server.url(),
        &["--backoff", "2s,4s", "--max-deliver", "9"],
    )
    .consumer;
    let err = consumer::bind(&fleet.js, &other).await.unwrap_err();
    match err {
        ConsumerSetupError::Mismatch { differences, .. } => {
            let fields: Vec<_> = differences.iter().map(|d| d.field).collect();
            assert_eq!(fields, ["max_deliver"]);
        }
        other => panic!("expected a mismatch, got {other}"),
    }
}
