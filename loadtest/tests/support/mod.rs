//! What loadtest's tests share: a stand-in for the fleet whose answers take a known time, on a
//! real local nats-server, and a way to run the `loadtest` binary against it. Test code only:
//! the shipped binary has no such responder.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::jetstream;
use fleet_schemas::{
    ErrorBody, ErrorCode, Job, JobResult, ResultStatus, SignedJob, SubmitReply, SubmitStatus, Task,
    decode, encode, subject,
};
use fleet_tests::NatsServer;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::Semaphore;

/// How the stand-in behaves.
#[derive(Clone, Copy)]
pub struct StandIn {
    /// How long each job takes from when it is taken up.
    pub answer_after: Duration,
    /// Jobs taken up at once (1: one after another); the rest wait in arrival order.
    pub capacity: usize,
    /// Every n-th `infer` is refused `rate_limited`.
    pub refuse_every: Option<u64>,
}

/// Serves `fleet.infer.m` (answers the caller after `answer_after`) and `fleet.submit.m`
/// (answers `accepted` at once, then stores the result on `FLEET_RESULTS` after
/// `answer_after`, which must exist). Returns every text the stand-in was sent.
pub async fn stand_in(client: async_nats::Client, stand_in: StandIn) -> Arc<Mutex<Vec<String>>> {
    let infers = client.subscribe(subject::infer("m")).await.unwrap();
    let submits = client.subscribe(subject::submit("m")).await.unwrap();
    client.flush().await.unwrap();
    let texts = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&texts);
    let js = jetstream::new(client.clone());
    let busy = Arc::new(Semaphore::new(stand_in.capacity));
    tokio::spawn(async move {
        let mut calls = futures::stream::select(infers, submits);
        let mut count = 0u64;
        while let Some(call) = calls.next().await {
            let envelope: SignedJob = decode(&call.payload, 1 << 20).unwrap();
            let job: Job = decode(&envelope.body, 1 << 20).unwrap();
            let Task::Embed { inputs, .. } = &job.task;
            seen.lock().unwrap().extend(inputs.iter().cloned());
            let reply = call.reply.unwrap();
            let submitted = call.subject.as_str() == subject::submit("m");
            count += 1;
            let refuse = !submitted
                && stand_in
                    .refuse_every
                    .is_some_and(|n| count.is_multiple_of(n));
            let result = JobResult {
                job_id: job.job_id.clone(),
                tenant: job.tenant.clone(),
                model: job.model.clone(),
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
            if submitted {
                let accepted = SubmitReply {
                    status: SubmitStatus::Accepted,
                    job_id: job.job_id.clone(),
                    stream_seq: Some(count),
                    duplicate: false,
                    error: None,
                    no_worker: false,
                };
                client
                    .publish(reply.clone(), encode(&accepted).unwrap().into())
                    .await
                    .unwrap();
            }
            let (client, js, busy) = (client.clone(), js.clone(), Arc::clone(&busy));
            tokio::spawn(async move {
                let _taken = busy.acquire().await.unwrap();
                tokio::time::sleep(stand_in.answer_after).await;
                let body = encode(&result).unwrap();
                if submitted {
                    js.publish(subject::results(&job.tenant, &job.job_id), body.into())
                        .await
                        .unwrap()
                        .await
                        .unwrap();
                } else {
                    client.publish(reply, body.into()).await.unwrap();
                }
            });
        }
    });
    texts
}

/// A fresh key of tenant `acme` (keygen refuses to overwrite the previous run's).
fn key_file(dir: &Path) -> PathBuf {
    let path = dir.join("key.toml");
    let _ = std::fs::remove_file(&path);
    let made = Command::new(fleet_tests::binary("fleet"))
        .args(["keygen", "--tenant", "acme", "--out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    path
}

/// Runs `loadtest` with `args` against `nats` (model `m`, a fresh key of tenant `acme`) and
/// returns the JSON line it prints.
pub fn loadtest(nats: &NatsServer, dir: &Path, args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["--nats-url", nats.url(), "--model", "m", "--key"])
        .arg(key_file(dir))
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}
