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
