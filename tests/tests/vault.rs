//! Tenant keys in Vault, as an operator runs the fleet: a real OpenBao holds the keys, the real
//! `dispatcher` and `worker` read them (`--tenants-from-vault`) and `fleet tenant` changes them.
//! A rotation and a revocation take effect within the refresh interval without a restart, and
//! when Vault goes away the fleet keeps serving the keys it has and says so.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use fleet_client::Tenant;
use fleet_schemas::{ErrorCode, JobResult, ResultStatus};
use fleet_tests::{NatsServer, Process, eventually, model_dir, openbao::OpenBao};

const MODEL: &str = "all-minilm-l6-v2";
/// The fleet's `--tenants-refresh` in this test.
const REFRESH: Duration = Duration::from_secs(2);
/// How long a change may take to be seen: a refresh interval, plus slack for a loaded machine.
const SEEN_WITHIN: Duration = Duration::from_secs(6);

/// Runs `fleet tenant --tenants-from-vault <args>` against `bao`.
fn fleet_tenant(bao: &OpenBao, args: &[&str]) {
    let output = Command::new(fleet_tests::binary("fleet"))
        .args(["tenant", "--tenants-from-vault"])
        .args(args)
        .env("VAULT_ADDR", bao.addr())
        .env("VAULT_TOKEN", bao.token())
        .output()
        .expect("fleet runs");
    assert!(
        output.status.success(),
        "fleet tenant {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// One `infer` of a fresh job signed with the key in `key_file`.
async fn infer(client: &async_nats::Client, key_file: &Path) -> Option<JobResult> {
    let tenant = Tenant::from_key_file(key_file).expect("a key file fleet tenant wrote");
    let job = tenant.embed_job(MODEL, vec!["keys live in Vault".to_owned()]);
    fleet_client::infer(client, &tenant, &job, Duration::from_secs(10))
        .await
        .ok()
}

/// Waits until a job signed with `key_file` gets `wanted` (an ok result, or a refusal with a
/// code), and returns how long that took.
async fn until_answered(
    client: &async_nats::Client,
    key_file: &Path,
    wanted: Result<(), ErrorCode>,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    eventually(timeout, &format!("{wanted:?}"), || async {
        let result = infer(client, key_file).await?;
        let got = match result.status {
            ResultStatus::Ok => Ok(()),
            _ => Err(result.error.map(|error| error.code)?),
        };
        (got == wanted).then_some(())
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_revocation_and_a_vault_outage_reach_the_running_fleet() {
    let mut bao = OpenBao::start();
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let key = |name: &str| -> PathBuf { dir.path().join(format!("{name}.toml")) };
    let path = |name: &str| key(name).to_string_lossy().into_owned();
    fleet_tenant(
        &bao,
        &[
            "add",
            "--tenant",
            "acme",
            "--key-id",
            "acme-1",
            "--out",
            &path("acme-1"),
        ],
    );

    let refresh = format!("{}s", REFRESH.as_secs());
    let env = [
        ("VAULT_ADDR", bao.addr()),
        ("VAULT_TOKEN", bao.token()),
        ("RUST_LOG", "info"),
    ];
    let common = [
        "--nats-url",
        nats.url(),
        "--tenants-from-vault",
        "--tenants-refresh",
        &refresh,
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    let dispatcher_log = dir.path().join("dispatcher.log");
    let _dispatcher = Process::spawn_binary_logged("dispatcher", &common, &env, &dispatcher_log);
    let model = model_dir().to_string_lossy().into_owned();
    let mut worker_args = common.to_vec();
    worker_args.extend(["--model-dir", &model]);
    let worker_log = dir.path().join("worker.log");
    let _worker = Process::spawn_binary_logged("worker", &worker_args, &env, &worker_log);
    let client = nats.tenant_client("acme").await;

    // Served with the first key (the first calls may find the worker still loading).
    until_answered(&client, &key("acme-1"), Ok(()), Duration::from_secs(120)).await;

    // Rotation: a second key, the first one retired at once.
    fleet_tenant(
        &bao,
        &[
            "rotate",
            "--tenant",
            "acme",
            "--key-id",
            "acme-2",
            "--out",
            &path("acme-2"),
            "--retire",
            "acme-1",
            "--retire-after",
            "0s",
        ],
    );
    let took = until_answered(&client, &key("acme-2"), Ok(()), SEEN_WITHIN).await;
    let retired = infer(&client, &key("acme-1")).await.expect("answered");
    assert_eq!(
        retired.error.map(|error| error.code),
        Some(ErrorCode::Forbidden),
        "the retired key still signs (rotation seen after {took:?})"
    );

    // Revocation of the new key.
    fleet_tenant(&bao, &["revoke", "--key-id", "acme-2"]);
    until_answered(
        &client,
        &key("acme-2"),
        Err(ErrorCode::Forbidden),
        SEEN_WITHIN,
    )
    .await;

    // A third key, then Vault goes away: the fleet keeps serving the keys it has.
    fleet_tenant(
        &bao,
        &[
            "rotate",
            "--tenant",
            "acme",
            "--key-id",
            "acme-3",
            "--out",
            &path("acme-3"),
        ],
    );
    until_answered(&client, &key("acme-3"), Ok(()), SEEN_WITHIN).await;
    bao.stop();
    // Several refresh intervals with Vault unreachable.
    tokio::time::sleep(REFRESH * 3).await;
    let served = infer(&client, &key("acme-3")).await.expect("answered");
    assert_eq!(served.status, ResultStatus::Ok, "{served:?}");
    let revoked = infer(&client, &key("acme-2")).await.expect("answered");
    assert_eq!(
        revoked.error.map(|error| error.code),
        Some(ErrorCode::Forbidden),
        "a revoked key came back while Vault was away"
    );
    // ... and says so.
    for log in [&dispatcher_log, &worker_log] {
        let log = std::fs::read_to_string(log).unwrap();
        assert!(
            log.contains("cannot reload tenant keys; serving the last ones loaded"),
            "nothing said about the Vault outage: {log}"
        );
    }
}
