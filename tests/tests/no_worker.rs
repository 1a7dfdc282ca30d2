//! A model the dispatcher accepts but no worker serves, with real `nats-server`, `dispatcher`
//! and `worker` processes: an `infer` is refused at once with `no_worker` and nothing is queued
//! (it used to wait out the caller's whole timeout, its job left on the queue); once a worker
//! runs, the same call is answered with vectors; a `submit` is queued all along, its reply says
//! that no worker serves the model, and it is answered once one starts.

use std::time::{Duration, Instant};

use fleet_client::Tenant;
use fleet_schemas::{ErrorCode, ResultStatus, SubmitReply, SubmitStatus, decode, subject};
use fleet_tests::{
    NatsServer, Process, Streams, TestTenant, eventually, model_dir, write_tenants_file,
};

const MODEL: &str = "all-minilm-l6-v2";
/// The caller's timeout: a refusal must come well within it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The dispatcher asks for live workers this often...
const CHECK_EVERY: &str = "200ms";
/// ...and refuses a model after this long without an answer from any of its workers.
const NO_WORKER_AFTER: &str = "1s";
const NO_WORKER_AFTER_SECS: u64 = 1;
/// Processes start in parallel with other tests on a busy machine.
const STARTUP: Duration = Duration::from_secs(120);

fn spawn(dir: &std::path::Path, binary: &str, args: &[String]) -> Process {
    let log = dir.join(format!("{binary}.log"));
    Process::spawn_binary_logged(binary, args, &[("RUST_LOG", "warn")], &log)
}

/// Whether anyone answers `$SRV.PING.<service>` (the server says "no responders" otherwise).
async fn registered(client: &async_nats::Client, service: &str) -> Option<()> {
    let answer = client
        .request(format!("$SRV.PING.{service}"), "".into())
        .await
        .ok()?;
    answer.status.is_none().then_some(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_for_a_model_nobody_serves_is_refused_at_once_and_submit_waits_for_a_worker() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let tenants = write_tenants_file(dir.path(), &["acme"]);
    let tenants = tenants.to_string_lossy().into_owned();
    let common = |extra: &[&str]| -> Vec<String> {
        [
            "--nats-url",
            nats.url(),
            "--tenants",
            &tenants,
            "--metrics-addr",
            "127.0.0.1:0",
        ]
        .iter()
        .chain(extra)
        .map(|arg| arg.to_string())
        .collect()
    };
    let _dispatcher = spawn(
        dir.path(),
        "dispatcher",
        &common(&[
            "--worker-check-every",
            CHECK_EVERY,
            "--no-worker-after",
            NO_WORKER_AFTER,
        ]),
    );
    let operator = nats.client().await;
    eventually(STARTUP, "the dispatcher registered", || {
        registered(&operator, "fleet-dispatcher")
    })
    .await;
    // Past the dispatcher's grace: it has heard, for a whole window, that no worker runs.
    tokio::time::sleep(Duration::from_secs(3 * NO_WORKER_AFTER_SECS)).await;
    let streams = Streams::connect(&nats).await;
    let acme = TestTenant::new("acme");
    let tenant = Tenant {
        name: acme.name,
        key: acme.key,
    };
    let client = nats.tenant_client("acme").await;

    // infer: refused at once, nothing queued.
    let call = tenant.embed_job(MODEL, vec!["is anyone there".into()]);
    let started = Instant::now();
    let refused = fleet_client::infer(&client, &tenant, &call, CALL_TIMEOUT)
        .await
        .expect("the dispatcher answers");
    let took = started.elapsed();
    assert_eq!(refused.status, ResultStatus::Rejected, "{refused:?}");
    assert_eq!(
        refused.error_code(),
        Some(ErrorCode::NoWorker),
        "{refused:?}"
    );
    assert!(took < Duration::from_secs(5), "refused after {took:?}");
    assert_eq!(streams.messages_in(subject::JOBS_STREAM).await, 0);

    // submit: queued, and told that no worker serves the model now.
    let submitted = tenant.embed_job(MODEL, vec!["run me later".into()]);
    let answer = client
        .request(
            subject::submit(MODEL),
            tenant.sign(&submitted).unwrap().into(),
        )
        .await
        .expect("the dispatcher answers");
    let reply: SubmitReply = decode(&answer.payload, usize::MAX).expect("a submit reply");
    assert_eq!(reply.status, SubmitStatus::Accepted);
    assert!(
        reply.no_worker,
        "the reply does not say that no worker serves the model"
    );
    assert_eq!(streams.messages_in(subject::JOBS_STREAM).await, 1);

    // A worker starts: the same call is answered with vectors, and the submitted job runs.
    let model = model_dir().to_string_lossy().into_owned();
    let _worker = spawn(dir.path(), "worker", &common(&["--model-dir", &model]));
    let answered = eventually(STARTUP, "the call answered by the worker", || {
        let (client, tenant, call) = (client.clone(), &tenant, &call);
        async move {
            let answer = fleet_client::infer(&client, tenant, call, CALL_TIMEOUT)
                .await
                .ok()?;
            (answer.error_code() != Some(ErrorCode::NoWorker)).then_some(answer)
        }
    })
    .await;
    assert_eq!(answered.status, ResultStatus::Ok, "{answered:?}");
    let stored = streams.wait_result(&submitted, STARTUP).await;
    assert_eq!(stored.status, ResultStatus::Ok, "{stored:?}");

    // With the worker live, a submit no longer says there is none.
    let later = tenant.embed_job(MODEL, vec!["served now".into()]);
    let answer = client
        .request(subject::submit(MODEL), tenant.sign(&later).unwrap().into())
        .await
        .expect("the dispatcher answers");
    let reply: SubmitReply = decode(&answer.payload, usize::MAX).expect("a submit reply");
    assert_eq!(reply.status, SubmitStatus::Accepted);
    assert!(!reply.no_worker);
}
