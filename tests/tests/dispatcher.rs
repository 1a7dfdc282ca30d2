//! The dispatcher against a real nats-server: what it admits reaches FLEET_JOBS once; what it
//! refuses is answered with a typed code on the wire and leaves the queue untouched.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream;
use fleet_dispatcher::{Dispatcher, DispatcherConfig, StartError};
use fleet_keys::{KeyStore, Tenants};
use fleet_schemas::{
    ErrorCode, Job, JobResult, ResultStatus, SignedJob, SigningKey, SubmitReply, SubmitStatus,
    decode, encode, now_ms, subject,
};
use fleet_streams::TopologyError;
use fleet_tests::{NatsServer, Streams, TestTenant};
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

const MODEL: &str = "all-minilm-l6-v2";
const TIMEOUT: Duration = Duration::from_secs(10);

struct Fleet {
    _nats: NatsServer,
    client: async_nats::Client,
    streams: Streams,
    acme: TestTenant,
    globex: TestTenant,
    dispatchers: Vec<RunningDispatcher>,
}

struct RunningDispatcher {
    dispatcher: Arc<Dispatcher>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningDispatcher {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.await.expect("dispatcher task");
    }
}

fn tenants_toml(acme: &TestTenant, globex: &TestTenant) -> String {
    format!(
        "[[tenants]]\nname = \"acme\"\nmodels = [\"{MODEL}\"]\nrate_per_second = 1000\nburst = 1000\n\
         keys = [{{ key_id = \"{}\", public_key = \"{}\" }}]\n\
         [[tenants]]\nname = \"globex\"\nmodels = [\"other-model\"]\nrate_per_second = 1\nburst = 2\n\
         keys = [{{ key_id = \"{}\", public_key = \"{}\" }}]\n",
        acme.key.key_id,
        acme.public_key().to_hex(),
        globex.key.key_id,
        globex.public_key().to_hex(),
    )
}

fn config(nats: &NatsServer, extra: &[&str]) -> DispatcherConfig {
    let mut args = vec![
        "dispatcher",
        "--nats-url",
        nats.url(),
        "--models",
        "all-minilm-l6-v2,other-model",
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    fleet_service::load_config(args.into_iter().map(Into::into)).expect("valid test config")
}

async fn start_dispatcher(
    nats: &NatsServer,
    acme: &TestTenant,
    globex: &TestTenant,
    name: &str,
    extra: &[&str],
) -> Result<RunningDispatcher, StartError> {
    let mut args = vec!["--name", name];
    args.extend_from_slice(extra);
    let config = config(nats, &args);
    let tenants = Tenants::from_toml(&tenants_toml(acme, globex)).expect("tenants");
    let dispatcher =
        Dispatcher::start(&config, KeyStore::fixed(tenants), &mut Registry::default()).await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let listening = dispatcher.clone().listen().await.expect("subscribes");
    let task = tokio::spawn(listening.run(async {
        let _ = stopped.await;
    }));
    Ok(RunningDispatcher {
        dispatcher,
        stop: Some(stop),
        task,
    })
}

impl Fleet {
    async fn start(dispatchers: usize, extra: &[&str]) -> Fleet {
        let nats = NatsServer::start();
        // Calls are acme's: answers come only to its own inboxes.
        let client = nats.tenant_client("acme").await;
        let streams = Streams::connect(&nats).await;
        let acme = TestTenant::new("acme");
        let globex = TestTenant::new("globex");
        let mut running = Vec::new();
        for i in 0..dispatchers {
            running.push(
                start_dispatcher(&nats, &acme, &globex, &format!("dispatcher-{i}"), extra)
                    .await
                    .expect("dispatcher starts"),
            );
        }
        Fleet {
            _nats: nats,
            client,
            streams,
            acme,
            globex,
            dispatchers: running,
        }
    }

    fn job(&self, tenant: &str, inputs: Vec<String>) -> Job {
        Job::embed(fleet_client::new_job_id(), tenant, MODEL, inputs, now_ms())
    }

    fn signed(&self, key: &SigningKey, job: &Job) -> Vec<u8> {
        encode(&key.sign_job(job).expect("sign")).expect("encode")
    }

    /// Sends `payload` as a request whose answers go to `inbox`, without waiting for them.
    async fn send_to_inbox(&self, subject: String, inbox: &str, payload: Vec<u8>) {
        self.client
            .publish_with_reply(subject, inbox.to_owned(), payload.into())
            .await
            .unwrap();
    }

    async fn send(&self, subject: String, payload: Vec<u8>) -> async_nats::Message {
        tokio::time::timeout(TIMEOUT, self.client.request(subject, payload.into()))
            .await
            .expect("answered in time")
            .expect("request")
    }

    async fn submit(&self, payload: Vec<u8>) -> (SubmitReply, async_nats::Message) {
        let answer = self.send(subject::submit(MODEL), payload).await;
        let reply = decode(&answer.payload, 1 << 20).expect("submit reply decodes");
        (reply, answer)
    }

    async fn queued_jobs(&self) -> u64 {
        self.streams.messages_in(subject::JOBS_STREAM).await
    }
}

fn error_code_header(message: &async_nats::Message) -> Option<String> {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(subject::SERVICE_ERROR_CODE))
        .map(|v| v.as_str().to_owned())
}

/// Asserts a submit was refused with `code`, in the body and in the header.
async fn assert_submit_rejected(fleet: &Fleet, payload: Vec<u8>, code: ErrorCode) {
    let (reply, message) = fleet.submit(payload).await;
    assert_eq!(reply.status, SubmitStatus::Rejected, "{reply:?}");
    assert_eq!(
        reply.error.as_ref().map(|e| e.code),
        Some(code),
        "{reply:?}"
    );
    assert_eq!(error_code_header(&message).as_deref(), Some(code.as_str()));
}

#[tokio::test]
async fn every_rejection_is_typed_and_queues_nothing() {
    let fleet = Fleet::start(
        1,
        &[
            "--max-inputs",
            "4",
            "--max-input-bytes",
            "100",
            "--max-envelope-bytes",
            "4096",
        ],
    )
    .await;
    let acme = &fleet.acme.key;
    let ok_job = fleet.job("acme", vec!["hello".into()]);

    assert_submit_rejected(
        &fleet,
        b"\x93not an envelope".to_vec(),
        ErrorCode::Malformed,
    )
    .await;

    // The decode error quotes a field name with a line break; headers cannot carry one.
    #[derive(serde::Serialize)]
    struct OddEnvelope {
        v: u8,
        #[serde(rename = "x\r\ny")]
        odd: u8,
    }
    let (reply, message) = fleet
        .submit(encode(&OddEnvelope { v: 1, odd: 0 }).unwrap())
        .await;
    assert_eq!(reply.error.map(|e| e.code), Some(ErrorCode::Malformed));
    let reason = message
        .headers
        .as_ref()
        .and_then(|h| h.get(subject::SERVICE_ERROR))
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default();
    // The reason names the key, with its line break escaped or replaced: never a raw one.
    assert!(
        reason.contains("unknown key") && !reason.contains(['\r', '\n']),
        "{reason}"
    );

    let mut envelope = acme.sign_job(&ok_job).unwrap();
    envelope.v = 2;
    assert_submit_rejected(
        &fleet,
        encode(&envelope).unwrap(),
        ErrorCode::UnsupportedVersion,
    )
    .await;

    let stranger = SigningKey::generate("stranger-1");
    assert_submit_rejected(
        &fleet,
        fleet.signed(&stranger, &ok_job),
        ErrorCode::UnknownKey,
    )
    .await;

    let mut tampered: SignedJob = acme.sign_job(&ok_job).unwrap();
    let last = tampered.body.len() - 1;
    tampered.body[last] ^= 1;
    assert_submit_rejected(&fleet, encode(&tampered).unwrap(), ErrorCode::BadSignature).await;

    let forged_for_globex = fleet.job("globex", vec!["x".into()]);
    assert_submit_rejected(
        &fleet,
        fleet.signed(acme, &forged_for_globex),
        ErrorCode::Forbidden,
    )
    .await;
    let globex_job = fleet.job("globex", vec!["x".into()]);
    assert_submit_rejected(
        &fleet,
        fleet.signed(&fleet.globex.key, &globex_job),
        ErrorCode::Forbidden,
    )
    .await;

    let mut old = fleet.job("acme", vec!["x".into()]);
    old.created_at_ms -= 10 * 60 * 1000;
    assert_submit_rejected(&fleet, fleet.signed(acme, &old), ErrorCode::Expired).await;
    let mut future = fleet.job("acme", vec!["x".into()]);
    future.created_at_ms += 10 * 60 * 1000;
    assert_submit_rejected(&fleet, fleet.signed(acme, &future), ErrorCode::Expired).await;
    let mut past_deadline = fleet.job("acme", vec!["x".into()]);
    past_deadline.deadline_ms = Some(now_ms() - 1);
    assert_submit_rejected(
        &fleet,
        fleet.signed(acme, &past_deadline),
        ErrorCode::Expired,
    )
    .await;

    let many = fleet.job("acme", vec!["x".into(); 5]);
    assert_submit_rejected(&fleet, fleet.signed(acme, &many), ErrorCode::TooLarge).await;
    let long = fleet.job("acme", vec!["x".repeat(101)]);
    assert_submit_rejected(&fleet, fleet.signed(acme, &long), ErrorCode::TooLarge).await;
    let huge_envelope = vec![0xc4; 4097];
    assert_submit_rejected(&fleet, huge_envelope, ErrorCode::TooLarge).await;
    let empty = fleet.job("acme", vec![]);
    assert_submit_rejected(&fleet, fleet.signed(acme, &empty), ErrorCode::Malformed).await;
    let mut bad_id = fleet.job("acme", vec!["x".into()]);
    bad_id.job_id = "has.a.dot".into();
    assert_submit_rejected(&fleet, fleet.signed(acme, &bad_id), ErrorCode::Malformed).await;

    let answer = fleet
        .send(
            subject::submit("no-such-model"),
            fleet.signed(acme, &ok_job),
        )
        .await;
    let reply: SubmitReply = decode(&answer.payload, 1 << 20).unwrap();
    assert_eq!(reply.error.map(|e| e.code), Some(ErrorCode::UnknownModel));

    // An infer rejection is a JobResult, so a synchronous caller decodes one type.
    let answer = fleet
        .send(subject::infer(MODEL), fleet.signed(&stranger, &ok_job))
        .await;
    let result: JobResult = decode(&answer.payload, 1 << 20).unwrap();
    assert_eq!(result.status, ResultStatus::Rejected);
    assert_eq!(result.error_code(), Some(ErrorCode::UnknownKey));
    assert_eq!(error_code_header(&answer).as_deref(), Some("unknown_key"));

    assert_eq!(
        fleet.queued_jobs().await,
        0,
        "a rejected job reached the queue"
    );
}

#[tokio::test]
async fn rate_limit_allows_the_burst_then_rejects() {
    let fleet = Fleet::start(1, &["--models", "all-minilm-l6-v2,other-model"]).await;
    let globex = &fleet.globex.key;
    let mut codes = Vec::new();
    for _ in 0..3 {
        let mut job = fleet.job("globex", vec!["x".into()]);
        job.model = "other-model".into();
        let answer = fleet
            .send(subject::submit("other-model"), fleet.signed(globex, &job))
            .await;
        let reply: SubmitReply = decode(&answer.payload, 1 << 20).unwrap();
        codes.push(reply.error.map(|e| e.code));
    }
    assert_eq!(codes, [None, None, Some(ErrorCode::RateLimited)]);
}

#[tokio::test]
async fn a_resubmitted_job_is_stored_once() {
    let fleet = Fleet::start(1, &[]).await;
    let job = fleet.job("acme", vec!["same".into()]);
    let payload = fleet.signed(&fleet.acme.key, &job);
    let (first, _) = fleet.submit(payload.clone()).await;
    let (second, _) = fleet.submit(payload).await;
    assert_eq!(first.status, SubmitStatus::Accepted);
    assert!(!first.duplicate);
    assert_eq!(second.status, SubmitStatus::Accepted);
    assert!(second.duplicate, "the second submit must say duplicate");
    assert_eq!(first.stream_seq, second.stream_seq);
    assert_eq!(first.job_id, job.job_id);
    assert_eq!(fleet.queued_jobs().await, 1);
}

#[tokio::test]
async fn two_tenants_may_use_the_same_job_id() {
    let fleet = Fleet::start(1, &[]).await;
    let acme_job = Job::embed("row-1", "acme", MODEL, vec!["x".into()], now_ms());
    let globex_job = Job::embed("row-1", "globex", "other-model", vec!["x".into()], now_ms());
    let (acme_reply, _) = fleet.submit(fleet.signed(&fleet.acme.key, &acme_job)).await;
    let globex_answer = fleet
        .send(
            subject::submit("other-model"),
            fleet.signed(&fleet.globex.key, &globex_job),
        )
        .await;
    let globex_reply: SubmitReply = decode(&globex_answer.payload, 1 << 20).unwrap();
    for reply in [&acme_reply, &globex_reply] {
        assert_eq!(reply.status, SubmitStatus::Accepted, "{reply:?}");
        assert!(
            !reply.duplicate,
            "one tenant's job shadowed another's: {reply:?}"
        );
    }
    assert_eq!(fleet.queued_jobs().await, 2);
}

#[tokio::test]
async fn a_repeated_infer_is_answered_with_the_jobs_stored_result() {
    let fleet = Fleet::start(1, &[]).await;
    let job = fleet.job("acme", vec!["x".into()]);
    let payload = fleet.signed(&fleet.acme.key, &job);
    // The first call's job is queued; its worker would answer the first inbox only.
    let first_inbox = fleet.client.new_inbox();
    fleet
        .send_to_inbox(subject::infer(MODEL), &first_inbox, payload.clone())
        .await;
    let js = &fleet.streams.js;
    fleet_tests::eventually(TIMEOUT, "the job in FLEET_JOBS", || {
        let fleet = &fleet;
        async move { (fleet.queued_jobs().await == 1).then_some(()) }
    })
    .await;
    // A result of an earlier job with the same id (stored before the duplicate window) is
    // not this job's answer.
    let earlier = JobResult {
        worker: "yesterday".into(),
        ..result_of(&job)
    };
    store_result(js, "999", &earlier).await;
    // A retry while the job is still running waits for its result...
    let waiting = tokio::spawn({
        let (client, payload) = (fleet.client.clone(), payload.clone());
        async move { client.request(subject::infer(MODEL), payload.into()).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !waiting.is_finished(),
        "answered with an earlier job's result"
    );
    let result = result_of(&job);
    // The job was the first message on the queue.
    store_result(js, "1", &result).await;
    let relayed = tokio::time::timeout(TIMEOUT, waiting)
        .await
        .expect("the waiting retry is answered")
        .unwrap()
        .unwrap();
    // ...and a retry after it was stored gets it at once.
    let late = fleet.send(subject::infer(MODEL), payload).await;
    for answer in [relayed, late] {
        assert_eq!(
            decode::<JobResult>(&answer.payload, 1 << 20).unwrap(),
            result
        );
        assert_eq!(
            error_code_header(&answer).as_deref(),
            Some("input_too_long")
        );
    }
    assert_eq!(fleet.queued_jobs().await, 1, "the job is queued once");
    let relayed_count = fleet.dispatchers[0].dispatcher.metrics.relayed.get();
    assert_eq!(relayed_count, 2);
}

/// Stores `result` as a worker does, as the answer to the job queued as `job_seq`.
async fn store_result(js: &jetstream::Context, job_seq: &str, result: &JobResult) {
    let mut headers = async_nats::HeaderMap::new();
    if let Some(error) = &result.error {
        headers.insert(subject::SERVICE_ERROR_CODE, error.code.as_str());
    }
    headers.insert(subject::JOB_SEQ, job_seq);
    js.publish_with_headers(
        subject::results(&result.tenant, &result.job_id),
        headers,
        encode(result).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

fn result_of(job: &Job) -> JobResult {
    JobResult {
        job_id: job.job_id.clone(),
        tenant: job.tenant.clone(),
        model: MODEL.to_owned(),
        status: ResultStatus::Failed,
        output: None,
        error: Some(fleet_schemas::ErrorBody::new(
            ErrorCode::InputTooLong,
            "too long",
        )),
        worker: "a-worker".into(),
        timings: Default::default(),
    }
}

#[tokio::test]
async fn a_stopping_dispatcher_answers_every_request_delivered_to_it() {
    let mut fleet = Fleet::start(1, &[]).await;
    let inbox = fleet.client.new_inbox();
    let mut answers = fleet.client.subscribe(inbox.clone()).await.unwrap();
    let sent = 500;
    for _ in 0..sent {
        let job = fleet.job("acme", vec!["x".into()]);
        fleet
            .send_to_inbox(
                subject::submit(MODEL),
                &inbox,
                fleet.signed(&fleet.acme.key, &job),
            )
            .await;
    }
    // Once flushed, the server has handed every request to the dispatcher's connection.
    fleet.client.flush().await.unwrap();
    fleet
        .dispatchers
        .pop()
        .expect("one dispatcher")
        .stop()
        .await;
    let mut accepted = 0;
    while let Ok(Some(answer)) =
        tokio::time::timeout(Duration::from_secs(2), futures_next(&mut answers)).await
    {
        let reply: SubmitReply = decode(&answer.payload, 1 << 20).unwrap();
        assert_eq!(reply.status, SubmitStatus::Accepted, "{reply:?}");
        accepted += 1;
    }
    assert_eq!(accepted, sent);
    assert_eq!(fleet.queued_jobs().await, sent);
}

/// What a JetStream cluster does for a few seconds after the node leading FLEET_JOBS dies:
/// nobody answers a publish to the queue. Here the stream is gone for a moment instead.
#[tokio::test]
async fn a_job_the_queue_cannot_take_for_a_moment_is_queued_once_it_can() {
    let fleet = Fleet::start(1, &[]).await;
    let jobs_stream = fleet_streams::jobs_stream(&Default::default());
    fleet
        .streams
        .js
        .delete_stream(subject::JOBS_STREAM)
        .await
        .expect("delete FLEET_JOBS");
    let job = fleet.job("acme", vec!["while the queue has no leader".into()]);
    let submitted = fleet.submit(fleet.signed(&fleet.acme.key, &job));
    let queue_back = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        fleet_streams::ensure_stream(&fleet.streams.js, jobs_stream)
            .await
            .expect("FLEET_JOBS again");
    };
    let ((reply, _), ()) = tokio::join!(submitted, queue_back);
    assert_eq!(reply.status, SubmitStatus::Accepted, "{:?}", reply.error);
    assert_eq!(fleet.queued_jobs().await, 1);
}

#[tokio::test]
async fn a_job_the_queue_cannot_take_within_the_publish_timeout_is_answered_overloaded() {
    let fleet = Fleet::start(1, &["--publish-timeout", "500ms"]).await;
    fleet
        .streams
        .js
        .delete_stream(subject::JOBS_STREAM)
        .await
        .expect("delete FLEET_JOBS");
    let job = fleet.job("acme", vec!["nobody takes it".into()]);
    let (reply, _) = fleet.submit(fleet.signed(&fleet.acme.key, &job)).await;
    assert_eq!(
        reply.error.map(|e| e.code),
        Some(ErrorCode::Overloaded),
        "the queue is away, not the job at fault: the caller may retry"
    );
}

#[tokio::test]
async fn a_full_queue_answers_overloaded_without_blocking() {
    let fleet = Fleet::start(1, &["--jobs-max-msgs", "2"]).await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        let job = fleet.job("acme", vec!["x".into()]);
        let (reply, _) = fleet.submit(fleet.signed(&fleet.acme.key, &job)).await;
        codes.push(reply.error.map(|e| e.code));
    }
    assert_eq!(codes, [None, None, Some(ErrorCode::Overloaded)]);
    assert_eq!(fleet.queued_jobs().await, 2);
}

#[tokio::test]
async fn infer_queues_the_job_with_the_callers_inbox_and_stays_silent() {
    let fleet = Fleet::start(1, &[]).await;
    let job = fleet.job("acme", vec!["x".into()]);
    let inbox = fleet.client.new_inbox();
    let mut answers = fleet.client.subscribe(inbox.clone()).await.unwrap();
    fleet
        .send_to_inbox(
            subject::infer(MODEL),
            &inbox,
            fleet.signed(&fleet.acme.key, &job),
        )
        .await;
    let stream = fleet.streams.stream(subject::JOBS_STREAM).await;
    let stored = fleet_tests::eventually(TIMEOUT, "the job in FLEET_JOBS", || {
        let stream = stream.clone();
        async move { stream.get_raw_message(1).await.ok() }
    })
    .await;
    let headers = stored.headers;
    assert_eq!(
        headers.get(subject::MSG_ID).map(|v| v.as_str()),
        Some(subject::msg_id("acme", &job.job_id).as_str())
    );
    assert_eq!(
        headers.get(subject::REPLY_TO).map(|v| v.as_str()),
        Some(inbox.as_str())
    );
    assert_eq!(stored.payload, fleet.signed(&fleet.acme.key, &job));
    // The dispatcher answers synchronous callers only to refuse; the worker answers the rest.
    let silence =
        tokio::time::timeout(Duration::from_millis(300), futures_next(&mut answers)).await;
    assert!(
        silence.is_err(),
        "the dispatcher answered an accepted infer"
    );
}

async fn futures_next(sub: &mut async_nats::Subscriber) -> Option<async_nats::Message> {
    use futures::StreamExt;
    sub.next().await
}

#[tokio::test]
async fn two_dispatchers_share_the_queue_group() {
    let fleet = Fleet::start(2, &[]).await;
    for _ in 0..40 {
        let job = fleet.job("acme", vec!["x".into()]);
        let (reply, _) = fleet.submit(fleet.signed(&fleet.acme.key, &job)).await;
        assert_eq!(reply.status, SubmitStatus::Accepted);
    }
    let per_dispatcher: Vec<u64> = fleet
        .dispatchers
        .iter()
        .map(|d| d.dispatcher.metrics.accepted.get())
        .collect();
    assert_eq!(per_dispatcher.iter().sum::<u64>(), 40);
    assert!(
        per_dispatcher.iter().all(|&n| n > 0),
        "each dispatcher should take part: {per_dispatcher:?}"
    );
    assert_eq!(fleet.queued_jobs().await, 40);
    for running in fleet.dispatchers {
        running.stop().await;
    }
}

#[tokio::test]
async fn a_stream_with_other_settings_stops_the_dispatcher_with_the_reason() {
    let nats = NatsServer::start();
    let acme = TestTenant::new("acme");
    let globex = TestTenant::new("globex");
    let first = start_dispatcher(&nats, &acme, &globex, "first", &["--jobs-max-msgs", "10"])
        .await
        .expect("first start creates the streams");
    first.stop().await;
    let err = start_dispatcher(&nats, &acme, &globex, "second", &["--jobs-max-msgs", "20"])
        .await
        .err()
        .expect("differing limits must refuse to start");
    match err {
        StartError::Topology(TopologyError::Mismatch {
            stream,
            differences,
        }) => {
            assert_eq!(stream, subject::JOBS_STREAM);
            assert_eq!(differences.len(), 1);
            assert_eq!(differences[0].field, "max_messages");
        }
        other => panic!("unexpected error: {other}"),
    }
}

#[tokio::test]
async fn an_infer_whose_reply_subject_is_not_its_tenants_inbox_is_refused_and_not_queued() {
    let fleet = Fleet::start(1, &[]).await;
    // Another tenant's inbox: refused `forbidden`, the refusal (only) sent there, so a client
    // connected with the wrong inbox prefix learns why.
    let mut globex_inbox = fleet.client.subscribe("_INBOX.globex.x").await.unwrap();
    let job = fleet.job("acme", vec!["x".into()]);
    fleet
        .send_to_inbox(
            subject::infer(MODEL),
            "_INBOX.globex.x",
            fleet.signed(&fleet.acme.key, &job),
        )
        .await;
    let refusal = tokio::time::timeout(TIMEOUT, futures_next(&mut globex_inbox))
        .await
        .expect("answered in time")
        .expect("an answer");
    let result: JobResult = decode(&refusal.payload, 1 << 20).expect("a JobResult");
    assert_eq!(result.status, ResultStatus::Rejected);
    assert_eq!(result.error_code(), Some(ErrorCode::Forbidden));
    // A subject that is no inbox at all (here one the results stream would store): nothing is
    // published there, not even the refusal.
    let mut results = fleet.client.subscribe("fleet.results.>").await.unwrap();
    let other = fleet.job("acme", vec!["y".into()]);
    fleet
        .send_to_inbox(
            subject::infer(MODEL),
            "fleet.results.globex.row-1",
            fleet.signed(&fleet.acme.key, &other),
        )
        .await;
    let silence =
        tokio::time::timeout(Duration::from_millis(500), futures_next(&mut results)).await;
    assert!(silence.is_err(), "nothing published on a results subject");
    assert_eq!(fleet.queued_jobs().await, 0, "neither job was queued");
}
