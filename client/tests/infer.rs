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
