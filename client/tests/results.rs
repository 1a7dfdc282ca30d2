//! `fleet results get` reads one of the tenant's stored results, as a script would after a
//! `submit`: the result as JSON when it is there, exit status 5 when it is not (yet).

use std::process::Command;

use async_nats::jetstream;
use fleet_schemas::{JobResult, ResultStatus, encode, subject};
use fleet_tests::{NatsServer, Streams};

fn stored(job_id: &str, tenant: &str) -> JobResult {
    JobResult {
        job_id: job_id.into(),
        tenant: tenant.into(),
        model: "m".into(),
        status: ResultStatus::Ok,
        output: None,
        error: None,
        worker: "w".into(),
        timings: Default::default(),
    }
}

#[tokio::test]
async fn a_stored_result_is_printed_and_a_missing_one_says_so() {
    let nats = NatsServer::start();
    let _streams = Streams::create(&nats).await;
    let js = jetstream::new(nats.client().await);
    for (tenant, job_id) in [("acme", "job-1"), ("bolt", "job-2")] {
        js.publish(
            subject::results(tenant, job_id),
            encode(&stored(job_id, tenant)).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("acme.toml");
    let made = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["keygen", "--tenant", "acme", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let get = |job_id: &str| {
        Command::new(env!("CARGO_BIN_EXE_fleet"))
            .args(["results", "get", job_id, "--nats-url", nats.url(), "--key"])
            .arg(&key)
            .output()
            .unwrap()
    };

    let found = get("job-1");
    assert_eq!(found.status.code(), Some(0), "{found:?}");
    let printed: JobResult = serde_json::from_slice(&found.stdout).unwrap();
    assert_eq!(printed, stored("job-1", "acme"));
    // Another tenant's job of that id is not acme's.
    for missing in ["job-2", "never-sent"] {
        let output = get(missing);
        assert_eq!(output.status.code(), Some(5), "{missing}: {output:?}");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("no stored result"),
            "{output:?}"
        );
    }
}
