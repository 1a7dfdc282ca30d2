//! `fleet submit` as an ETL pipeline uses it, against a real fleet (nats-server, dispatcher,
//! worker on the real model): one output row per input row in input order, vectors equal to
//! `infer`'s; killed twice and re-run, the same output as an uninterrupted run, nothing sent
//! again that was answered and no job queued twice; rows whose job fails land in the errors
//! file.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use fleet_schemas::SecretKeyFile;
use fleet_tests::{NatsServer, Process, Signal, Streams, TestTenant, model_dir};
use serde_json::Value;

const MODEL: &str = "all-minilm-l6-v2";
const ROWS: usize = 120;
const TEXTS_PER_JOB: usize = 8;

struct Fleet {
    nats: NatsServer,
    dir: tempfile::TempDir,
    key: PathBuf,
    _dispatcher: Process,
    _worker: Process,
}

impl Fleet {
    fn start() -> Fleet {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let tenants = fleet_tests::write_tenants_file(dir.path(), &["acme"]);
        let acme = TestTenant::new("acme");
        let key = dir.path().join("acme-key.toml");
        let file = SecretKeyFile {
            tenant: acme.name.clone(),
            key_id: acme.key.key_id.clone(),
            secret_key: acme.key.secret_hex(),
        };
        std::fs::write(&key, toml::to_string(&file).unwrap()).unwrap();
        let tenants = tenants.to_string_lossy().into_owned();
        let common = [
            "--nats-url",
            nats.url(),
            "--tenants",
            &tenants,
            "--metrics-addr",
            "127.0.0.1:0",
        ];
        let dispatcher = Process::spawn_binary("dispatcher", &common, &[("RUST_LOG", "warn")]);
        let model = model_dir().to_string_lossy().into_owned();
        let mut worker_args = common.to_vec();
        worker_args.extend(["--model-dir", &model]);
        let worker = Process::spawn_binary("worker", &worker_args, &[("RUST_LOG", "warn")]);
        Fleet {
            nats,
            dir,
            key,
            _dispatcher: dispatcher,
            _worker: worker,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `fleet submit` from `input` to `output`, started (not waited for).
    fn submit(&self, input: &Path, output: &Path) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_fleet"))
            .args(["submit", "--nats-url", self.nats.url(), "--key"])
            .arg(&self.key)
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(output)
            .args(["--texts-per-job", &TEXTS_PER_JOB.to_string()])
            .args(["--in-flight", "4", "--job-timeout", "20s"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn submit_to_end(&self, input: &Path, output: &Path) -> (Output, Value) {
        let done = self.submit(input, output).wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr);
        let summary = stderr
            .lines()
            .find_map(|line| serde_json::from_str::<Value>(line).ok())
            .unwrap_or_else(|| panic!("no summary: {stderr}"));
        (done, summary)
    }
}

fn texts() -> Vec<String> {
    (0..ROWS)
        .map(|i| format!("Row {i} of an ETL batch: sentence number {i} about embeddings."))
        .collect()
}

/// An input file whose row ids are `<prefix>-<n>`.
fn write_input(path: &Path, prefix: &str, texts: &[String]) {
    let lines: String = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            format!(
                "{}\n",
                serde_json::json!({"id": format!("{prefix}-{i}"), "text": text})
            )
        })
        .collect();
    std::fs::write(path, lines).unwrap();
}

fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |text| text.lines().count())
}

fn vector(row: &Value) -> Vec<f64> {
    row["vector"]
        .as_array()
        .unwrap_or_else(|| panic!("no vector: {row}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_rows_come_back_in_order_and_a_killed_run_resumes_to_the_same_output() {
    let fleet = Fleet::start();
    let texts = texts();

    // Uninterrupted: one row per input row, in order, each a 384-dimension vector equal to
    // what `infer` gives for its text.
    let (input_a, output_a) = (fleet.path("a.jsonl"), fleet.path("a.out.jsonl"));
    write_input(&input_a, "a", &texts);
    let (done, summary) = fleet.submit_to_end(&input_a, &output_a);
    assert_eq!(done.status.code(), Some(0), "{done:?}");
    assert_eq!(summary["rows_ok"], ROWS, "{summary}");
    let a = rows(&output_a);
    assert_eq!(a.len(), ROWS);
    for (i, row) in a.iter().enumerate() {
        assert_eq!(row["id"], format!("a-{i}"));
        assert_eq!(row["status"], "ok");
        assert_eq!(vector(row).len(), 384);
    }
    let client = fleet.nats.tenant_client("acme").await;
    let tenant = fleet_client::Tenant::from_key_file(&fleet.key).unwrap();
    let job = tenant.embed_job(MODEL, vec![texts[17].clone()]);
    let alone = fleet_client::infer(&client, &tenant, &job, Duration::from_secs(30))
        .await
        .unwrap();
    let Some(fleet_schemas::Output::Embeddings { vectors, .. }) = alone.output else {
        panic!("{alone:?}");
    };
    let diff = vector(&a[17])
        .iter()
        .zip(&vectors[0])
        .map(|(x, y)| (x - f64::from(*y)).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-5, "submit and infer differ by {diff}");

    // Killed twice part way, then run to the end.
    let streams = Streams::connect(&fleet.nats).await;
    let queued_before = streams
        .stream("FLEET_JOBS")
        .await
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    let (input_b, output_b) = (fleet.path("b.jsonl"), fleet.path("b.out.jsonl"));
    write_input(&input_b, "b", &texts);
    for at_least in [TEXTS_PER_JOB, ROWS / 2] {
        let mut run = Process::adopt("fleet submit", fleet.submit(&input_b, &output_b));
        fleet_tests::eventually(Duration::from_secs(60), "rows written", || async {
            (lines_in(&output_b) >= at_least).then_some(())
        })
        .await;
        run.signal(Signal::SIGKILL);
        run.wait_exit(Duration::from_secs(10));
    }
    assert!(
        lines_in(&output_b) < ROWS,
        "the kills came too late to test a resume"
    );
    let (done, _) = fleet.submit_to_end(&input_b, &output_b);
    assert_eq!(done.status.code(), Some(0), "{done:?}");
    let queued = streams
        .stream("FLEET_JOBS")
        .await
        .info()
        .await
        .unwrap()
        .state
        .last_sequence
        - queued_before;
    assert_eq!(
        queued,
        (ROWS / TEXTS_PER_JOB) as u64,
        "jobs queued for {ROWS} rows"
    );

    // An uninterrupted run of the same input: the same output, all of it from the store.
    let output_c = fleet.path("c.out.jsonl");
    let (done, summary) = fleet.submit_to_end(&input_b, &output_c);
    assert_eq!(done.status.code(), Some(0), "{done:?}");
    assert_eq!(summary["jobs_sent"], 0, "{summary}");
    assert_eq!(
        std::fs::read(&output_b).unwrap(),
        std::fs::read(&output_c).unwrap(),
        "a resumed run's output differs from an uninterrupted one's"
    );
    for (b, a) in rows(&output_b).iter().zip(&a) {
        let diff = vector(b)
            .iter()
            .zip(vector(a))
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(diff < 1e-5, "{} and {} differ by {diff}", b["id"], a["id"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_job_that_fails_go_to_the_errors_file_and_the_exit_status_says_so() {
    let fleet = Fleet::start();
    let mut texts: Vec<String> = texts().into_iter().take(2 * TEXTS_PER_JOB).collect();
    // Over the dispatcher's 32 KiB per text: the whole second job is refused `too_large`.
    texts[TEXTS_PER_JOB + 3] = "x".repeat(40 << 10);
    let (input, output) = (fleet.path("in.jsonl"), fleet.path("out.jsonl"));
    write_input(&input, "r", &texts);
    let (done, summary) = fleet.submit_to_end(&input, &output);
    assert_eq!(done.status.code(), Some(4), "{done:?}");
    assert_eq!(summary["rows_ok"], TEXTS_PER_JOB, "{summary}");
    let all = rows(&output);
    assert_eq!(all.len(), 2 * TEXTS_PER_JOB);
    let errors = rows(&PathBuf::from(format!("{}.errors", output.display())));
    assert_eq!(errors.len(), TEXTS_PER_JOB);
    for (i, row) in errors.iter().enumerate() {
        assert_eq!(row["id"], format!("r-{}", TEXTS_PER_JOB + i));
        assert_eq!(row["code"], "too_large", "{row}");
    }
    // Bad input is refused with its line, and nothing is written for it.
    std::fs::write(&input, "{\"id\": 1, \"text\": \"fine\"}\nnot json\n").unwrap();
    let bad_output = fleet.path("bad.jsonl");
    let done = fleet
        .submit(&input, &bad_output)
        .wait_with_output()
        .unwrap();
    assert_eq!(done.status.code(), Some(1), "{done:?}");
    assert!(
        String::from_utf8_lossy(&done.stderr).contains("input line 2"),
        "{done:?}"
    );
    assert_eq!(lines_in(&bad_output), 0);
}
