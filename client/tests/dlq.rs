//! `fleet dlq`: an operator lists and reads dead letters as a worker stores them, and replays
//! one: its job submitted again under a new id, signed with its tenant's key; a dead letter of
//! another tenant, or one holding no readable job, is refused with a reason.

use std::process::{Command, Output};

use async_nats::HeaderMap;
use fleet_schemas::{
    Job, SecretKeyFile, SignedJob, SubmitReply, SubmitStatus, decode, encode, subject,
};
use fleet_tests::{NatsServer, Streams, TestTenant};
use futures::StreamExt;
use serde_json::Value;

const MODEL: &str = "m";

fn fleet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(args)
        .output()
        .unwrap()
}

/// Stores a dead letter as a worker does: the queued envelope, its code, reason and queue id.
async fn dead_letter(js: &async_nats::jetstream::Context, payload: Vec<u8>, code: &str) {
    let mut headers = HeaderMap::new();
    headers.insert(subject::SERVICE_ERROR_CODE, code);
    headers.insert(subject::DLQ_REASON, "the test put it there");
    js.publish_with_headers(subject::dlq(MODEL), headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lists_shows_and_replays_dead_letters() {
    let nats = NatsServer::start();
    let _streams = Streams::create(&nats).await;
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let acme = TestTenant::new("acme");
    let old = Job::embed(
        "poisoned-1",
        "acme",
        MODEL,
        vec!["first".into(), "second".into()],
        1,
    );
    dead_letter(
        &js,
        encode(&acme.key.sign_job(&old).unwrap()).unwrap(),
        "internal",
    )
    .await;
    dead_letter(&js, b"not an envelope".to_vec(), "malformed").await;
    let bolt = TestTenant::new("bolt");
    let bolts = Job::embed("bolt-1", "bolt", MODEL, vec!["x".into()], 1);
    dead_letter(
        &js,
        encode(&bolt.key.sign_job(&bolts).unwrap()).unwrap(),
        "internal",
    )
    .await;

    let listed = fleet(&["dlq", "list", "--nats-url", nats.url()]);
    assert!(listed.status.success(), "{listed:?}");
    let letters: Vec<Value> = String::from_utf8(listed.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(letters.len(), 3);
    assert_eq!(
        (
            &letters[0]["job_id"],
            &letters[0]["tenant"],
            &letters[0]["code"],
            &letters[0]["inputs"]
        ),
        (
            &"poisoned-1".into(),
            &"acme".into(),
            &"internal".into(),
            &2.into()
        )
    );
    assert!(letters[1]["unreadable"].is_string(), "{}", letters[1]);
    let from_two = fleet(&[
        "dlq",
        "list",
        "--nats-url",
        nats.url(),
        "--from",
        "2",
        "--limit",
        "1",
    ]);
    assert_eq!(
        String::from_utf8(from_two.stdout).unwrap().lines().count(),
        1
    );

    let shown = fleet(&["dlq", "show", "1", "--nats-url", nats.url()]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["texts"], serde_json::json!(["first", "second"]));

    // A stand-in dispatcher takes the replayed job.
    let mut submits = client.subscribe(subject::submit(MODEL)).await.unwrap();
    client.flush().await.unwrap();
    let answerer = client.clone();
    let taken = tokio::spawn(async move {
        let call = submits.next().await.unwrap();
        let envelope: SignedJob = decode(&call.payload, 1 << 20).unwrap();
        let job: Job = decode(&envelope.body, 1 << 20).unwrap();
        let reply = SubmitReply {
            status: SubmitStatus::Accepted,
            job_id: job.job_id.clone(),
            stream_seq: Some(1),
            duplicate: false,
            error: None,
            no_worker: false,
        };
        answerer
            .publish(call.reply.unwrap(), encode(&reply).unwrap().into())
            .await
            .unwrap();
        (envelope, job)
    });
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("acme.toml");
    let file = SecretKeyFile {
        tenant: "acme".into(),
        key_id: acme.key.key_id.clone(),
        secret_key: acme.key.secret_hex(),
    };
    std::fs::write(&key, toml::to_string(&file).unwrap()).unwrap();
    let key = key.to_string_lossy().into_owned();
    let replay = |seq: &str| {
        fleet(&[
            "dlq",
            "replay",
            seq,
            "--nats-url",
            nats.url(),
            "--model",
            MODEL,
            "--key",
            &key,
        ])
    };

    let replayed = replay("1");
    assert!(replayed.status.success(), "{replayed:?}");
    let (envelope, job) = taken.await.unwrap();
    assert_ne!(job.job_id, "poisoned-1");
    assert_eq!(
        (job.tenant.as_str(), job.task.inputs()),
        ("acme", old.task.inputs())
    );
    acme.public_key()
        .verify(&envelope)
        .expect("signed with acme's key");
    assert!(
        String::from_utf8_lossy(&replayed.stderr).contains(&format!("as job {}", job.job_id)),
        "{replayed:?}"
    );

    for (seq, expected) in [
        ("2", "no readable job"),
        ("3", "tenant \"bolt\""),
        ("9", "no dead letter"),
    ] {
        let refused = replay(seq);
        assert_eq!(refused.status.code(), Some(1), "{seq}: {refused:?}");
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains(expected),
            "{seq}: {refused:?}"
        );
    }
}
