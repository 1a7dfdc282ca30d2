//! The tenants file: its format, what it refuses, the management operations on it, and a store
//! reading it that follows its changes.

mod common;

use std::{os::unix::fs::PermissionsExt, path::Path, sync::atomic::Ordering, time::Duration};

use common::{Counting, public_hex, within};
use fleet_keys::{
    AdminError, Change, FileSource, KeyRefusal, KeyStore, NewKey, Retire, StoreError, StoreOptions,
    TenantAdmin, TenantPolicy, Tenants, TenantsError,
};
use fleet_schemas::{Job, SigningKey, now_ms};

fn tenant_block(name: &str, rate: u32, keys: &[(&str, &SigningKey)]) -> String {
    let keys: Vec<String> = keys
        .iter()
        .map(|(id, key)| {
            format!(
                "{{ key_id = \"{id}\", public_key = \"{}\" }}",
                public_hex(key)
            )
        })
        .collect();
    format!(
        "[[tenants]]\nname = \"{name}\"\nmodels = [\"m\"]\nrate_per_second = {rate}\nburst = 200\n\
         keys = [{}]\n",
        keys.join(", ")
    )
}

fn key_table(tenant: &str, id: &str, key: &SigningKey, extra: &str) -> String {
    format!(
        "[[keys]]\ntenant = \"{tenant}\"\nkey_id = \"{id}\"\npublic_key = \"{}\"\n{extra}",
        public_hex(key)
    )
}

#[test]
fn the_original_format_still_loads() {
    let key = SigningKey::generate("acme-1");
    let tenants = Tenants::from_toml(&tenant_block("acme", 100, &[("acme-1", &key)])).unwrap();
    let record = tenants.key("acme-1").expect("key registered");
    assert_eq!(record.tenant, "acme");
    assert_eq!(record.public_key, key.verifying_key());
    assert_eq!((record.not_before_ms, record.not_after_ms), (None, None));
    assert!(!record.revoked);
    let policy = tenants.policy("acme").expect("policy");
    assert_eq!((policy.rate_per_second, policy.burst), (100, 200));
    assert!(policy.allows_model("m"));
    assert!(!policy.allows_model("other"));
    assert!(tenants.key("acme-2").is_none());
}

#[test]
fn a_tenant_has_several_keys_from_its_block_and_from_keys_tables() {
    let (k1, k2, k3) = (
        SigningKey::generate("a1"),
        SigningKey::generate("a2"),
        SigningKey::generate("a3"),
    );
    let text = format!(
        "{}{}",
        tenant_block("acme", 100, &[("a1", &k1), ("a2", &k2)]),
        key_table("acme", "a3", &k3, "not_after = \"2030-01-01T00:00:00Z\"\n")
    );
    let tenants = Tenants::from_toml(&text).unwrap();
    let acme = tenants.tenant("acme").expect("tenant");
    let ids: Vec<&str> = acme.keys.iter().map(|k| k.key_id.as_str()).collect();
    assert_eq!(ids, ["a1", "a2", "a3"]);
    for (id, key) in [("a1", &k1), ("a2", &k2), ("a3", &k3)] {
        let record = tenants.key(id).expect("every key is looked up by its id");
        assert_eq!(record.tenant, "acme");
        assert_eq!(record.public_key, key.verifying_key());
        assert_eq!(record.check(now_ms(), now_ms()), Ok(()));
    }
}

#[test]
fn a_tenant_block_appended_again_with_the_same_policy_adds_its_key() {
    // What a second `fleet keygen --tenant acme >> tenants.toml` produces.
    let (k1, k2) = (SigningKey::generate("a1"), SigningKey::generate("a2"));
    let text = format!(
        "{}\n{}",
        tenant_block("acme", 100, &[("a1", &k1)]),
        tenant_block("acme", 100, &[("a2", &k2)])
    );
    let tenants = Tenants::from_toml(&text).unwrap();
    assert_eq!(tenants.tenant_count(), 1);
    assert_eq!(tenants.tenant("acme").unwrap().keys.len(), 2);
    assert_eq!(tenants.key("a2").unwrap().tenant, "acme");
}

#[test]
fn a_tenant_block_repeated_with_another_policy_is_refused_with_the_way_out() {
    let (k1, k2) = (SigningKey::generate("a1"), SigningKey::generate("a2"));
    let text = format!(
        "{}\n{}",
        tenant_block("acme", 100, &[("a1", &k1)]),
        tenant_block("acme", 5, &[("a2", &k2)])
    );
    let err = Tenants::from_toml(&text).unwrap_err();
    assert!(
        matches!(&err, TenantsError::ConflictingTenant { tenant, .. } if tenant == "acme"),
        "{err:?}"
    );
    assert!(err.to_string().contains("[[keys]]"), "{err}");
}

#[test]
fn bad_files_are_refused_with_typed_reasons() {
    let k = SigningKey::generate("k");
    let good = tenant_block("acme", 100, &[("acme-1", &k)]);
    let refused = |text: &str| Tenants::from_toml(text).unwrap_err();

    assert!(matches!(
        refused(&good.replace(&public_hex(&k), "abcd")),
        TenantsError::BadKey { .. }
    ));
    assert!(matches!(
        refused(&format!("{good}{}", tenant_block("other", 1, &[("acme-1", &k)]))),
        TenantsError::DuplicateKey(id) if id == "acme-1"
    ));
    assert!(matches!(
        refused(&format!("{good}{}", key_table("acme", "acme-1", &k, ""))),
        TenantsError::DuplicateKey(_)
    ));
    assert!(matches!(
        refused(&good.replace("burst = 200", "burst = 0")),
        TenantsError::ZeroRate(t) if t == "acme"
    ));
    assert!(matches!(
        refused(&good.replace("\"acme\"", "\"a.b\"")),
        TenantsError::BadName { .. }
    ));
    assert!(matches!(
        refused(&good.replace("\"acme-1\"", "\"acme 1\"")),
        TenantsError::BadKeyId { .. }
    ));
    assert!(matches!(
        refused(&format!("{good}{}", key_table("nobody", "n-1", &k, ""))),
        TenantsError::UnknownTenant { tenant, .. } if tenant == "nobody"
    ));
    assert!(matches!(
        refused(&good.replace("burst = 200", "burst = 200\ncolour = \"red\"")),
        TenantsError::Parse { .. }
    ));
    assert!(matches!(
        refused("[[tenants]]\nname = 1\n"),
        TenantsError::Parse { .. }
    ));
    for (extra, field) in [
        ("not_after = \"tomorrow\"\n", "not_after"),
        // No offset: which time zone would it be in?
        ("not_before = \"2027-01-01T00:00:00\"\n", "not_before"),
        ("not_before = 2027-01-01T00:00:00\n", "not_before"),
        ("not_after = 2027-01-01\n", "not_after"),
    ] {
        let text = format!("{good}{}", key_table("acme", "acme-2", &k, extra));
        match refused(&text) {
            TenantsError::BadTime {
                key_id, field: f, ..
            } => {
                assert_eq!((key_id.as_str(), f), ("acme-2", field), "{extra}")
            }
            other => panic!("{extra}: {other:?}"),
        }
    }
    let window = "not_before = \"2027-01-02T00:00:00Z\"\nnot_after = \"2027-01-01T00:00:00Z\"\n";
    assert!(matches!(
        refused(&format!("{good}{}", key_table("acme", "acme-2", &SigningKey::generate("x"), window))),
        TenantsError::EmptyWindow { key_id } if key_id == "acme-2"
    ));
}

#[test]
fn times_are_rfc3339_quoted_or_toml_datetimes_with_an_offset() {
    let k = SigningKey::generate("k");
    let base = tenant_block("acme", 100, &[]);
    let text = format!(
        "{base}{}{}",
        key_table(
            "acme",
            "quoted",
            &k,
            "not_after = \"2027-01-01T01:00:00+01:00\"\n"
        ),
        key_table(
            "acme",
            "native",
            &SigningKey::generate("n"),
            "not_after = 2027-01-01T00:00:00.000Z\n"
        ),
    );
    let tenants = Tenants::from_toml(&text).unwrap();
    let expected = 1_798_761_600_000; // 2027-01-01T00:00:00Z
    assert_eq!(tenants.key("quoted").unwrap().not_after_ms, Some(expected));
    assert_eq!(tenants.key("native").unwrap().not_after_ms, Some(expected));
}

#[test]
fn validity_revoked_refuses_everything_not_before_needs_both_times_not_after_judges_creation() {
    let k = SigningKey::generate("k");
    let text = format!(
        "{}{}{}",
        tenant_block("acme", 100, &[]),
        key_table(
            "acme",
            "window",
            &k,
            "not_before = \"2027-01-01T00:00:00Z\"\nnot_after = \"2027-02-01T00:00:00Z\"\n"
        ),
        key_table(
            "acme",
            "gone",
            &SigningKey::generate("g"),
            "revoked = true\n"
        ),
    );
    let tenants = Tenants::from_toml(&text).unwrap();
    let window = tenants.key("window").unwrap();
    let jan = 1_798_761_600_000; // 2027-01-01T00:00:00Z
    let feb = jan + 31 * 86_400_000;
    let day = 86_400_000;

    assert_eq!(window.check(jan, jan), Ok(()), "not_before is inclusive");
    assert_eq!(window.check(jan + day, jan + day), Ok(()));
    // A job created before not_after is still good when a worker checks it later.
    assert_eq!(window.check(feb - 1, feb + day), Ok(()));
    assert!(matches!(
        window.check(feb, feb),
        Err(KeyRefusal::Expired { not_after_ms, .. }) if not_after_ms == feb
    ));
    // Before not_before: judged by the job's time and by now.
    assert!(matches!(
        window.check(jan - 1, jan + day),
        Err(KeyRefusal::NotYetValid { .. })
    ));
    assert!(matches!(
        window.check(jan + day, jan - 1),
        Err(KeyRefusal::NotYetValid { .. })
    ));

    let gone = tenants.key("gone").unwrap();
    assert!(gone.revoked);
    assert!(matches!(
        gone.check(now_ms() - 60_000, now_ms()),
        Err(KeyRefusal::Revoked { key_id }) if key_id == "gone"
    ));
    let message = window.check(feb, feb).unwrap_err().to_string();
    assert!(message.contains("2027-02-01T00:00:00Z"), "{message}");
}

// ---- management operations ----

fn acme_policy() -> TenantPolicy {
    TenantPolicy {
        models: vec!["m".into()],
        rate_per_second: 100,
        burst: 200,
    }
}

#[tokio::test]
async fn tenants_and_keys_are_added_rotated_and_revoked_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.toml");
    let source = FileSource::new(&path);
    let (k1, k2, k3) = (
        SigningKey::generate("a1"),
        SigningKey::generate("a2"),
        SigningKey::generate("b1"),
    );

    // The first tenant creates the file.
    source
        .apply(Change::AddTenant {
            tenant: "acme".into(),
            policy: acme_policy(),
            key: NewKey::new("a1", k1.verifying_key()),
        })
        .await
        .unwrap();
    // Operators' comments and the mode they chose survive every rewrite.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("# who may send jobs\n{text}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();

    let retire_at = now_ms() + 60_000;
    source
        .apply(Change::AddKey {
            tenant: "acme".into(),
            key: NewKey::new("a2", k2.verifying_key()),
            retire: Some(Retire {
                key_id: "a1".into(),
                not_after_ms: retire_at,
            }),
        })
        .await
        .unwrap();
    source
        .apply(Change::AddTenant {
            tenant: "beta".into(),
            policy: acme_policy(),
            key: NewKey::new("b1", k3.verifying_key()),
        })
        .await
        .unwrap();
    // One key in a tenant's inline list, one in a [[keys]] table.
    for key_id in ["b1", "a2"] {
        source
            .apply(Change::Revoke {
                key_id: key_id.into(),
            })
            .await
            .unwrap();
    }

    let tenants = source.read().unwrap();
    let a1 = tenants.key("a1").unwrap();
    assert_eq!(a1.not_after_ms, Some(retire_at));
    assert_eq!(tenants.key("a2").unwrap().tenant, "acme");
    assert!(tenants.key("b1").unwrap().revoked);
    assert!(tenants.key("a2").unwrap().revoked);
    assert!(!tenants.key("a1").unwrap().revoked);
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("# who may send jobs\n"), "{text}");
    assert!(
        text.contains("[[keys]]"),
        "a key is added as a [[keys]] table:\n{text}"
    );
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o640);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
}

#[tokio::test]
async fn changes_that_do_not_fit_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.toml");
    let (ka, kb) = (SigningKey::generate("a"), SigningKey::generate("b"));
    std::fs::write(
        &path,
        format!(
            "{}{}",
            tenant_block("acme", 100, &[("a1", &ka)]),
            tenant_block("beta", 100, &[("b1", &kb)])
        ),
    )
    .unwrap();
    let before = std::fs::read(&path).unwrap();
    let source = FileSource::new(&path);
    let fresh = || NewKey::new("new-1", SigningKey::generate("n").verifying_key());

    let cases = [
        Change::AddTenant {
            tenant: "acme".into(),
            policy: acme_policy(),
            key: fresh(),
        },
        Change::AddTenant {
            tenant: "gamma".into(),
            policy: acme_policy(),
            key: NewKey::new("b1", kb.verifying_key()),
        },
        Change::AddKey {
            tenant: "nobody".into(),
            key: fresh(),
            retire: None,
        },
        Change::AddKey {
            tenant: "acme".into(),
            key: fresh(),
            retire: Some(Retire {
                key_id: "b1".into(),
                not_after_ms: now_ms(),
            }),
        },
        Change::Revoke {
            key_id: "nope".into(),
        },
        Change::AddKey {
            tenant: "acme".into(),
            key: NewKey {
                not_before_ms: Some(2_000),
                not_after_ms: Some(1_000),
                ..fresh()
            },
            retire: None,
        },
        Change::AddTenant {
            tenant: "zero".into(),
            policy: TenantPolicy {
                burst: 0,
                ..acme_policy()
            },
            key: fresh(),
        },
    ];
    let mut errors = Vec::new();
    for change in cases {
        errors.push(source.apply(change).await.unwrap_err());
    }
    assert!(matches!(&errors[0], AdminError::TenantExists(t) if t == "acme"));
    assert!(matches!(&errors[1], AdminError::KeyExists { tenant, .. } if tenant == "beta"));
    assert!(matches!(&errors[2], AdminError::UnknownTenant(t) if t == "nobody"));
    assert!(matches!(&errors[3], AdminError::WrongTenant { owner, .. } if owner == "beta"));
    assert!(matches!(&errors[4], AdminError::UnknownKey(k) if k == "nope"));
    assert!(matches!(
        &errors[5],
        AdminError::Invalid(TenantsError::EmptyWindow { .. })
    ));
    assert!(matches!(
        &errors[6],
        AdminError::Invalid(TenantsError::ZeroRate(_))
    ));
    assert_eq!(std::fs::read(&path).unwrap(), before);

    // A file that is already invalid is not edited further.
    std::fs::write(&path, "[[tenants]]\nname = 1\n").unwrap();
    let err = source
        .apply(Change::Revoke {
            key_id: "a1".into(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AdminError::Store(StoreError::Invalid(TenantsError::Parse { .. }))
        ),
        "{err:?}"
    );
}

// ---- the store over a file ----

/// Replaces the file as editors and the management operations do (write aside, rename).
fn replace(path: &Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

fn hours(n: u64) -> Duration {
    Duration::from_secs(3600 * n)
}

#[tokio::test]
async fn a_missing_or_invalid_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.toml");
    let missing = KeyStore::start(FileSource::new(&path), StoreOptions::default()).await;
    assert!(matches!(
        missing,
        Err(StoreError::Invalid(TenantsError::Read { .. }))
    ));
    std::fs::write(&path, "[[tenants]]\nname = 1\n").unwrap();
    let invalid = KeyStore::start(FileSource::new(&path), StoreOptions::default()).await;
    assert!(matches!(
        invalid,
        Err(StoreError::Invalid(TenantsError::Parse { .. }))
    ));
}

#[tokio::test]
async fn the_store_follows_file_changes_and_keeps_the_last_good_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.toml");
    let (k1, k2) = (SigningKey::generate("a1"), SigningKey::generate("a2"));
    std::fs::write(&path, tenant_block("acme", 100, &[("a1", &k1)])).unwrap();
    let options = StoreOptions {
        // Only the watch can see the changes in time.
        refresh_interval: hours(1),
        watch_interval: Duration::from_millis(50),
    };
    let store = KeyStore::start(FileSource::new(&path), options)
        .await
        .unwrap();
    let mut changes = store.changes();
    assert!(store.key("a1").is_some());

    let two_keys = format!(
        "{}{}",
        tenant_block("acme", 100, &[("a1", &k1)]),
        key_table("acme", "a2", &k2, "")
    );
    replace(&path, &two_keys);
    within(Duration::from_secs(5), "the added key", || {
        store.snapshot().key("a2").is_some()
    })
    .await;
    assert!(changes.has_changed().unwrap(), "a change is announced");
    changes.mark_unchanged();

    // An edit in progress (or a mistake) is not served: the last good snapshot stays, and the
    // failure is counted.
    let failures = store.metrics().reload_failures.get();
    std::fs::write(&path, "[[tenants]]\nname = \"acme\"\nmodels = [").unwrap();
    within(Duration::from_secs(5), "the failed reload", || {
        store.metrics().reload_failures.get() > failures
    })
    .await;
    assert_eq!(store.metrics().source_up.get(), 0);
    assert!(store.key("a1").is_some() && store.key("a2").is_some());
    assert!(!changes.has_changed().unwrap());

    // Fixed: served again.
    replace(
        &path,
        &two_keys.replace("key_id = \"a2\"", "key_id = \"a2\"\nrevoked = true"),
    );
    within(Duration::from_secs(5), "the revocation", || {
        store.key("a2").is_some_and(|k| k.revoked)
    })
    .await;
    assert_eq!(store.metrics().source_up.get(), 1);

    // What the dispatcher and the workers ask: a2's signature still verifies, but a2 may sign
    // nothing any more; a1 may.
    for (signer, allowed) in [(&k1, true), (&k2, false)] {
        let job = Job::embed("j1", "acme", "m", vec!["hi".into()], now_ms());
        let envelope = signer.sign_job(&job).unwrap();
        let key = store.verify(&envelope).unwrap();
        let verdict = store.authorize(&key, &job, now_ms());
        assert_eq!(verdict.is_ok(), allowed, "{}: {verdict:?}", signer.key_id);
    }
}

#[tokio::test]
async fn reload_on_request_and_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.toml");
    let (k1, k2, k3) = (
        SigningKey::generate("a1"),
        SigningKey::generate("a2"),
        SigningKey::generate("a3"),
    );
    std::fs::write(&path, tenant_block("acme", 100, &[("a1", &k1)])).unwrap();
    let options = StoreOptions {
        // Neither timer fires during the test: only the requests reload.
        refresh_interval: hours(1),
        watch_interval: hours(1),
    };
    let (source, loads) = Counting::new(FileSource::new(&path));
    let store = KeyStore::start(source, options).await.unwrap();
    assert_eq!(loads.load(Ordering::SeqCst), 1);

    std::fs::write(
        &path,
        tenant_block("acme", 100, &[("a1", &k1), ("a2", &k2)]),
    )
    .unwrap();
    store.reload().await.unwrap();
    assert!(
        store.snapshot().key("a2").is_some(),
        "reload waits for a fresh load"
    );

    std::fs::write(&path, "not toml [").unwrap();
    let err = store.reload().await.unwrap_err();
    assert!(
        matches!(*err, StoreError::Invalid(TenantsError::Parse { .. })),
        "{err:?}"
    );
    assert!(store.snapshot().key("a2").is_some());

    store.reload_on_sighup().unwrap();
    std::fs::write(&path, tenant_block("acme", 100, &[("a3", &k3)])).unwrap();
    let before = loads.load(Ordering::SeqCst);
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    within(Duration::from_secs(5), "the reload after SIGHUP", || {
        store.snapshot().key("a3").is_some()
    })
    .await;
    assert!(
        store.snapshot().key("a1").is_none(),
        "a removed key is gone"
    );
    assert_eq!(loads.load(Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn unknown_key_ids_cause_at_most_one_reload_per_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tenants.toml");
    let (k1, k2) = (SigningKey::generate("a1"), SigningKey::generate("a2"));
    std::fs::write(&path, tenant_block("acme", 100, &[("a1", &k1)])).unwrap();
    let interval = Duration::from_millis(800);
    let options = StoreOptions {
        refresh_interval: interval,
        watch_interval: hours(1),
    };
    let (source, loads) = Counting::new(FileSource::new(&path));
    let store = KeyStore::start(source, options).await.unwrap();
    let started = std::time::Instant::now();

    // A key registered after the start is found by the first lookup that misses: it waits for
    // the one reload it may start.
    std::fs::write(
        &path,
        tenant_block("acme", 100, &[("a1", &k1), ("a2", &k2)]),
    )
    .unwrap();
    assert!(store.key_or_reload("a2").await.is_some());
    assert_eq!(loads.load(Ordering::SeqCst), 2);

    // A flood of random ids: no further reload in this interval, whether waiting or not.
    for i in 0..5_000 {
        assert!(store.key(&format!("forged-{i}")).is_none());
    }
    for i in 0..50 {
        assert!(
            store
                .key_or_reload(&format!("forged-async-{i}"))
                .await
                .is_none()
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        started.elapsed() < interval,
        "the test ran too slowly to judge"
    );
    assert_eq!(loads.load(Ordering::SeqCst), 2);
    assert_eq!(store.metrics().unknown_key_reloads.get(), 1);
    assert_eq!(store.metrics().unknown_keys.get(), 5_051);

    // The next interval allows one more (besides the periodic refresh).
    tokio::time::sleep(interval).await;
    let before = loads.load(Ordering::SeqCst);
    assert!(store.key_or_reload("forged-later").await.is_none());
    assert!(store.key_or_reload("forged-later-2").await.is_none());
    assert_eq!(loads.load(Ordering::SeqCst), before + 1);
    assert_eq!(store.metrics().unknown_key_reloads.get(), 2);
}
