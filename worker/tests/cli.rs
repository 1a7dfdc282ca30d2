//! The `worker` command as a new user meets it: `--version` and `--help` succeed, and a bad flag
//! or config file is a usage error (exit 2, clap's convention), before anything is loaded.

use std::process::{Command, Output};

fn worker(args: &[&str], dir: &std::path::Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(args)
        .current_dir(dir)
        .env_remove("FLEET_CONFIG")
        .env_remove("NATS_URL")
        .output()
        .expect("the worker binary runs")
}

#[test]
fn version_and_help_print_and_succeed() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let version = worker(&["--version"], dir.path());
    assert_eq!(version.status.code(), Some(0), "{version:?}");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        concat!("worker ", env!("CARGO_PKG_VERSION"))
    );
    assert!(version.stderr.is_empty(), "{version:?}");
    let help = worker(&["--help"], dir.path());
    assert_eq!(help.status.code(), Some(0), "{help:?}");
    assert!(String::from_utf8_lossy(&help.stdout).contains("--ack-wait"));
}

#[test]
fn a_bad_flag_or_config_file_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let unknown = worker(&["--no-such-flag"], dir.path());
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("--no-such-flag"));
    std::fs::write(dir.path().join("worker.toml"), "ack_wiat = \"3s\"\n").expect("write");
    let bad_file = worker(&["--config", "worker.toml"], dir.path());
    assert_eq!(bad_file.status.code(), Some(2), "{bad_file:?}");
    assert!(String::from_utf8_lossy(&bad_file.stderr).contains("ack_wiat"));
}
