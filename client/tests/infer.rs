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
        ("--timeout-secs", "0", "--timeout-secs"),
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
