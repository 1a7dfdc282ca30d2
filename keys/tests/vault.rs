//! The Vault KV v2 backend against a real OpenBao (`ops/install-openbao.sh`).

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::{Counting, public_hex, within};
use fleet_keys::{
    AdminError, Change, KeyRefusal, KeyStore, NewKey, Retire, StoreError, StoreOptions,
    TenantAdmin, TenantPolicy, TenantSource, TenantsError, VaultConfig, VaultSource,
};
use fleet_schemas::{SigningKey, now_ms};
use fleet_tests::openbao::OpenBao;

fn source(bao: &OpenBao) -> VaultSource {
    VaultSource::new(VaultConfig::new(bao.addr(), bao.token())).unwrap()
}

fn policy() -> TenantPolicy {
    TenantPolicy {
        models: vec!["all-minilm-l6-v2".into()],
        rate_per_second: 100,
        burst: 200,
    }
}

fn fast() -> StoreOptions {
    StoreOptions {
        refresh_interval: Duration::from_millis(500),
        ..StoreOptions::default()
    }
}

/// A client of its own, as an operator's tools would use.
fn client(bao: &OpenBao) -> vaultrs::client::VaultClient {
    let _ = rustls::crypto::ring::default_provider().install_default();
    vaultrs::client::VaultClient::new(
        vaultrs::client::VaultClientSettingsBuilder::default()
            .address(bao.addr())
            .token(bao.token())
            .build()
            .unwrap(),
    )
    .unwrap()
}

/// Writes a tenant's secret as an operator would with `bao kv put`, in the documented layout.
async fn put(bao: &OpenBao, tenant: &str, data: serde_json::Value) {
    vaultrs::kv2::set(
        &client(bao),
        "secret",
        &format!("fleet/tenants/{tenant}"),
        &data,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn the_documented_layout_is_read_at_start() {
    let bao = OpenBao::start();
    let (k1, k2, k3) = (
        SigningKey::generate("a1"),
        SigningKey::generate("a2"),
        SigningKey::generate("b1"),
    );
    put(
        &bao,
        "acme",
        serde_json::json!({
            "models": ["all-minilm-l6-v2"],
            "rate_per_second": 100,
            "burst": 200,
            "keys": [
                {"key_id": "a1", "public_key": public_hex(&k1)},
                {"key_id": "a2", "public_key": public_hex(&k2),
                 "not_before": "2026-01-01T00:00:00Z", "not_after": "2027-01-01T00:00:00Z"},
            ]
        }),
    )
    .await;
    put(
        &bao,
        "beta",
        serde_json::json!({
            "models": ["*"], "rate_per_second": 1, "burst": 1,
            "keys": [{"key_id": "b1", "public_key": public_hex(&k3), "revoked": true}]
        }),
    )
    .await;

    let store = KeyStore::start(source(&bao), fast()).await.unwrap();
    let snapshot = store.snapshot();
    assert_eq!((snapshot.tenant_count(), snapshot.key_count()), (2, 3));
    let a2 = store.key("a2").unwrap();
    assert_eq!(a2.tenant, "acme");
    assert_eq!(a2.public_key, k2.verifying_key());
    assert_eq!(a2.not_before_ms, Some(1_767_225_600_000));
    assert_eq!(a2.not_after_ms, Some(1_798_761_600_000));
    assert!(store.key("b1").unwrap().revoked);
    assert!(snapshot.policy("beta").unwrap().allows_model("anything"));
    assert_eq!(store.metrics().source_up.get(), 1);
    assert!(store.describe().contains(bao.addr()));

    // Deleting a tenant's secret removes the tenant and its keys.
    vaultrs::kv2::delete_latest(&client(&bao), "secret", "fleet/tenants/beta")
        .await
        .unwrap();
    within(Duration::from_secs(3), "the deleted tenant gone", || {
        store.key("b1").is_none()
    })
    .await;
    assert!(store.tenant("beta").is_none());
    assert!(store.key("a1").is_some());

    // And it can be added again, over its deleted history.
    source(&bao)
        .apply(Change::AddTenant {
            tenant: "beta".into(),
            policy: policy(),
            key: NewKey::new("b2", SigningKey::generate("b2").verifying_key()),
        })
        .await
        .unwrap();
    store.reload().await.unwrap();
    assert_eq!(store.key("b2").unwrap().tenant, "beta");
}

#[tokio::test]
async fn rotation_and_revocation_are_seen_within_the_refresh_interval() {
    let bao = OpenBao::start();
    let admin = source(&bao);
    let (old, new) = (SigningKey::generate("old"), SigningKey::generate("new"));
    admin
        .apply(Change::AddTenant {
            tenant: "acme".into(),
            policy: policy(),
            key: NewKey::new("acme-old", old.verifying_key()),
        })
        .await
        .unwrap();
    let store = KeyStore::start(source(&bao), fast()).await.unwrap();
    assert_eq!(
        store.key("acme-old").unwrap().check(now_ms(), now_ms()),
        Ok(())
    );

    // Rotation: a new key, and the old one ends now (a job it signed earlier stays good).
    let cutover = now_ms();
    admin
        .apply(Change::AddKey {
            tenant: "acme".into(),
            key: NewKey::new("acme-new", new.verifying_key()),
            retire: Some(Retire {
                key_id: "acme-old".into(),
                not_after_ms: cutover,
            }),
        })
        .await
        .unwrap();
    let seen = within(Duration::from_secs(3), "the rotation", || {
        store.snapshot().key("acme-new").is_some()
    })
    .await;
    // The refresh interval (500 ms), plus time for the load itself on a busy machine.
    assert!(
        seen < Duration::from_millis(1200),
        "rotation seen after {seen:?}"
    );
    let retired = store.key("acme-old").unwrap();
    assert_eq!(retired.not_after_ms, Some(cutover));
    assert!(matches!(
        retired.check(now_ms(), now_ms()),
        Err(KeyRefusal::Expired { .. })
    ));
    assert_eq!(retired.check(cutover - 1_000, now_ms()), Ok(()));
    assert_eq!(store.key("acme-new").unwrap().tenant, "acme");

    admin
        .apply(Change::Revoke {
            key_id: "acme-new".into(),
        })
        .await
        .unwrap();
    let seen = within(Duration::from_secs(3), "the revocation", || {
        store.key("acme-new").is_some_and(|k| k.revoked)
    })
    .await;
    assert!(
        seen < Duration::from_millis(1200),
        "revocation seen after {seen:?}"
    );
    assert!(matches!(
        store.key("acme-new").unwrap().check(now_ms(), now_ms()),
        Err(KeyRefusal::Revoked { .. })
    ));

    // What `fleet tenant list` shows.
    let listed = admin.load().await.unwrap();
    let acme = listed.tenant("acme").unwrap();
    assert_eq!(acme.policy, policy());
    let ids: Vec<&str> = acme.keys.iter().map(|k| k.key_id.as_str()).collect();
    assert_eq!(ids, ["acme-old", "acme-new"]);
}

#[tokio::test]
async fn an_unreachable_or_refusing_vault_at_start_refuses_to_start() {
    // A port nothing listens on: bind one, then close it.
    let addr = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let unreachable = VaultSource::new(VaultConfig::new(&addr, "t")).unwrap();
    match KeyStore::start(unreachable, fast()).await {
        Err(err @ StoreError::Unreachable { .. }) => {
            assert!(err.to_string().contains(&addr), "{err}")
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("started without Vault"),
    }

    let bao = OpenBao::start();
    let wrong_token = VaultSource::new(VaultConfig::new(bao.addr(), "not-the-token")).unwrap();
    match KeyStore::start(wrong_token, fast()).await {
        Err(StoreError::Refused { status, .. }) => assert_eq!(status, 403),
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("started with a wrong token"),
    }

    assert!(matches!(
        VaultSource::new(VaultConfig::new("not a url", "t")),
        Err(StoreError::Config(_))
    ));
}

#[tokio::test]
async fn a_vault_that_stops_mid_run_leaves_the_last_keys_served_and_counted() {
    let mut bao = OpenBao::start();
    let key = SigningKey::generate("a1");
    source(&bao)
        .apply(Change::AddTenant {
            tenant: "acme".into(),
            policy: policy(),
            key: NewKey::new("a1", key.verifying_key()),
        })
        .await
        .unwrap();
    let store = KeyStore::start(source(&bao), fast()).await.unwrap();
    assert_eq!(store.metrics().reload_failures.get(), 0);

    bao.stop();
    within(Duration::from_secs(5), "a failed refresh", || {
        store.metrics().reload_failures.get() >= 1
    })
    .await;
    assert_eq!(store.metrics().source_up.get(), 0);
    let still = store.key("a1").expect("the last snapshot is still served");
    assert_eq!(still.public_key, key.verifying_key());
    let err = store.reload().await.unwrap_err();
    assert!(matches!(*err, StoreError::Unreachable { .. }), "{err:?}");
    assert!(store.key("a1").is_some());
}

#[tokio::test]
async fn unknown_key_ids_reload_from_vault_at_most_once_per_interval() {
    let bao = OpenBao::start();
    let admin = source(&bao);
    admin
        .apply(Change::AddTenant {
            tenant: "acme".into(),
            policy: policy(),
            key: NewKey::new("a1", SigningKey::generate("a1").verifying_key()),
        })
        .await
        .unwrap();
    let options = StoreOptions {
        refresh_interval: Duration::from_secs(3600),
        ..StoreOptions::default()
    };
    let (counted, loads) = Counting::new(source(&bao));
    let store = KeyStore::start(counted, options).await.unwrap();

    // Registered after the start: the first miss reloads and finds it.
    admin
        .apply(Change::AddKey {
            tenant: "acme".into(),
            key: NewKey::new("a2", SigningKey::generate("a2").verifying_key()),
            retire: None,
        })
        .await
        .unwrap();
    assert!(store.key_or_reload("a2").await.is_some());
    for i in 0..2_000 {
        assert!(store.key(&format!("random-{i}")).is_none());
        if i % 100 == 0 {
            assert!(
                store
                    .key_or_reload(&format!("random-async-{i}"))
                    .await
                    .is_none()
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(loads.load(Ordering::SeqCst), 2, "the start and one reload");
}

#[tokio::test]
async fn management_on_vault_refuses_what_does_not_fit_and_an_invalid_secret_keeps_the_last_keys() {
    let bao = OpenBao::start();
    let admin = source(&bao);
    let key = SigningKey::generate("a1");
    admin
        .apply(Change::AddTenant {
            tenant: "acme".into(),
            policy: policy(),
            key: NewKey::new("a1", key.verifying_key()),
        })
        .await
        .unwrap();
    let again = admin
        .apply(Change::AddTenant {
            tenant: "acme".into(),
            policy: policy(),
            key: NewKey::new("a9", key.verifying_key()),
        })
        .await;
    assert!(
        matches!(again, Err(AdminError::TenantExists(_))),
        "{again:?}"
    );
    let reused = admin
        .apply(Change::AddTenant {
            tenant: "beta".into(),
            policy: policy(),
            key: NewKey::new("a1", key.verifying_key()),
        })
        .await;
    assert!(
        matches!(reused, Err(AdminError::KeyExists { .. })),
        "{reused:?}"
    );
    let zero = admin
        .apply(Change::AddTenant {
            tenant: "beta".into(),
            policy: TenantPolicy {
                rate_per_second: 0,
                ..policy()
            },
            key: NewKey::new("b1", SigningKey::generate("b").verifying_key()),
        })
        .await;
    assert!(
        matches!(zero, Err(AdminError::Invalid(TenantsError::ZeroRate(_)))),
        "{zero:?}"
    );
    assert_eq!(
        admin.load().await.unwrap().tenant_count(),
        1,
        "nothing written"
    );

    let store = KeyStore::start(source(&bao), fast()).await.unwrap();
    put(
        &bao,
        "broken",
        serde_json::json!({"models": ["m"], "rate": 1}),
    )
    .await;
    let err = store.reload().await.unwrap_err();
    assert!(
        matches!(&*err, StoreError::Invalid(TenantsError::BadDocument { tenant, .. }) if tenant == "broken"),
        "{err:?}"
    );
    assert!(store.key("a1").is_some());
    assert!(store.metrics().reload_failures.get() >= 1);
}

#[tokio::test]
async fn the_documented_serving_policy_serves_and_cannot_write() {
    let bao = OpenBao::start();
    let admin = source(&bao);
    admin
        .apply(Change::AddTenant {
            tenant: "acme".into(),
            policy: policy(),
            key: NewKey::new("a1", SigningKey::generate("a1").verifying_key()),
        })
        .await
        .unwrap();
    // The policy as VaultSource's documentation gives it.
    let serving = r#"
        path "secret/metadata/fleet/tenants" { capabilities = ["list"] }
        path "secret/data/fleet/tenants/*"   { capabilities = ["read"] }
    "#;
    let root = client(&bao);
    vaultrs::sys::policy::set(&root, "fleet-serving", serving)
        .await
        .unwrap();
    let token = vaultrs::token::new(
        &root,
        Some(
            vaultrs::api::token::requests::CreateTokenRequest::builder()
                .policies(vec!["fleet-serving".to_owned()])
                .no_default_policy(true),
        ),
    )
    .await
    .unwrap()
    .client_token;

    let limited = VaultSource::new(VaultConfig::new(bao.addr(), &token)).unwrap();
    let store = KeyStore::start(limited, fast()).await.unwrap();
    assert!(store.key("a1").is_some());

    let limited = VaultSource::new(VaultConfig::new(bao.addr(), &token)).unwrap();
    let write = limited
        .apply(Change::Revoke {
            key_id: "a1".into(),
        })
        .await;
    assert!(
        matches!(
            write,
            Err(AdminError::Store(StoreError::Refused { status: 403, .. }))
        ),
        "{write:?}"
    );
    assert!(!admin.load().await.unwrap().key("a1").unwrap().revoked);
}
