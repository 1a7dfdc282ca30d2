//! The dispatcher's metrics after a known workload, against a real nats-server: every request
//! counted once by its subject kind, its outcome and its code; admission, signature checks and
//! publishes timed; repeated `infer` calls waiting for their result counted while they wait.
//! The metrics are read as a scrape would read them: the registry's OpenMetrics text.

use std::time::Duration;

use fleet_dispatcher::{Dispatcher, DispatcherConfig};
use fleet_keys::{KeyStore, Tenants};
use fleet_schemas::{Job, SigningKey, SubmitReply, decode, encode, now_ms, subject};
use fleet_tests::{NatsServer, eventually, openmetrics::Scrape};
use futures::StreamExt;
use prometheus_client::registry::Registry;

const MODEL: &str = "all-minilm-l6-v2";
const WAIT: Duration = Duration::from_secs(15);

fn requests(kind: &str, outcome: &str, code: &str) -> String {
    format!(
        "fleet_dispatcher_requests_total{{kind=\"{kind}\",outcome=\"{outcome}\",code=\"{code}\"}}"
    )
}

struct Running {
    nats: NatsServer,
    acme: SigningKey,
    slow: SigningKey,
    registry: Registry,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// A dispatcher serving acme (at any rate) and slow (one job a second), with repeated `infer`
/// calls waiting 1.5 s for their result.
async fn start() -> Running {
    let nats = NatsServer::start();
    let acme = SigningKey::generate("acme-1");
    let slow = SigningKey::generate("slow-1");
    let tenants = Tenants::from_toml(&format!(
        "[[tenants]]\nname = \"acme\"\nmodels = [\"*\"]\nrate_per_second = 100000\nburst = 100000\n\
         keys = [{{ key_id = \"acme-1\", public_key = \"{}\" }}]\n\n\
         [[tenants]]\nname = \"slow\"\nmodels = [\"*\"]\nrate_per_second = 1\nburst = 1\n\
         keys = [{{ key_id = \"slow-1\", public_key = \"{}\" }}]\n",
        acme.verifying_key().to_hex(),
        slow.verifying_key().to_hex(),
    ))
    .expect("tenants");
    let args = ["dispatcher", "--nats-url", nats.url()].into_iter().chain([
        "--metrics-addr",
        "127.0.0.1:0",
        "--relay-wait",
        "1500ms",
    ]);
    let config: DispatcherConfig =
        fleet_service::load_config(args.map(Into::into)).expect("config");
    let mut registry = Registry::default();
    let dispatcher = Dispatcher::start(&config, KeyStore::fixed(tenants), &mut registry)
        .await
        .expect("starts");
    let listening = dispatcher.listen().await.expect("listens");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(listening.run(async {
        let _ = stopped.await;
    }));
    Running {
        nats,
        acme,
        slow,
        registry,
        _stop: stop,
    }
}

fn signed(key: &SigningKey, job: &Job) -> Vec<u8> {
    encode(&key.sign_job(job).expect("sign")).expect("encode")
}

fn job(tenant: &str, id: &str) -> Job {
    Job::embed(id, tenant, MODEL, vec!["text".into()], now_ms())
}

/// Every request of a known mix, counted by kind, outcome and code; the legacy totals agree.
#[tokio::test]
async fn after_a_known_workload_the_request_metrics_equal_the_workload() {
    let fleet = start().await;
    let client = fleet.nats.client().await;
    let submit = |payload: Vec<u8>, model: &'static str| {
        let client = client.clone();
        async move {
            let answer =
                tokio::time::timeout(WAIT, client.request(subject::submit(model), payload.into()))
                    .await
                    .expect("answered in time")
                    .expect("answered");
            decode::<SubmitReply>(&answer.payload, 1 << 20).expect("a SubmitReply")
        }
    };
    for id in ["a-1", "a-2", "a-3"] {
        submit(signed(&fleet.acme, &job("acme", id)), MODEL).await;
    }
    // The same job again: a duplicate.
    submit(signed(&fleet.acme, &job("acme", "a-1")), MODEL).await;
    // The second within a second of a tenant allowed one a second.
    submit(signed(&fleet.slow, &job("slow", "s-1")), MODEL).await;
    submit(signed(&fleet.slow, &job("slow", "s-2")), MODEL).await;
    submit(b"not an envelope".to_vec(), MODEL).await;
    // Signed under acme's key id by a key that is not acme's.
    submit(
        signed(&SigningKey::generate("acme-1"), &job("acme", "a-forged")),
        MODEL,
    )
    .await;
    submit(
        signed(&SigningKey::generate("nobody-1"), &job("acme", "a-9")),
        MODEL,
    )
    .await;
    submit(signed(&fleet.acme, &job("acme", "a-other")), "other-model").await;
    let mut old = job("acme", "a-old");
    old.created_at_ms = now_ms() - 3_600_000;
    submit(signed(&fleet.acme, &old), MODEL).await;

    // infer: one queued (nobody answers it here), one repeated while queued (it waits for the
    // result), one whose reply subject is not its tenant's inbox.
    let acme_client = fleet.nats.tenant_client("acme").await;
    let inbox = acme_client.new_inbox();
    let infer = job("acme", "i-1");
    for _ in 0..2 {
        acme_client
            .publish_with_reply(
                subject::infer(MODEL),
                inbox.clone(),
                signed(&fleet.acme, &infer).into(),
            )
            .await
            .expect("publish");
    }
    let mut foreign = client.subscribe("_INBOX.someone.x").await.expect("sub");
    client
        .publish_with_reply(
            subject::infer(MODEL),
            "_INBOX.someone.x",
            signed(&fleet.acme, &job("acme", "i-2")).into(),
        )
        .await
        .expect("publish");
    tokio::time::timeout(WAIT, foreign.next())
        .await
        .expect("the refusal in time");

    let scrape = eventually(WAIT, "the repeated infer waiting", || async {
        let scrape = Scrape::of(&fleet.registry);
        (scrape.samples.get("fleet_dispatcher_relays_waiting") == Some(&1.0)).then_some(scrape)
    })
    .await;
    for (kind, outcome, code, count) in [
        ("submit", "accepted", "", 4.0),
        ("submit", "duplicate", "", 1.0),
        ("submit", "rejected", "rate_limited", 1.0),
        ("submit", "rejected", "malformed", 1.0),
        ("submit", "rejected", "bad_signature", 1.0),
        ("submit", "rejected", "unknown_key", 1.0),
        ("submit", "rejected", "unknown_model", 1.0),
        ("submit", "rejected", "expired", 1.0),
        ("infer", "accepted", "", 1.0),
        ("infer", "duplicate", "", 1.0),
        ("infer", "rejected", "forbidden", 1.0),
    ] {
        assert_eq!(
            scrape.value(&requests(kind, outcome, code)),
            count,
            "{kind} {outcome} {code}"
        );
    }
    assert_eq!(scrape.sum("fleet_dispatcher_requests_total"), 14.0);
    // The totals without the kind agree.
    assert_eq!(scrape.value("fleet_dispatcher_jobs_accepted_total"), 5.0);
    assert_eq!(scrape.value("fleet_dispatcher_jobs_duplicate_total"), 2.0);
    assert_eq!(scrape.sum("fleet_dispatcher_jobs_rejected_total"), 7.0);
    // Every request was admitted or refused once.
    assert_eq!(
        scrape.value("fleet_dispatcher_admission_seconds_count"),
        14.0
    );
    // Envelopes that reached the signature check: all but the garbled one and the unknown
    // model's.
    assert_eq!(
        scrape.value("fleet_dispatcher_signature_verification_seconds_count"),
        12.0
    );
    // Publishes: the queued jobs and the duplicates.
    assert_eq!(scrape.value("fleet_dispatcher_publish_seconds_count"), 7.0);
    assert_eq!(scrape.value("fleet_dispatcher_admissions_in_flight"), 0.0);
    assert_eq!(scrape.value("fleet_dispatcher_requests_dropped_total"), 0.0);
    scrape.assert_family("fleet_dispatcher_requests", "counter", None);
    scrape.assert_family(
        "fleet_dispatcher_admission_seconds",
        "histogram",
        Some("seconds"),
    );
    scrape.assert_family(
        "fleet_dispatcher_signature_verification_seconds",
        "histogram",
        Some("seconds"),
    );
    scrape.assert_family(
        "fleet_dispatcher_publish_seconds",
        "histogram",
        Some("seconds"),
    );
    scrape.assert_family("fleet_dispatcher_relays_waiting", "gauge", None);

    // No result comes: the repeated call stops waiting after --relay-wait.
    eventually(WAIT, "the relay given up", || async {
        (Scrape::of(&fleet.registry).value("fleet_dispatcher_relays_waiting") == 0.0).then_some(())
    })
    .await;
}

#[test]
fn every_labelled_series_is_there_at_zero_before_its_first_event() {
    // Prometheus takes a series' first sample as its start: one born at 1 never shows in rate().
    let mut registry = Registry::default();
    let _metrics = fleet_dispatcher::metrics::DispatcherMetrics::register(&mut registry);
    let scrape = Scrape::of(&registry);
    for series in [
        "fleet_dispatcher_requests_total{kind=\"infer\",outcome=\"accepted\",code=\"\"}",
        "fleet_dispatcher_requests_total{kind=\"submit\",outcome=\"duplicate\",code=\"\"}",
        "fleet_dispatcher_requests_total{kind=\"submit\",outcome=\"rejected\",code=\"overloaded\"}",
        "fleet_dispatcher_jobs_rejected_total{code=\"rate_limited\"}",
    ] {
        assert_eq!(scrape.value(series), 0.0, "{series}");
    }
}
