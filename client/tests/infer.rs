//! `fleet infer` reads the tenant's key before it touches the network: a missing key is a clear
//! error and a failing exit, with nothing sent.

use std::process::Command;

#[test]
fn infer_without_a_key_file_fails_with_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-key.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "infer",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--text",
            "hello",
        ])
        .arg("--key")
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot read key file") && stderr.contains("no-such-key.toml"),
        "{stderr}"
    );
}

#[test]
fn a_model_name_no_subject_can_carry_or_a_zero_timeout_is_refused_up_front() {
    for (flag, value, expected) in [
        ("--model", "all.minilm", "model \"all.minilm\""),
        ("--timeout", "0s", "--timeout"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_fleet"))
            .args(["infer", "--nats-url", "nats://127.0.0.1:1", "--text", "x"])
            .args([flag, value])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}

fn key_file(dir: &std::path::Path, tenant: &str) -> std::path::PathBuf {
    let key = fleet_schemas::SigningKey::generate(format!("{tenant}-1"));
    let file = fleet_schemas::SecretKeyFile {
        tenant: tenant.into(),
        key_id: key.key_id.clone(),
        secret_key: key.secret_hex(),
    };
    let path = dir.join("key.toml");
    std::fs::write(&path, toml::to_string(&file).unwrap()).unwrap();
    path
}

/// With no dispatcher running, the user is told which subject nobody serves, not the client
/// library's bare "no responders".
#[test]
fn a_call_nobody_serves_names_the_subject() {
    let nats = fleet_tests::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args([
            "infer",
            "--nats-url",
            nats.url(),
            "--text",
            "hello",
            "--key",
        ])
        .arg(key_file(dir.path(), "acme"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("nobody serves fleet.infer.all-minilm-l6-v2")
            && stderr.contains("no dispatcher is running"),
        "{stderr}"
    );
}

/// An abandoned call's job must not run for nobody: `infer` dates the job's deadline at the end
/// of the call's timeout (a worker answers `expired` past it), unless the caller set one.
#[tokio::test]
async fn infer_gives_the_job_a_deadline_at_the_end_of_its_timeout() {
    use futures::StreamExt;

    let nats = fleet_tests::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let tenant = fleet_client::Tenant::from_key_file(&key_file(dir.path(), "acme")).unwrap();
    let client = async_nats::ConnectOptions::new()
        .custom_inbox_prefix(fleet_schemas::subject::inbox_prefix("acme"))
        .connect(nats.url())
        .await
        .unwrap();
    let mut calls = client.subscribe("fleet.infer.m").await.unwrap();
    client.flush().await.unwrap();
    // A stand-in dispatcher: reports the deadline of each job it gets and answers it.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let answerer = client.clone();
    tokio::spawn(async move {
        while let Some(call) = calls.next().await {
            let envelope: fleet_schemas::SignedJob =
                fleet_schemas::decode(&call.payload, 1 << 20).unwrap();
            let job: fleet_schemas::Job = fleet_schemas::decode(&envelope.body, 1 << 20).unwrap();
            seen_tx.send(job.deadline_ms).unwrap();
            let result = fleet_schemas::JobResult {
                job_id: job.job_id,
                tenant: job.tenant,
                model: job.model,
                status: fleet_schemas::ResultStatus::Ok,
                output: None,
                error: None,
                worker: "stand-in".into(),
                timings: Default::default(),
            };
            let reply = call.reply.unwrap();
            let body = fleet_schemas::encode(&result).unwrap();
            answerer.publish(reply, body.into()).await.unwrap();
        }
    });

    let timeout = std::time::Duration::from_secs(7);
    let job = tenant.embed_job("m", vec!["hello".into()]);
    let before = fleet_schemas::now_ms();
    fleet_client::infer(&client, &tenant, &job, timeout)
        .await
        .unwrap();
    let after = fleet_schemas::now_ms();
    let deadline = seen_rx.recv().await.unwrap().expect("a deadline is set");
    assert!(
        (before + 7_000..=after + 7_000).contains(&deadline),
        "deadline {deadline} not {before}..{after} + 7 s"
    );

    let mut own = tenant.embed_job("m", vec!["hello".into()]);
    own.deadline_ms = Some(before + 1_000_000);
    fleet_client::infer(&client, &tenant, &own, timeout)
        .await
        .unwrap();
    assert_eq!(seen_rx.recv().await.unwrap(), Some(before + 1_000_000));
}

/// What a script sees from `fleet infer`: texts from standard input, its own job id, and an exit
/// status per outcome, against a stand-in dispatcher that answers by the job's first text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_gets_its_texts_its_job_id_and_an_exit_status_per_outcome() {
    use std::io::Write;

    use fleet_schemas::{ErrorBody, ErrorCode, Job, JobResult, ResultStatus, SignedJob, decode};
    use futures::StreamExt;

    let nats = fleet_tests::NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "acme");
    let client = nats.client().await;
    let mut calls = client.subscribe("fleet.infer.m").await.unwrap();
    client.flush().await.unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let answerer = client.clone();
    tokio::spawn(async move {
        while let Some(call) = calls.next().await {
            let envelope: SignedJob = decode(&call.payload, 1 << 20).unwrap();
            let job: Job = decode(&envelope.body, 1 << 20).unwrap();
            let (status, code) = match job.task.inputs()[0].as_str() {
                "refuse" => (ResultStatus::Rejected, Some(ErrorCode::Forbidden)),
                "fail" => (ResultStatus::Failed, Some(ErrorCode::Internal)),
                "stay silent" => {
                    seen_tx.send(job).unwrap();
                    continue;
                }
                _ => (ResultStatus::Ok, None),
            };
            let result = JobResult {
                job_id: job.job_id.clone(),
                tenant: job.tenant.clone(),
                model: job.model.clone(),
                status,
                output: None,
                error: code.map(|code| ErrorBody {
                    code,
                    message: "stand-in".into(),
                }),
                worker: "stand-in".into(),
                timings: Default::default(),
            };
            seen_tx.send(job).unwrap();
            let body = fleet_schemas::encode(&result).unwrap();
            answerer
                .publish(call.reply.unwrap(), body.into())
                .await
                .unwrap();
        }
    });

    let fleet_infer = |stdin: &str, extra: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fleet"))
            .args(["infer", "--nats-url", nats.url(), "--model", "m"])
            .args(["--timeout", "1s", "--texts-file", "-", "--key"])
            .arg(&key)
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    };

    let embedded = fleet_infer("first line\nsecond line\n", &["--job-id", "etl-row-17"]);
    assert_eq!(embedded.status.code(), Some(0), "{embedded:?}");
    let job = seen_rx.recv().await.unwrap();
    assert_eq!(job.job_id, "etl-row-17");
    assert_eq!(job.task.inputs(), ["first line", "second line"]);
    let printed: JobResult = serde_json::from_slice(&embedded.stdout).unwrap();
    assert_eq!(printed.job_id, "etl-row-17");

    for (text, status) in [("refuse", 3), ("fail", 4), ("stay silent", 5)] {
        let output = fleet_infer(text, &[]);
        assert_eq!(output.status.code(), Some(status), "{text}: {output:?}");
        seen_rx.recv().await.unwrap();
    }
    let silent = fleet_infer("stay silent", &["--job-id", "retry-me"]);
    assert!(
        String::from_utf8_lossy(&silent.stderr).contains("--job-id retry-me"),
        "{silent:?}"
    );

    for (args, stdin) in [
        (&["--job-id", "not a subject token"][..], "x"),
        (&[][..], ""),
    ] {
        let usage = fleet_infer(stdin, args);
        assert_eq!(usage.status.code(), Some(2), "{args:?}: {usage:?}");
    }
}
