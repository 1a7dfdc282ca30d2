//! Logs and audit events shipped to an Elasticsearch-API server (`osmem-server`) by the real
//! `dispatcher`, `worker` and `fleet` processes: a job's lines are found by its id with the
//! client's trace id; every admission (accepted or refused, with its code), dead letter and
//! tenant change is an audit event in its own index; with the server down for
//! [`OUTAGE`] jobs keep flowing, memory stays bounded, dropped lines are counted, and shipping
//! resumes when it is back.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fleet_client::{Tenant, TraceParent};
use fleet_schemas::{ErrorCode, ResultStatus, Task};
use fleet_tests::{
    NatsServer, TestTenant, binary, elasticsearch::Elasticsearch, eventually, http::Serving,
    model_dir, openmetrics::Scrape, write_tenants_file,
};
use serde_json::{Value, json};

const MODEL: &str = "all-minilm-l6-v2";
/// The worker loads the real model, on a machine busy with other tests.
const STARTUP: Duration = Duration::from_secs(180);
const WAIT: Duration = Duration::from_secs(30);
/// How long the server is down in the outage test (what the issue asks).
const OUTAGE: Duration = Duration::from_secs(30);
/// Job lines at debug (several per job), the rest at info; where HTTP is served, for Serving.
const RUST_LOG: &str = "info,fleet_dispatcher=debug,fleet_worker=debug";
/// The outage test's buffer: small, so the outage overflows it.
const OUTAGE_BUFFER_LINES: u64 = 500;

/// A dispatcher and a worker on a fresh NATS, shipping to `es`, with the worker's model loaded.
struct Fleet {
    _nats: NatsServer,
    dir: tempfile::TempDir,
    dispatcher: Serving,
    worker: Serving,
    tenant: Tenant,
    client: async_nats::Client,
}

impl Fleet {
    async fn start(es: &Elasticsearch, env: &[(&str, &str)]) -> Fleet {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let tenants = write_tenants_file(dir.path(), &["demo"]);
        let process = |name: &str, extra: &[&std::ffi::OsStr]| {
            let mut command = Command::new(binary(name));
            command
                .args(["--nats-url", nats.url(), "--tenants"])
                .arg(&tenants)
                .args(["--metrics-addr", "127.0.0.1:0"])
                .args(extra)
                .env("RUST_LOG", RUST_LOG)
                .env("FLEET_LOG_ES_URL", es.url())
                .env("FLEET_LOG_ES_FLUSH_INTERVAL", "200ms")
                .envs(env.iter().copied())
                .env_remove("FLEET_CONFIG");
            Serving::spawn(name, command, WAIT)
        };
        let dispatcher = process("dispatcher", &[]);
        let model = model_dir();
        let worker = process("worker", &["--model-dir".as_ref(), model.as_os_str()]);
        let demo = TestTenant::new("demo");
        let tenant = Tenant {
            name: demo.name,
            key: demo.key,
        };
        let client = nats.tenant_client(&tenant.name).await;
        let fleet = Fleet {
            _nats: nats,
            dir,
            dispatcher,
            worker,
            tenant,
            client,
        };
        eventually(STARTUP, "a first answer", || async {
            let result = fleet.infer(vec!["warm up".into()]).await;
            result.filter(|r| r.status == ResultStatus::Ok)
        })
        .await;
        fleet
    }

    async fn infer(&self, texts: Vec<String>) -> Option<fleet_schemas::JobResult> {
        let job = self.tenant.embed_job(MODEL, texts);
        fleet_client::infer(&self.client, &self.tenant, &job, Duration::from_secs(10))
            .await
            .ok()
    }
}

/// The one document in `indices` matching every term of `terms`, once it has been shipped.
async fn shipped_one(es: &Elasticsearch, indices: &str, terms: Value) -> Value {
    let filter: Vec<Value> = terms
        .as_object()
        .expect("terms")
        .iter()
        .map(|(field, value)| json!({ "term": { field: value } }))
        .collect();
    let query = json!({ "bool": { "filter": filter } });
    let docs = eventually(WAIT, &format!("{terms} in {indices}"), || {
        let docs = es.search(indices, query.clone());
        async move { (!docs.is_empty()).then_some(docs) }
    })
    .await;
    assert_eq!(docs.len(), 1, "{terms}: {docs:?}");
    docs.into_iter().next().expect("one document")
}

fn term_job(job_id: &str) -> Value {
    json!({ "term": { "job_id": job_id } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_lines_and_audit_events_are_found_by_job_id_with_the_clients_trace() {
    let es = Elasticsearch::start();
    let fleet = Fleet::start(&es, &[]).await;
    let tenant = &fleet.tenant;

    // A job in a known trace: its lines in both processes, found by its id, share the trace.
    let trace = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .expect("a valid traceparent");
    let job = tenant.embed_job(MODEL, vec!["a shipped secret text".into()]);
    let result = fleet_client::infer_in_trace(&fleet.client, tenant, &job, WAIT, &trace)
        .await
        .expect("an answer");
    assert_eq!(result.status, ResultStatus::Ok, "{result:?}");
    let lines = eventually(WAIT, "the job's lines from both processes", || {
        let lines = es.search("fleet-logs-*", term_job(&job.job_id));
        let said = |service: &str, message: &str| {
            lines
                .iter()
                .any(|l| l["service"] == service && l["message"] == message)
        };
        let both = said("dispatcher", "job queued") && said("worker", "result stored");
        async move { both.then_some(lines) }
    })
    .await;
    for line in &lines {
        assert_eq!(line["trace_id"], trace.trace_id(), "{line}");
        assert_eq!(line["tenant"], "demo", "{line}");
        assert_eq!(line["span"]["job_id"], job.job_id.as_str(), "{line}");
    }

    // Its admission, audited with its ids and no payload.
    let admitted = shipped_one(
        &es,
        "fleet-audit-*",
        json!({ "job_id": job.job_id, "action": "admission" }),
    )
    .await;
    assert_eq!(admitted["outcome"], "accepted", "{admitted}");
    assert_eq!(admitted["service"], "dispatcher", "{admitted}");
    assert_eq!(admitted["tenant"], "demo", "{admitted}");
    assert_eq!(admitted["model"], MODEL, "{admitted}");
    assert_eq!(admitted["key_id"], tenant.key.key_id.as_str(), "{admitted}");
    assert_eq!(admitted["trace_id"], trace.trace_id(), "{admitted}");
    assert!(!admitted.to_string().contains("secret text"), "{admitted}");

    // A refusal with the job's id (too old) and one before the job can be read (a key the
    // dispatcher does not know): each audited with its code.
    let mut old = tenant.embed_job(MODEL, vec!["too old".into()]);
    old.created_at_ms -= 10 * 60 * 1000;
    let refused = fleet_client::infer(&fleet.client, tenant, &old, WAIT)
        .await
        .expect("an answer");
    assert_eq!(refused.status, ResultStatus::Rejected, "{refused:?}");
    let expired = shipped_one(
        &es,
        "fleet-audit-*",
        json!({ "job_id": old.job_id, "action": "admission" }),
    )
    .await;
    assert_eq!(expired["outcome"], "rejected", "{expired}");
    assert_eq!(expired["code"], ErrorCode::Expired.as_str(), "{expired}");
    assert_eq!(expired["tenant"], "demo", "{expired}");
    assert_eq!(expired["key_id"], tenant.key.key_id.as_str(), "{expired}");
    let stranger = TestTenant::new("stranger");
    let stranger = Tenant {
        name: stranger.name,
        key: stranger.key,
    };
    let stranger_job = stranger.embed_job(MODEL, vec!["who am I".into()]);
    let refused = fleet_client::infer(&fleet.client, &stranger, &stranger_job, WAIT)
        .await
        .expect("an answer");
    assert_eq!(refused.status, ResultStatus::Rejected, "{refused:?}");
    let unknown = shipped_one(
        &es,
        "fleet-audit-*",
        json!({ "action": "admission", "code": ErrorCode::UnknownKey.as_str() }),
    )
    .await;
    assert_eq!(unknown["outcome"], "rejected", "{unknown}");
    // The key it claimed, as the audit trail of a probe should say.
    assert_eq!(unknown["key_id"], stranger.key.key_id.as_str(), "{unknown}");

    // A dead letter: an input longer than the model takes, truncation refused.
    let mut long = tenant.embed_job(MODEL, vec![]);
    long.task = Task::Embed {
        inputs: vec!["word ".repeat(2000)],
        normalize: true,
        truncate: false,
    };
    let failed = fleet_client::infer(&fleet.client, tenant, &long, WAIT)
        .await
        .expect("an answer");
    assert_eq!(failed.status, ResultStatus::Failed, "{failed:?}");
    let dead = shipped_one(
        &es,
        "fleet-audit-*",
        json!({ "job_id": long.job_id, "action": "dead_letter" }),
    )
    .await;
    assert_eq!(dead["service"], "worker", "{dead}");
    assert_eq!(dead["tenant"], "demo", "{dead}");
    assert_eq!(dead["model"], MODEL, "{dead}");
    assert_eq!(dead["code"], ErrorCode::InputTooLong.as_str(), "{dead}");
    assert!(
        dead["reason"]
            .as_str()
            .is_some_and(|r| r.contains("tokens")),
        "{dead}"
    );
    assert!(!dead.to_string().contains("word word"), "{dead}");

    // A tenant added by `fleet tenant add`, a short command: its audit event is sent before it
    // exits.
    let tenants = fleet.dir.path().join("other-tenants.toml");
    let key = fleet.dir.path().join("newco-key.toml");
    let added = Command::new(binary("fleet"))
        .arg("tenant")
        .arg("--tenants")
        .arg(&tenants)
        .args(["add", "--tenant", "newco", "--out"])
        .arg(&key)
        .env("FLEET_LOG_ES_URL", es.url())
        .env_remove("RUST_LOG")
        .output()
        .expect("fleet runs");
    assert!(added.status.success(), "{added:?}");
    let change = shipped_one(
        &es,
        "fleet-audit-*",
        json!({ "action": "tenant_added", "tenant": "newco" }),
    )
    .await;
    assert_eq!(change["service"], "fleet", "{change}");
    assert_eq!(change["outcome"], "applied", "{change}");
    assert!(
        change["key_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("newco")),
        "{change}"
    );
    let secret = std::fs::read_to_string(&key).expect("the key file");
    let seed_line = secret
        .lines()
        .find(|l| l.contains("secret"))
        .unwrap_or(&secret);
    assert!(!change.to_string().contains(seed_line.trim()), "{change}");
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let process = procfs::process::Process::new(pid as i32).expect("the process is alive");
    process.status().expect("its status").vmrss.expect("VmRSS") * 1024
}

async fn scrape(serving: &Serving) -> Scrape {
    let answer = fleet_tests::http::get(serving.addr, "/metrics").await;
    Scrape::parse(answer.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_elasticsearch_down_jobs_keep_flowing_memory_stays_bounded_and_shipping_resumes() {
    let mut es = Elasticsearch::start();
    let buffer = OUTAGE_BUFFER_LINES.to_string();
    let fleet = Arc::new(Fleet::start(&es, &[("FLEET_LOG_ES_BUFFER_LINES", &buffer)]).await);

    // Callers keep sending, a few jobs at a time, counting the answers.
    let answered = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let (fleet, answered, done) = (fleet.clone(), answered.clone(), done.clone());
        callers.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let result = fleet.infer(vec!["keep flowing".into()]).await;
                if result.is_some_and(|r| r.status == ResultStatus::Ok) {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let pids = [fleet.dispatcher.process.pid(), fleet.worker.process.pid()];
    let phase = |answered: &AtomicU64, started: Instant, from: u64| {
        let jobs = answered.load(Ordering::Relaxed) - from;
        (jobs, jobs as f64 / started.elapsed().as_secs_f64())
    };

    // Before: shipping, and the jobs' rate.
    let started = Instant::now();
    let from = answered.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(15)).await;
    let (jobs_before, rate_before) = phase(&answered, started, from);
    let rss_before = pids.map(rss);
    let shipped_before = es.count("fleet-logs-*", json!({ "match_all": {} }));
    assert!(shipped_before > 0, "nothing shipped before the outage");

    // The outage.
    es.stop();
    let started = Instant::now();
    let from = answered.load(Ordering::Relaxed);
    let mut rss_peak = rss_before;
    while started.elapsed() < OUTAGE {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (peak, pid) in rss_peak.iter_mut().zip(pids) {
            *peak = (*peak).max(rss(pid));
        }
    }
    let (jobs_during, rate_during) = phase(&answered, started, from);
    let dropping = [scrape(&fleet.dispatcher).await, scrape(&fleet.worker).await];
    es.restart();
    done.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.await.expect("a caller");
    }
    println!(
        "before: {jobs_before} jobs ({rate_before:.1}/s), RSS {rss_before:?}; \
         outage of {OUTAGE:?}: {jobs_during} jobs ({rate_during:.1}/s), RSS peak {rss_peak:?}"
    );

    // Jobs kept flowing: the job path never waits on shipping.
    assert!(
        rate_during >= 0.5 * rate_before,
        "{rate_during:.1} jobs/s during the outage against {rate_before:.1} before"
    );
    // Memory stayed bounded: the buffer holds at most its capacity.
    for ((before, peak), name) in rss_before
        .iter()
        .zip(rss_peak)
        .zip(["dispatcher", "worker"])
    {
        assert!(
            peak < before + (64 << 20),
            "{name}: RSS {before} before, {peak} during the outage"
        );
    }
    for (metrics, name) in dropping.iter().zip(["dispatcher", "worker"]) {
        let dropped =
            metrics.value("fleet_log_shipping_lines_dropped_total{reason=\"buffer_full\"}");
        println!("{name}: {dropped} lines dropped (buffer_full) during the outage");
        assert!(dropped > 0.0, "{name} dropped nothing");
        let buffered = metrics.value("fleet_log_shipping_buffered_lines");
        assert!(
            buffered <= OUTAGE_BUFFER_LINES as f64,
            "{name}: {buffered} buffered"
        );
        let unreachable =
            metrics.value("fleet_log_shipping_bulk_failures_total{failure=\"unreachable\"}");
        assert!(unreachable > 0.0, "{name}: no failed request counted");
    }
    // ... and said so on stdout, in a summary line that is not itself shipped.
    let summary = fleet.dispatcher.log().into_iter().find(|line| {
        line.contains("\"target\":\"fleet_shipping\"") && line.contains("log lines dropped")
    });
    assert!(summary.is_some(), "no summary of dropped lines on stdout");

    // Shipping resumed: the restarted (empty) server receives new lines from both processes,
    // into indices made with the templates (ids are keywords: a term query finds them).
    fleet.infer(vec!["after the outage".into()]).await;
    for service in ["dispatcher", "worker"] {
        eventually(WAIT, &format!("{service}'s lines after the outage"), || {
            let found = es.count("fleet-logs-*", json!({ "term": { "service": service } }));
            async move { (found > 0).then_some(()) }
        })
        .await;
    }
    let (status, mapping) = es.request("GET", "/fleet-logs-*/_mapping", None);
    assert_eq!(status, 200, "{mapping}");
    let index = mapping
        .as_object()
        .and_then(|m| m.values().next())
        .expect("an index");
    assert_eq!(
        index["mappings"]["properties"]["job_id"]["type"], "keyword",
        "{mapping}"
    );
}
