//! A saturated dispatcher, against a real nats-server: every request gets an answer at once
//! (accepted, or `overloaded` when no publish slot is free), and what NATS drops before the
//! dispatcher could read it is counted and logged, never lost silently.

use std::time::Duration;

use fleet_dispatcher::{Dispatcher, DispatcherConfig};
use fleet_keys::{KeyStore, Tenants};
use fleet_schemas::{
    ErrorCode, Job, SigningKey, SubmitReply, SubmitStatus, decode, encode, now_ms, subject,
};
use fleet_tests::NatsServer;
use futures::StreamExt;
use prometheus_client::registry::Registry;

const MODEL: &str = "all-minilm-l6-v2";

struct Running {
    _nats: NatsServer,
    client: async_nats::Client,
    key: SigningKey,
    registry: Registry,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start(extra: &[&str]) -> Running {
    let nats = NatsServer::start();
    let key = SigningKey::generate("acme-1");
    let tenants = Tenants::from_toml(&format!(
        "[[tenants]]\nname = \"acme\"\nmodels = [\"*\"]\nrate_per_second = 100000\nburst = 100000\n\
         keys = [{{ key_id = \"acme-1\", public_key = \"{}\" }}]\n",
        key.verifying_key().to_hex()
    ))
    .unwrap();
    let mut args = vec![
        "dispatcher",
        "--nats-url",
        nats.url(),
        "--metrics-addr",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    let config: DispatcherConfig =
        fleet_service::load_config(args.into_iter().map(Into::into)).unwrap();
    let mut registry = Registry::default();
    let dispatcher = Dispatcher::start(&config, KeyStore::fixed(tenants), &mut registry)
        .await
        .unwrap();
    let listening = dispatcher.listen().await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(listening.run(async {
        let _ = stopped.await;
    }));
    let client = nats.client().await;
    Running {
        _nats: nats,
        client,
        key,
        registry,
        _stop: stop,
    }
}

fn signed(key: &SigningKey, n: usize) -> Vec<u8> {
    let job = Job::embed(
        format!("job-{n}"),
        "acme",
        MODEL,
        vec!["x".into()],
        now_ms(),
    );
    encode(&key.sign_job(&job).unwrap()).unwrap()
}

fn metric(registry: &Registry, name: &str) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
}

/// With one publish slot and a burst of requests, the requests that find the slot taken are
/// answered `overloaded` at once instead of queuing for it (which would stall the loop that reads
/// them, until NATS drops what it cannot buffer); each request gets exactly one answer.
#[tokio::test]
async fn requests_finding_no_publish_slot_are_answered_overloaded_at_once() {
    let fleet = start(&["--max-pending-publishes", "1"]).await;
    let inbox = fleet.client.new_inbox();
    let mut answers = fleet.client.subscribe(inbox.clone()).await.unwrap();
    let sent = 200;
    for n in 0..sent {
        fleet
            .client
            .publish_with_reply(
                subject::submit(MODEL),
                inbox.clone(),
                signed(&fleet.key, n).into(),
            )
            .await
            .unwrap();
    }
    fleet.client.flush().await.unwrap();
    let (mut accepted, mut overloaded) = (0, 0);
    for _ in 0..sent {
        let answer = tokio::time::timeout(Duration::from_secs(5), answers.next())
            .await
            .expect("every request is answered")
            .unwrap();
        let reply: SubmitReply = decode(&answer.payload, 1 << 20).unwrap();
        match (reply.status, reply.error.map(|e| e.code)) {
            (SubmitStatus::Accepted, None) => accepted += 1,
            (SubmitStatus::Rejected, Some(ErrorCode::Overloaded)) => overloaded += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(accepted >= 1, "the free slot takes a job");
    assert!(
        overloaded >= 1,
        "a burst over one slot must be refused, not queued"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), answers.next())
            .await
            .is_err(),
        "no request is answered twice"
    );
    assert_eq!(
        metric(&fleet.registry, "fleet_dispatcher_jobs_accepted_total"),
        accepted
    );
}

/// A dispatcher whose NATS buffer holds one request, flooded: NATS drops requests before the
/// dispatcher reads them, and each drop is counted (the client reports it as a slow-consumer
/// event). Every request is either handled (here: refused as `malformed`) or counted dropped.
#[tokio::test]
async fn requests_nats_drops_unread_are_counted() {
    let fleet = start(&["--max-buffered-requests", "1"]).await;
    let sent: u64 = 20_000;
    for _ in 0..sent {
        fleet
            .client
            .publish(subject::submit(MODEL), "not an envelope".into())
            .await
            .unwrap();
    }
    fleet.client.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let dropped = metric(&fleet.registry, "fleet_dispatcher_requests_dropped_total");
    let handled = metric(
        &fleet.registry,
        "fleet_dispatcher_jobs_rejected_total{code=\"malformed\"}",
    );
    assert!(
        dropped > 0,
        "a flood into a one-request buffer drops requests"
    );
    assert!(handled + dropped <= sent, "{handled} + {dropped} > {sent}");
}
