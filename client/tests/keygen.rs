//! `fleet keygen` writes a secret key only its owner can read, never overwrites one, and prints
//! a tenants entry the dispatcher accepts for exactly that key.

use std::{os::unix::fs::PermissionsExt, process::Command};

use fleet_client::Tenant;
use fleet_keys::{FileSource, Tenants};

#[test]
fn keygen_writes_a_private_key_and_a_matching_tenants_entry() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = dir.path().join("acme-key.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["keygen", "--tenant", "acme", "--key-id", "acme-1", "--out"])
        .arg(&key_path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let tenant = Tenant::from_key_file(&key_path).expect("the key file loads");
    assert_eq!(tenant.name, "acme");
    let entry = String::from_utf8(output.stdout).unwrap();
    let tenants = Tenants::from_toml(&entry).expect("the printed entry is a tenants file");
    let registered = tenants.key("acme-1").expect("key registered");
    assert_eq!(registered.tenant, "acme");
    assert_eq!(registered.public_key, tenant.key.verifying_key());

    let again = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["keygen", "--tenant", "acme", "--out"])
        .arg(&key_path)
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "an existing key must not be overwritten"
    );
    assert_eq!(
        Tenant::from_key_file(&key_path).unwrap().key.secret_hex(),
        tenant.key.secret_hex()
    );
}

#[test]
fn keygen_refuses_names_that_cannot_be_subject_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .args(["keygen", "--tenant", "acme.corp", "--out"])
        .arg(dir.path().join("k.toml"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(!dir.path().join("k.toml").exists());
}

/// The README's way to give a tenant a second key: run `fleet keygen` again and append its
/// output to the same tenants file. The dispatcher then knows both keys, for the one tenant.
#[test]
fn a_second_keygen_appended_to_the_tenants_file_adds_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut tenants_file = String::new();
    let mut keys = Vec::new();
    for name in ["first.toml", "second.toml"] {
        let key_path = dir.path().join(name);
        let output = Command::new(env!("CARGO_BIN_EXE_fleet"))
            .args(["keygen", "--tenant", "acme", "--out"])
            .arg(&key_path)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        tenants_file.push_str(&String::from_utf8(output.stdout).unwrap());
        keys.push(Tenant::from_key_file(&key_path).unwrap().key);
    }
    let path = dir.path().join("tenants.toml");
    std::fs::write(&path, tenants_file).unwrap();
    let tenants = FileSource::new(&path)
        .read()
        .expect("the dispatcher accepts the file");
    for key in &keys {
        let registered = tenants.key(&key.key_id).expect("each key registered");
        assert_eq!(registered.tenant, "acme");
        assert_eq!(registered.public_key, key.verifying_key());
    }
}
