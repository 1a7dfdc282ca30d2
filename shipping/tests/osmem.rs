//! The shipper against an Elasticsearch-API server (`osmem-server`, see
//! `fleet_tests::elasticsearch`): lines and audit events reach their daily indices made with the
//! templates; a line the server refuses (a mapping conflict) and a line over the size cap are
//! dropped and counted by reason; shutdown sends what is buffered.

use std::time::Duration;

use fleet_shipping::{AUDIT_TARGET, DropReason, Index, ShippingConfig, ShippingMetrics};
use fleet_tests::{elasticsearch::Elasticsearch, eventually};
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_reach_their_indices_and_refused_or_oversized_ones_are_counted() {
    let es = Elasticsearch::start();
    let metrics = ShippingMetrics::default();
    let config = ShippingConfig {
        url: es.url().to_owned(),
        auth: None,
        index_prefix: "unit".to_owned(),
        capacity: 100,
        batch_lines: 10,
        flush_interval: Duration::from_millis(100),
        max_line_bytes: 2048,
        service: "unit-test".to_owned(),
    };
    let (layer, shipper) = fleet_shipping::start(&config, metrics.clone()).expect("started");
    // Events written on this thread go to the layer.
    let _logging = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));

    let span = tracing::info_span!("job", job_id = "job-1", trace_id = "t-1");
    span.in_scope(|| tracing::info!(target: "unit", count = 5, "a number"));
    eventually(WAIT, "the first line shipped", || {
        let shipped = metrics.shipped_total(Index::Logs);
        async move { (shipped == 1).then_some(()) }
    })
    .await;
    // `fields.count` is a number now: a text there is refused by the server.
    tracing::info!(target: "unit", count = "many", "a conflict");
    tracing::info!(target: "unit", text = "x".repeat(4096), "too large");
    tracing::info!(target: AUDIT_TARGET, action = "test", code = "none", "an audit event");
    shipper.shutdown(WAIT).await;

    assert_eq!(metrics.shipped_total(Index::Logs), 1);
    assert_eq!(metrics.shipped_total(Index::Audit), 1);
    assert_eq!(metrics.dropped_total(DropReason::Rejected), 1);
    assert_eq!(metrics.dropped_total(DropReason::TooLarge), 1);
    assert_eq!(metrics.dropped_total(DropReason::BufferFull), 0);
    let lines = es.search("unit-logs-*", json!({ "term": { "job_id": "job-1" } }));
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["service"], "unit-test");
    assert_eq!(lines[0]["trace_id"], "t-1");
    assert_eq!(
        es.count("unit-audit-*", json!({ "term": { "code": "none" } })),
        1
    );
    // The daily indices were made with the templates: ids are keywords.
    for index in ["unit-logs-*", "unit-audit-*"] {
        let (status, mapping) = es.request("GET", &format!("/{index}/_mapping"), None);
        assert_eq!(status, 200, "{mapping}");
        let (name, index) = mapping
            .as_object()
            .and_then(|m| m.iter().next())
            .expect("an index");
        // `<prefix>-<kind>-YYYY.MM.DD`
        let (_, day) = name.rsplit_once('-').expect("a dated index");
        assert!(
            day.len() == 10 && day.chars().all(|c| c.is_ascii_digit() || c == '.'),
            "{name}"
        );
        assert_eq!(
            index["mappings"]["properties"]["job_id"]["type"], "keyword",
            "{mapping}"
        );
    }
}
