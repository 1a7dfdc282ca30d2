//! `loadtest sweep` against a stand-in fleet of known capacity (two jobs at a time, 40 ms
//! each: 50 answers a second): the rate steps up until the fleet falls behind, the knee is the
//! last rate it kept up with, and the report folder holds the JSON, the Markdown page and the
//! plots.

mod support;

use std::time::Duration;

use fleet_tests::NatsServer;
use serde_json::Value;
use support::{StandIn, loadtest, stand_in};

/// The load each step of a sweep's report offered, in order.
fn offered_loads(report: &Value) -> Vec<f64> {
    let steps = report["steps"]
        .as_array()
        .expect("a sweep report has steps");
    steps
        .iter()
        .map(|step| step["offered"].as_f64().expect("a step's offered load"))
        .collect()
}

/// A broker with a stand-in fleet that answers two requests at a time, 40 ms each.
async fn fifty_answers_a_second() -> NatsServer {
    let nats = NatsServer::start();
    stand_in(
        nats.client().await,
        StandIn {
            answer_after: Duration::from_millis(40),
            capacity: 2,
            refuse_every: None,
        },
    )
    .await;
    nats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_finds_the_knee_and_writes_its_report() {
    let nats = fifty_answers_a_second().await;
    let dir = tempfile::tempdir().unwrap();
    let report_dir = dir.path().join("report");
    // 10, 20, 40 requests/s are within the stand-in's 50; 80 is not: its backlog grows by
    // 30 a second, 0.6 s of waiting by the step's end.
    let printed = loadtest(
        &nats,
        dir.path(),
        &[
            "sweep",
            "--start",
            "10",
            "--factor",
            "2",
            "--step-duration",
            "1s",
            "--max-p99",
            "300ms",
            "--report-dir",
            report_dir.to_str().unwrap(),
        ],
    );
    let text = std::fs::read_to_string(report_dir.join("report.json")).unwrap();
    let report: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(report, printed);
    assert_eq!(report["bench"], "sweep");
    let offered = offered_loads(&report);
    assert_eq!(offered, [10.0, 20.0, 40.0, 80.0], "{report}");
    assert_eq!(report["knee"]["offered"], 40.0, "{report}");
    assert_eq!(report["knee"]["meets_bounds"], true);
    let last = &report["steps"][3];
    assert_eq!(last["meets_bounds"], false, "{report}");
    assert!(
        last["latency_ms"]["p99"].as_f64().unwrap() > 300.0,
        "{report}"
    );
    for field in ["bounds", "stop_reason", "timeline", "workload"] {
        assert!(!report[field].is_null(), "no {field}: {report}");
    }

    let page = std::fs::read_to_string(report_dir.join("report.md")).unwrap();
    assert!(page.contains("**Knee: 40.0 requests/s**"), "{page}");
    for svg in [
        "latency_over_time.svg",
        "throughput_over_time.svg",
        "latency_vs_load.svg",
    ] {
        assert!(
            page.contains(&format!("]({svg})")),
            "{page} does not show {svg}"
        );
        let text = std::fs::read_to_string(report_dir.join(svg)).unwrap();
        let document = roxmltree::Document::parse(&text).unwrap_or_else(|e| panic!("{svg}: {e}"));
        assert_eq!(document.root_element().tag_name().name(), "svg", "{svg}");
        // Each line of data is a polyline through its points (a legend's sample has two).
        let lines = document
            .descendants()
            .filter(|node| node.has_tag_name("polyline"))
            .filter_map(|node| node.attribute("points"))
            .filter(|points| points.split_whitespace().count() >= 3)
            .count();
        assert!(
            lines >= 2,
            "{svg} plots fewer than two lines of data:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_loop_sweep_stops_where_more_requests_in_flight_no_longer_add_throughput() {
    let nats = fifty_answers_a_second().await;
    let dir = tempfile::tempdir().unwrap();
    // 1 and 2 in flight each get a server of their own (25, then 50 answers/s); 4 in flight
    // queue behind the stand-in's two: still 50/s where Little's law at the previous latency
    // says 100, well under the 0.8 of it the bound asks. No step comes near the p99 bound.
    let report = loadtest(
        &nats,
        dir.path(),
        &[
            "sweep",
            "--loop",
            "closed",
            "--start",
            "1",
            "--factor",
            "2",
            "--step-duration",
            "1s",
            "--max-p99",
            "1s",
            "--min-follow",
            "0.8",
        ],
    );
    assert_eq!(report["loop"], "closed", "{report}");
    assert_eq!(report["offered_unit"], "requests in flight");
    let offered = offered_loads(&report);
    assert_eq!(offered, [1.0, 2.0, 4.0], "{report}");
    assert_eq!(report["knee"]["offered"], 2.0, "{report}");
    let stop = report["stop_reason"].as_str().unwrap();
    assert!(
        stop.starts_with("step 2 (4)") && stop.contains("in flight would carry"),
        "{stop}"
    );
    assert!(!stop.contains("p99"), "{stop}");
}
