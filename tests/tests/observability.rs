//! What ships in `ops/observability/`, checked with the real tools: `promtool` accepts the alert
//! rules and the scrape configuration, and its rule unit tests pass; a real Prometheus scraping
//! a local fleet (nats-server, a dispatcher, a worker on the real model) counts exactly the jobs
//! sent, evaluates every alert rule and every dashboard query without error, and every metric
//! name the dashboard and the rules use is one the processes export.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use async_nats::HeaderMap;
use fleet_client::Tenant;
use fleet_schemas::{ErrorCode, ResultStatus, SigningKey};
use fleet_tests::{
    NatsServer, Signal, Streams, TestTenant, binary,
    http::{Serving, get, wait_ready_status},
    model_dir,
    prometheus::{Prometheus, ScrapeJob, promtool},
    write_tenants_file,
};
use serde_json::Value;

const MODEL: &str = "all-minilm-l6-v2";
/// Jobs sent through the fleet, two texts each.
const JOBS: usize = 20;
const WAIT: Duration = Duration::from_secs(120);
/// How long Prometheus may take to see a change: scrapes every second, the worker reads the
/// queue's state every second here.
const SCRAPED: Duration = Duration::from_secs(30);

fn observability() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/observability")
}

fn alert_rules() -> PathBuf {
    observability().join("fleet-alerts.yml")
}

fn dashboard() -> PathBuf {
    observability().join("grafana/fleet-dashboard.json")
}

/// Runs promtool with `args` in `ops/observability/`; panics with its output unless it
/// succeeds. Returns its standard output.
fn run_promtool(args: &[&str]) -> String {
    let output = Command::new(promtool())
        .args(args)
        .current_dir(observability())
        .output()
        .expect("promtool runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "promtool {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn promtool_accepts_the_shipped_alert_rules_and_scrape_config() {
    let rules = run_promtool(&["check", "rules", "fleet-alerts.yml"]);
    assert!(rules.contains("SUCCESS"), "{rules}");
    // The scrape configuration names the rule file, so this checks it loads from there too.
    let config = run_promtool(&["check", "config", "prometheus.yml"]);
    assert!(config.contains("SUCCESS: 1 rule files found"), "{config}");
}

#[test]
fn promtool_unit_tests_show_the_alerts_firing_and_staying_quiet() {
    let test_file = std::fs::read_to_string(observability().join("fleet-alerts.test.yml"))
        .expect("the rules' unit tests");
    // At least these two are tested both ways (a firing case and a quiet one).
    for alert in ["FleetConsumerLagGrowing", "FleetNoReadyWorker"] {
        let cases: Vec<&str> = test_file
            .split("- eval_time:")
            .skip(1)
            .filter(|case| case.contains(&format!("alertname: {alert}\n")))
            .collect();
        assert!(
            cases.iter().any(|case| case.contains("exp_alerts: []")),
            "no case where {alert} stays quiet"
        );
        assert!(
            cases.iter().any(|case| case.contains("exp_labels:")),
            "no case where {alert} fires"
        );
    }
    let output = run_promtool(&["test", "rules", "fleet-alerts.test.yml"]);
    assert!(output.contains("SUCCESS"), "{output}");
}

/// Every metric name a Fleet process's `/metrics` (OpenMetrics text) exposes, as PromQL names
/// it: each sample's name, and for each family (`# TYPE`) the names its type gives
/// (`_total`; `_bucket`, `_sum`, `_count`), so a family counts even before its first sample
/// when the endpoint lists it. The second set: the families' own names, as prose names them.
fn exported_names(metrics: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut names = BTreeSet::new();
    let mut families = BTreeSet::new();
    for line in metrics.lines() {
        if let Some(family) = line.strip_prefix("# TYPE ") {
            let mut words = family.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            families.insert(name.to_owned());
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                "summary" => &["", "_sum", "_count"],
                "info" => &["_info"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|suffix| format!("{name}{suffix}")));
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_owned());
        }
    }
    (names, families)
}

/// The `fleet_*` metric names in a PromQL expression (or any text).
fn fleet_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let is_name = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_';
    let mut at = 0;
    while let Some(found) = text[at..].find("fleet_") {
        let start = at + found;
        let mut end = start + "fleet_".len();
        while end < bytes.len() && is_name(bytes[end]) {
            end += 1;
        }
        let starts_a_word = start == 0 || !(is_name(bytes[start - 1]) || bytes[start - 1] == b':');
        if starts_a_word {
            names.insert(text[start..end].to_owned());
        }
        at = end;
    }
    names
}

/// The PromQL of the dashboard: every panel target's `expr`, and the template variables'
/// queries (Grafana's `label_values(...)`) apart.
fn dashboard_queries() -> (Vec<String>, Vec<String>) {
    fn walk(value: &Value, exprs: &mut Vec<String>, variables: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", Value::String(expr)) => exprs.push(expr.clone()),
                        ("query" | "definition", Value::String(query))
                            if query.contains("fleet_") =>
                        {
                            variables.push(query.clone())
                        }
                        _ => walk(value, exprs, variables),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|item| walk(item, exprs, variables)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(dashboard()).expect("the Grafana dashboard");
    let json: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let (mut exprs, mut variables) = (Vec::new(), Vec::new());
    walk(&json, &mut exprs, &mut variables);
    (exprs, variables)
}

/// The rules file without its comments (a pending rule is described in one).
fn alert_rules_text() -> String {
    std::fs::read_to_string(alert_rules())
        .expect("the alert rules")
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scraping_a_local_fleet_counts_the_jobs_sent_and_knows_every_metric_used() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().expect("temporary directory");
    let tenants = write_tenants_file(dir.path(), &["acme"]);

    let mut command = Command::new(binary("dispatcher"));
    command
        .args(["--nats-url", nats.url(), "--tenants"])
        .arg(&tenants)
        .args(["--name", "d-observability", "--metrics-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,fleet_service::http=info")
        .env_remove("FLEET_CONFIG");
    let dispatcher = Serving::spawn("dispatcher", command, WAIT);
    let mut command = Command::new(binary("worker"));
    command
        .args(["--nats-url", nats.url(), "--tenants"])
        .arg(&tenants)
        .arg("--model-dir")
        .arg(model_dir())
        .args([
            "--worker-name",
            "w-observability",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .args(["--queue-metrics-every", "1s"])
        .env("RUST_LOG", "warn,fleet_service::http=info")
        .env_remove("FLEET_CONFIG");
    let mut worker = Serving::spawn("worker", command, WAIT);
    wait_ready_status(dispatcher.addr, 200, WAIT).await;
    wait_ready_status(worker.addr, 200, WAIT).await;

    // The job names of ops/observability/prometheus.yml, which the rules rely on.
    let rules = alert_rules();
    let prometheus = Prometheus::start_with_rules(
        &[
            ScrapeJob {
                name: "fleet-dispatcher",
                targets: &[dispatcher.addr],
            },
            ScrapeJob {
                name: "fleet-worker",
                targets: &[worker.addr],
            },
        ],
        &[&rules],
    );
    prometheus.wait_targets_up(2, SCRAPED).await;

    // The workload: JOBS jobs embedded, one refused by the dispatcher (signed with another key),
    // one unreadable job put on the queue behind the dispatcher's back (dead-lettered).
    let client = nats.tenant_client("acme").await;
    let tenant = Tenant {
        name: "acme".into(),
        key: TestTenant::new("acme").key,
    };
    let calls = (0..JOBS).map(|i| {
        let job = tenant.embed_job(MODEL, vec![format!("job {i}"), "a second text".into()]);
        let (client, tenant) = (client.clone(), &tenant);
        async move { fleet_client::infer(&client, tenant, &job, WAIT).await }
    });
    for result in futures::future::join_all(calls).await {
        let result = result.expect("an answer");
        assert_eq!(result.status, ResultStatus::Ok, "{result:?}");
    }
    let forger = Tenant {
        name: "acme".into(),
        key: SigningKey::from_secret_bytes(tenant.key.key_id.clone(), &[7; 32]),
    };
    let forged = forger.embed_job(MODEL, vec!["forged".into()]);
    let refused = fleet_client::infer(&client, &forger, &forged, WAIT)
        .await
        .expect("an answer");
    assert_eq!(refused.status, ResultStatus::Rejected, "{refused:?}");
    assert_eq!(
        refused.error.as_ref().map(|e| e.code),
        Some(ErrorCode::BadSignature)
    );
    let streams = Streams::connect(&nats).await;
    streams
        .enqueue_raw(MODEL, b"not a job".to_vec(), HeaderMap::new())
        .await;
    streams.wait_queue_empty(WAIT).await;

    // Jobs sent equal jobs counted, as Prometheus sees them.
    let jobs = JOBS as f64;
    let expected = [
        (r#"sum(fleet_worker_jobs_total{outcome="ok"})"#, jobs),
        (
            r#"sum(fleet_worker_jobs_total{outcome="dead_lettered"})"#,
            1.0,
        ),
        ("sum(fleet_worker_jobs_total)", jobs + 1.0),
        (r#"sum(fleet_worker_job_seconds_count{outcome="ok"})"#, jobs),
        ("sum(fleet_worker_queue_wait_seconds_count)", jobs),
        ("sum(fleet_worker_batch_inputs_sum)", 2.0 * jobs),
        (
            r#"sum(fleet_worker_dead_letters_total{reason="unreadable"})"#,
            1.0,
        ),
        ("sum(fleet_dispatcher_jobs_accepted_total)", jobs),
        (
            r#"sum(fleet_dispatcher_requests_total{outcome="accepted"})"#,
            jobs,
        ),
        (
            r#"sum(fleet_dispatcher_requests_total{outcome="rejected"})"#,
            1.0,
        ),
        (
            r#"sum(fleet_dispatcher_jobs_rejected_total{code="bad_signature"})"#,
            1.0,
        ),
        ("sum(fleet_dispatcher_requests_total)", jobs + 1.0),
        (
            r#"max(fleet_queue_consumer_lag{model="all-minilm-l6-v2"})"#,
            0.0,
        ),
        (
            r#"max(fleet_queue_stream_messages{stream="FLEET_DLQ"})"#,
            1.0,
        ),
        (
            r#"max(fleet_queue_stream_messages{stream="FLEET_RESULTS"})"#,
            jobs,
        ),
        ("sum(fleet_worker_ready)", 1.0),
    ];
    for (promql, value) in expected {
        prometheus.wait_value(promql, value, SCRAPED).await;
    }
    // And they stay so (nothing counted twice by a later scrape or a late ack).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (promql, value) in expected {
        assert_eq!(prometheus.query_value(promql), Some(value), "{promql}");
    }

    // Every metric the dashboard's queries and the alert rules' expressions name is exported
    // by a process of this fleet (the expressions as Prometheus loaded them from the file).
    let (mut exported, mut families) = exported_names(&get(dispatcher.addr, "/metrics").await.body);
    let (names, more_families) = exported_names(&get(worker.addr, "/metrics").await.body);
    exported.extend(names);
    families.extend(more_families);
    let (exprs, variables) = dashboard_queries();
    assert!(
        exprs.len() >= 30,
        "only {} dashboard queries found",
        exprs.len()
    );
    assert!(!variables.is_empty(), "the per-worker rows' variable");
    let groups = prometheus.api("/api/v1/rules?type=alert");
    let rules: Vec<Value> = groups["groups"]
        .as_array()
        .expect("rule groups")
        .iter()
        .flat_map(|group| group["rules"].as_array().expect("rules").clone())
        .collect();
    let rules_text = alert_rules_text();
    assert_eq!(rules.len(), rules_text.matches("- alert:").count());
    let mut used: Vec<(String, String)> = Vec::new();
    for text in exprs.iter().chain(&variables) {
        used.extend(
            fleet_names(text)
                .into_iter()
                .map(|name| (name, "dashboard".into())),
        );
    }
    for rule in &rules {
        let query = rule["query"].as_str().expect("a rule's query");
        let from = format!("alert {}", rule["name"]);
        used.extend(
            fleet_names(query)
                .into_iter()
                .map(|name| (name, from.clone())),
        );
    }
    assert!(used.iter().any(|(_, from)| from.starts_with("alert")));
    let missing: Vec<_> = used
        .iter()
        .filter(|(name, _)| !exported.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "metric names used but not exported: {missing:?}\nexported: {exported:?}"
    );
    // The rules' descriptions name metrics too (a histogram by its family's name).
    let named: Vec<String> = fleet_names(&rules_text)
        .into_iter()
        .filter(|name| !exported.contains(name) && !families.contains(name))
        .collect();
    assert!(
        named.is_empty(),
        "the alert rules name unknown metrics: {named:?}"
    );

    // Every dashboard query is PromQL that Prometheus evaluates (Grafana's variables filled in).
    for expr in &exprs {
        let promql = expr
            .replace("$__rate_interval", "1m")
            .replace("$instance", ".*");
        prometheus.query(&promql);
    }

    // Every alert rule has been evaluated on the live series without error, and none fires.
    for rule in &rules {
        assert_eq!(rule["health"], "ok", "{rule:#}");
        // The dead letter made FLEET_DLQ grow: pending, firing only if it went on for 10 min.
        let state = match rule["name"].as_str() {
            Some("FleetDeadLettersGrowing") => "pending",
            _ => "inactive",
        };
        assert_eq!(rule["state"], state, "{rule:#}");
    }

    // The worker gone: its model has no ready worker, and the rule sees it on the real labels.
    worker.process.signal(Signal::SIGKILL);
    worker.process.wait_exit(WAIT);
    prometheus
        .wait_value(
            r#"count(ALERTS{alertname="FleetNoReadyWorker", alertstate="pending", model="all-minilm-l6-v2"})"#,
            1.0,
            SCRAPED,
        )
        .await;
    prometheus
        .wait_value(r#"sum(up{job="fleet-worker"})"#, 0.0, SCRAPED)
        .await;
}
