//! The `dispatcher` command as a new user meets it: `--version` and `--help` succeed, a bad flag
//! or config file is a usage error (exit 2, clap's convention), and a setup that cannot work is
//! refused at start with what to do, never with a secret from the command line.

use std::process::{Command, Output};

fn dispatcher(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(args)
        .current_dir(dir)
        .env_remove("FLEET_CONFIG")
        .env_remove("NATS_URL")
        .env_remove("FLEET_TENANTS")
        .output()
        .unwrap()
}

#[test]
fn version_and_help_print_and_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let version = dispatcher(&["--version"], dir.path());
    assert_eq!(version.status.code(), Some(0), "{version:?}");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        concat!("dispatcher ", env!("CARGO_PKG_VERSION"))
    );
    assert!(version.stderr.is_empty(), "{version:?}");
    let help = dispatcher(&["--help"], dir.path());
    assert_eq!(help.status.code(), Some(0), "{help:?}");
    assert!(String::from_utf8_lossy(&help.stdout).contains("--nats-creds"));
}

#[test]
fn a_bad_flag_or_config_file_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let unknown = dispatcher(&["--no-such-flag"], dir.path());
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("--no-such-flag"));
    std::fs::write(dir.path().join("fleet.toml"), "max_inputz = 3\n").unwrap();
    let bad_file = dispatcher(&["--config", "fleet.toml"], dir.path());
    assert_eq!(bad_file.status.code(), Some(2), "{bad_file:?}");
    assert!(String::from_utf8_lossy(&bad_file.stderr).contains("max_inputz"));
}

#[test]
fn an_empty_tenants_file_is_refused_saying_how_to_add_a_tenant() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tenants.toml"), "").unwrap();
    let output = dispatcher(&["--nats-url", "nats://127.0.0.1:1"], dir.path());
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("defines no tenant") && stderr.contains("fleet keygen --tenant"),
        "{stderr}"
    );
}

#[test]
fn an_unreachable_server_is_named_without_the_password_in_its_url() {
    let dir = tempfile::tempdir().unwrap();
    let key = fleet_schemas::SigningKey::generate("acme-1");
    std::fs::write(
        dir.path().join("tenants.toml"),
        format!(
            "[[tenants]]\nname = \"acme\"\nmodels = [\"*\"]\nrate_per_second = 1\nburst = 1\n\
             keys = [{{ key_id = \"acme-1\", public_key = \"{}\" }}]\n",
            key.verifying_key().to_hex()
        ),
    )
    .unwrap();
    let output = dispatcher(
        &[
            "--nats-url",
            "nats://ops:hunter2@127.0.0.1:1",
            "--metrics-addr",
            "127.0.0.1:0",
        ],
        dir.path(),
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let everything = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        everything.contains("cannot reach NATS at nats://127.0.0.1:1"),
        "{everything}"
    );
    assert!(!everything.contains("hunter2"), "{everything}");
}

/// The dispatcher as a NATS user whose password comes from the environment (never the command
/// line): it serves, and its output never shows the password.
#[tokio::test]
async fn the_dispatcher_authenticates_with_a_password_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("jetstream");
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            "jetstream {{ store_dir: {store:?} }}\n\
             authorization {{ users = [ {{ user: \"fleet\", password: \"pw-6x9q\" }} ] }}\n"
        ),
    )
    .unwrap();
    let nats = fleet_tests::NatsServer::start_with_config(&conf);
    let key = fleet_schemas::SigningKey::generate("acme-1");
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(
        &tenants,
        format!(
            "[[tenants]]\nname = \"acme\"\nmodels = [\"*\"]\nrate_per_second = 10\nburst = 10\n\
             keys = [{{ key_id = \"acme-1\", public_key = \"{}\" }}]\n",
            key.verifying_key().to_hex()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("dispatcher.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_dispatcher"))
        .args(["--nats-url", nats.url(), "--nats-user", "fleet"])
        .args(["--metrics-addr", "127.0.0.1:0", "--tenants"])
        .arg(&tenants)
        .env("NATS_PASSWORD", "pw-6x9q")
        .env("RUST_LOG", "debug")
        .env_remove("FLEET_CONFIG")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let dispatcher = fleet_tests::Process::adopt("dispatcher", child);

    let client = nats
        .connect_with(async_nats::ConnectOptions::with_user_and_password(
            "fleet".into(),
            "pw-6x9q".into(),
        ))
        .await
        .unwrap();
    let job = fleet_schemas::Job::embed(
        "j-1",
        "acme",
        fleet_schemas::DEFAULT_MODEL,
        vec!["x".into()],
        fleet_schemas::now_ms(),
    );
    let payload = fleet_schemas::encode(&key.sign_job(&job).unwrap()).unwrap();
    let subject = fleet_schemas::subject::submit(fleet_schemas::DEFAULT_MODEL);
    // No responders until the dispatcher has connected and subscribed.
    let answer = fleet_tests::eventually(
        std::time::Duration::from_secs(20),
        "the dispatcher answers",
        || async {
            client
                .request(subject.clone(), payload.clone().into())
                .await
                .ok()
        },
    )
    .await;
    let reply: fleet_schemas::SubmitReply =
        fleet_schemas::decode(&answer.payload, 1 << 20).unwrap();
    assert_eq!(
        reply.status,
        fleet_schemas::SubmitStatus::Accepted,
        "{reply:?}"
    );
    drop(dispatcher);
    let output = std::fs::read_to_string(&log_path).unwrap();
    assert!(output.contains("dispatcher serving"), "{output}");
    assert!(!output.contains("pw-6x9q"), "{output}");
}
