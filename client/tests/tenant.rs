//! `fleet tenant` manages the key store the dispatcher and workers read: a tenant is added with
//! its first key, a key is rotated in (the old one retired) and revoked, and `list` shows it
//! all, in the tenants file and in Vault alike. A refused change leaves no secret key behind.

use std::{os::unix::fs::PermissionsExt, path::Path, process::Command};

use fleet_client::Tenant;
use fleet_tests::openbao::OpenBao;

/// Runs `fleet tenant <args>` with `env`; its stdout when it succeeds, else its stderr as Err.
fn fleet_tenant(args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    let output = Command::new(env!("CARGO_BIN_EXE_fleet"))
        .arg("tenant")
        .args(args)
        .env_remove("FLEET_TENANTS")
        .envs(env.iter().copied())
        .output()
        .expect("the fleet binary runs");
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

fn listed(store: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let args: Vec<&str> = store.iter().copied().chain(["list"]).collect();
    let out = fleet_tenant(&args, env).expect("list");
    serde_json::from_str(&out).expect("list prints JSON")
}

/// Add, rotate, revoke and list against one store (`store` selects it).
fn manage_a_tenant(store: &[&str], env: &[(&str, &str)], dir: &Path) {
    let first = dir.join("acme-1.toml");
    let first_s = first.to_string_lossy();
    let add: Vec<&str> = store
        .iter()
        .copied()
        .chain([
            "add", "--tenant", "acme", "--key-id", "acme-1", "--out", &first_s,
        ])
        .chain([
            "--models",
            "all-minilm-l6-v2",
            "--rate-per-second",
            "5",
            "--burst",
            "6",
        ])
        .collect();
    fleet_tenant(&add, env).expect("add");
    assert_eq!(
        std::fs::metadata(&first)
            .expect("key file")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let key = Tenant::from_key_file(&first)
        .expect("the key file loads")
        .key;
    let tenants = listed(store, env);
    let acme = &tenants[0];
    assert_eq!(acme["name"], "acme");
    assert_eq!(acme["models"], serde_json::json!(["all-minilm-l6-v2"]));
    assert_eq!(
        (acme["rate_per_second"].as_u64(), acme["burst"].as_u64()),
        (Some(5), Some(6))
    );
    assert_eq!(acme["keys"][0]["key_id"], "acme-1");
    assert_eq!(acme["keys"][0]["public_key"], key.verifying_key().to_hex());

    // The tenant exists already: refused, and no secret key file is left for a key nobody knows.
    let again = dir.join("again.toml");
    let again_s = again.to_string_lossy();
    let add_again: Vec<&str> = store
        .iter()
        .copied()
        .chain(["add", "--tenant", "acme", "--out", &again_s])
        .collect();
    assert!(fleet_tenant(&add_again, env).is_err());
    assert!(!again.exists());

    let second = dir.join("acme-2.toml");
    let second_s = second.to_string_lossy();
    let rotate: Vec<&str> = store
        .iter()
        .copied()
        .chain([
            "rotate", "--tenant", "acme", "--key-id", "acme-2", "--out", &second_s,
        ])
        .chain(["--retire", "acme-1", "--retire-after", "0s"])
        .collect();
    fleet_tenant(&rotate, env).expect("rotate");
    let keys = listed(store, env)[0]["keys"].clone();
    let key_of = |id: &str| {
        keys.as_array()
            .expect("keys")
            .iter()
            .find(|k| k["key_id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("key {id} listed: {keys}"))
    };
    assert!(
        key_of("acme-1")["not_after_ms"].as_u64().is_some(),
        "the old key is retired"
    );
    assert_eq!(key_of("acme-2")["revoked"], false);

    let revoke: Vec<&str> = store
        .iter()
        .copied()
        .chain(["revoke", "--key-id", "acme-2"])
        .collect();
    fleet_tenant(&revoke, env).expect("revoke");
    let keys = listed(store, env)[0]["keys"].clone();
    let revoked = keys
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["key_id"] == "acme-2")
        .map(|k| k["revoked"].clone());
    assert_eq!(revoked, Some(serde_json::Value::Bool(true)));
}

#[test]
fn tenants_are_managed_in_the_tenants_file() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("tenants.toml");
    let file = file.to_string_lossy();
    manage_a_tenant(&["--tenants", &file], &[], dir.path());
}

#[test]
fn tenants_are_managed_in_vault() {
    let bao = OpenBao::start();
    let dir = tempfile::tempdir().expect("temporary directory");
    let env = [("VAULT_ADDR", bao.addr()), ("VAULT_TOKEN", bao.token())];
    manage_a_tenant(&["--tenants-from-vault"], &env, dir.path());
}
