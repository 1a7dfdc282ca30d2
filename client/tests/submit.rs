//! `fleet submit` as an ETL pipeline uses it, against a real fleet (nats-server, dispatcher,
//! worker on the real model): one output row per input row in input order, vectors equal to
//! `infer`'s; killed twice at random points and re-run, the same output as an uninterrupted run, nothing sent
//! again that was answered and no job queued twice, in JSON lines and in Parquet (whose
//! vectors equal the JSON-lines path's); rows whose job fails land in the errors file. The
//! library under it: `submit_many` in order and resumed from a whole job, and `infer_retrying`
//! through `rate_limited` refusals under one job id.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use std::sync::Arc;

use arrow_array::{Array, RecordBatch, StringArray, cast::AsArray, types::Float32Type};
use arrow_schema::{DataType, Field, Schema};
use fleet_client::{
    RetryPolicy, Tenant,
    bulk::{BulkError, BulkOptions, JobDone, Row, submit_many},
    infer_retrying,
};
use fleet_schemas::{ErrorCode, ResultStatus, SecretKeyFile, SubmitStatus};
use fleet_tests::{NatsServer, Process, Signal, Streams, TestTenant, model_dir};
use futures::{StreamExt, stream};
use parquet::arrow::{ArrowWriter, arrow_reader::ParquetRecordBatchReaderBuilder};
use rand::Rng;
use serde_json::Value;

const MODEL: &str = "all-minilm-l6-v2";
const ROWS: usize = 120;
/// Rows of the test that kills and resumes a run: a few thousand, as an ETL batch.
const BULK_ROWS: usize = 2000;
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
        Fleet::start_with(&TestTenant::new("acme").tenants_entry())
    }

    /// A fleet whose tenants file is `tenants` (acme's key, under whatever policy it says).
    fn start_with(tenants: &str) -> Fleet {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir().unwrap();
        let tenants_path = dir.path().join("tenants.toml");
        std::fs::write(&tenants_path, tenants).unwrap();
        let tenants = tenants_path;
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
        self.submit_with(input, output, &[])
    }

    /// [`Fleet::submit`] with more arguments.
    fn submit_with(&self, input: &Path, output: &Path, more: &[&str]) -> std::process::Child {
        self.command(input, output, more).spawn().unwrap()
    }

    /// `fleet submit` from `input` to `output` (either may be `-`), its output piped.
    fn command(&self, input: &Path, output: &Path, more: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fleet"));
        command
            .args(["submit", "--nats-url", self.nats.url(), "--key"])
            .arg(&self.key)
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(output)
            .args(["--texts-per-job", &TEXTS_PER_JOB.to_string()])
            .args(["--in-flight", "4", "--job-timeout", "20s"])
            .args(more)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    }

    /// Runs `fleet submit` and kills it (SIGKILL) once `written()` says it has written enough.
    async fn kill_once(
        &self,
        input: &Path,
        output: &Path,
        more: &[&str],
        written: impl Fn() -> bool,
    ) {
        let mut run = Process::adopt("fleet submit", self.submit_with(input, output, more));
        fleet_tests::eventually(Duration::from_secs(60), "output written", || async {
            written().then_some(())
        })
        .await;
        run.signal(Signal::SIGKILL);
        run.wait_exit(Duration::from_secs(10));
    }

    /// Jobs ever queued on FLEET_JOBS: its last sequence.
    async fn jobs_queued(&self) -> u64 {
        let streams = Streams::connect(&self.nats).await;
        let mut jobs = streams.stream("FLEET_JOBS").await;
        jobs.info().await.unwrap().state.last_sequence
    }

    fn submit_to_end(&self, input: &Path, output: &Path) -> (Output, Value) {
        self.submit_to_end_with(input, output, &[])
    }

    fn submit_to_end_with(&self, input: &Path, output: &Path, more: &[&str]) -> (Output, Value) {
        let done = self
            .submit_with(input, output, more)
            .wait_with_output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&done.stderr);
        let summary = stderr
            .lines()
            .find_map(|line| serde_json::from_str::<Value>(line).ok())
            .unwrap_or_else(|| panic!("no summary: {stderr}"));
        (done, summary)
    }
}

fn texts() -> Vec<String> {
    texts_of(ROWS)
}

fn texts_of(rows: usize) -> Vec<String> {
    (0..rows)
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
    let texts = texts_of(BULK_ROWS);

    // Uninterrupted: one row per input row, in order, each a 384-dimension vector equal to
    // what `infer` gives for its text.
    let (input_a, output_a) = (fleet.path("a.jsonl"), fleet.path("a.out.jsonl"));
    write_input(&input_a, "a", &texts);
    let (done, summary) = fleet.submit_to_end(&input_a, &output_a);
    assert_eq!(done.status.code(), Some(0), "{done:?}");
    assert_eq!(summary["rows_ok"], BULK_ROWS, "{summary}");
    let a = rows(&output_a);
    assert_eq!(a.len(), BULK_ROWS);
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

    // Killed twice at random points (one in each third of the rows), then run to the end.
    let queued_before = fleet.jobs_queued().await;
    let (input_b, output_b) = (fleet.path("b.jsonl"), fleet.path("b.out.jsonl"));
    write_input(&input_b, "b", &texts);
    let mut random = rand::thread_rng();
    let kill_points = [
        random.gen_range(1..BULK_ROWS / 3),
        random.gen_range(BULK_ROWS / 3..2 * BULK_ROWS / 3),
    ];
    eprintln!("killing fleet submit once it has written {kill_points:?} rows");
    for at_least in kill_points {
        fleet
            .kill_once(&input_b, &output_b, &[], || lines_in(&output_b) >= at_least)
            .await;
    }
    assert!(
        lines_in(&output_b) < BULK_ROWS,
        "the kills came too late to test a resume"
    );
    let (done, resumed) = fleet.submit_to_end(&input_b, &output_b);
    assert_eq!(done.status.code(), Some(0), "{done:?}");
    let done_before = resumed["rows_already_done"].as_u64().unwrap();
    assert!(done_before >= kill_points[1] as u64, "{resumed}");
    assert_eq!(
        done_before + resumed["rows_ok"].as_u64().unwrap(),
        BULK_ROWS as u64,
        "{resumed}"
    );
    let queued = fleet.jobs_queued().await - queued_before;
    // Every job queued once: the jobs the killed runs had sent and not yet seen answered were
    // either read back from the store or sent again and absorbed by the queue's deduplication.
    assert_eq!(
        queued,
        BULK_ROWS.div_ceil(TEXTS_PER_JOB) as u64,
        "jobs queued for {BULK_ROWS} rows"
    );
    eprintln!(
        "the resumed run sent {} jobs, {} of them already queued (stored once), and read {} back",
        resumed["jobs_sent"], resumed["jobs_duplicate"], resumed["jobs_from_store"]
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

    // A pipeline's pipe: the same rows from standard input to standard output, the same bytes
    // as the file output, every job read back from the store.
    let piped = fleet
        .command(Path::new("-"), Path::new("-"), &[])
        .stdin(std::fs::File::open(&input_b).unwrap())
        .output()
        .unwrap();
    assert_eq!(piped.status.code(), Some(0), "{piped:?}");
    assert_eq!(
        piped.stdout,
        std::fs::read(&output_c).unwrap(),
        "standard output differs from the output file"
    );
    assert!(!Path::new("-").exists(), "`-` was taken for a file name");
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
    // To standard output: the same rows, failed ones included; the errors file only when asked
    // for, with the same rows as a file output's.
    let piped_errors = fleet.path("piped.errors");
    let piped = fleet
        .command(&input, Path::new("-"), &["--errors"])
        .arg(&piped_errors)
        .output()
        .unwrap();
    assert_eq!(piped.status.code(), Some(4), "{piped:?}");
    assert_eq!(piped.stdout, std::fs::read(&output).unwrap());
    assert_eq!(rows(&piped_errors), errors);
    // A Parquet output cannot go to standard output (it is committed in parts).
    let refused = fleet
        .command(&input, Path::new("-"), &["--output-format", "parquet"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(refused.stdout.is_empty());

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

    // So is a Parquet input without the text column, or with a null text; no output is begun.
    let bad_parquet = fleet.path("bad.parquet");
    let texts = ["one", "two", "", "four"].map(|text| Some(text.to_owned()));
    write_parquet(
        &bad_parquet,
        (0..4).map(|i| Some(i.to_string())).collect(),
        texts.to_vec(),
    );
    let parquet_output = fleet.path("bad.out.parquet");
    let done = fleet
        .submit_with(&bad_parquet, &parquet_output, &["--text-field", "body"])
        .wait_with_output()
        .unwrap();
    assert_eq!(done.status.code(), Some(1), "{done:?}");
    assert!(
        String::from_utf8_lossy(&done.stderr).contains("no column \"body\""),
        "{done:?}"
    );
    let mut texts = texts.to_vec();
    texts[2] = None;
    write_parquet(
        &bad_parquet,
        (0..4).map(|i| Some(i.to_string())).collect(),
        texts,
    );
    let done = fleet
        .submit(&bad_parquet, &parquet_output)
        .wait_with_output()
        .unwrap();
    assert_eq!(done.status.code(), Some(1), "{done:?}");
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(
        stderr.contains("input row 3") && stderr.contains("is null"),
        "{stderr}"
    );
    assert!(!parquet_output.exists());
    assert_eq!(committed_parts(&parquet_output), 0);
}

/// A Parquet input like [`write_input`]'s, Snappy-compressed (as pandas and Spark write it), in
/// row groups of 50 rows so that reading and resuming cross row groups.
fn write_parquet_input(path: &Path, prefix: &str, texts: &[String]) {
    let ids = (0..texts.len()).map(|i| Some(format!("{prefix}-{i}")));
    write_parquet(
        path,
        ids.collect(),
        texts.iter().cloned().map(Some).collect(),
    );
}

/// A Parquet file of `id` and `text` columns (nulls where None).
fn write_parquet(path: &Path, ids: Vec<Option<String>>, texts: Vec<Option<String>>) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, true),
    ]));
    let ids: StringArray = ids.into_iter().collect();
    let texts: StringArray = texts.into_iter().collect();
    let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(ids), Arc::new(texts)]).unwrap();
    let properties = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_max_row_group_row_count(Some(50))
        .build();
    let mut writer = ArrowWriter::try_new(
        std::fs::File::create(path).unwrap(),
        schema,
        Some(properties),
    )
    .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

/// A Parquet output's rows: id, vector (None for a failed row), status.
fn parquet_rows(path: &Path) -> Vec<(String, Option<Vec<f32>>, String)> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let ids = batch.column_by_name("id").unwrap().as_string::<i32>();
        let vectors = batch.column_by_name("vector").unwrap().as_list::<i32>();
        let statuses = batch.column_by_name("status").unwrap().as_string::<i32>();
        for i in 0..batch.num_rows() {
            let vector = (!vectors.is_null(i)).then(|| {
                let values = vectors.value(i);
                values.as_primitive::<Float32Type>().values().to_vec()
            });
            rows.push((
                ids.value(i).to_owned(),
                vector,
                statuses.value(i).to_owned(),
            ));
        }
    }
    rows
}

fn committed_parts(output: &Path) -> usize {
    std::fs::read_dir(format!("{}.parts", output.display())).map_or(0, |entries| {
        entries
            .filter(|entry| {
                entry
                    .as_ref()
                    .is_ok_and(|entry| entry.file_name().to_string_lossy().ends_with(".parquet"))
            })
            .count()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_rows_round_trip_and_a_killed_run_resumes_to_the_same_file() {
    let fleet = Fleet::start();
    let texts = texts();
    let (input, output) = (fleet.path("p.parquet"), fleet.path("p.out.parquet"));
    write_parquet_input(&input, "p", &texts);
    // Parts of two jobs, so the kills fall between committed parts.
    let parts = ["--rows-per-part", "16"];

    // Killed twice part way (after one part, then three), then run to the end.
    for at_least in [1, 3] {
        fleet
            .kill_once(&input, &output, &parts, || {
                committed_parts(&output) >= at_least
            })
            .await;
    }
    assert!(!output.exists(), "the kills came too late to test a resume");
    let (done, summary) = fleet.submit_to_end_with(&input, &output, &parts);
    assert_eq!(done.status.code(), Some(0), "{done:?}");
    assert!(
        summary["rows_already_done"].as_u64() >= Some(48),
        "{summary}"
    );
    // A fresh fleet: every job this test queued is on FLEET_JOBS.
    let queued = fleet.jobs_queued().await;
    assert_eq!(
        queued,
        (ROWS / TEXTS_PER_JOB) as u64,
        "jobs queued for {ROWS} rows"
    );
    assert!(
        !PathBuf::from(format!("{}.parts", output.display())).exists(),
        "the parts outlived the finished output"
    );
    let resumed = parquet_rows(&output);
    assert_eq!(resumed.len(), ROWS);
    for (i, (id, vector, status)) in resumed.iter().enumerate() {
        assert_eq!(
            (id.as_str(), status.as_str()),
            (format!("p-{i}").as_str(), "ok")
        );
        assert_eq!(vector.as_ref().map(Vec::len), Some(384), "row {i}");
    }

    // An uninterrupted run writes the same bytes, all of it read back from the fleet's results.
    let again = fleet.path("again.parquet");
    let (done, summary) = fleet.submit_to_end_with(&input, &again, &parts);
    assert_eq!(done.status.code(), Some(0), "{done:?}");
    assert_eq!(summary["jobs_sent"], 0, "{summary}");
    assert_eq!(
        std::fs::read(&output).unwrap(),
        std::fs::read(&again).unwrap(),
        "a resumed run's Parquet output differs from an uninterrupted one's"
    );

    // The same rows as JSON lines make the same jobs (nothing sent) and the same vectors.
    let (json_input, json_output) = (fleet.path("p.jsonl"), fleet.path("p.out.jsonl"));
    write_input(&json_input, "p", &texts);
    let (done, summary) = fleet.submit_to_end(&json_input, &json_output);
    assert_eq!(done.status.code(), Some(0), "{done:?}");
    assert_eq!(summary["jobs_sent"], 0, "{summary}");
    let json = rows(&json_output);
    assert_eq!(json.len(), ROWS);
    for (row, (id, in_parquet, _)) in json.iter().zip(&resumed) {
        assert_eq!(row["id"], id.as_str());
        let from_json: Vec<f32> = vector(row).iter().map(|&x| x as f32).collect();
        assert_eq!(Some(&from_json), in_parquet.as_ref(), "row {id}");
    }
    // Parquet output from JSON-lines input and the other way: the same rows again.
    let mixed = fleet.path("mixed.out.parquet");
    let (done, _) = fleet.submit_to_end(&json_input, &mixed);
    assert_eq!(done.status.code(), Some(0), "{done:?}");
    assert_eq!(parquet_rows(&mixed), resumed);
    assert_eq!(
        lines_in(&PathBuf::from(format!("{}.errors", output.display()))),
        0
    );
}

fn options(texts_per_job: usize) -> BulkOptions {
    BulkOptions {
        model: MODEL.into(),
        texts_per_job,
        in_flight: 3,
        retry: RetryPolicy {
            timeout: Duration::from_secs(20),
            ..RetryPolicy::default()
        },
    }
}

fn library_rows(range: std::ops::Range<usize>) -> Vec<Result<Row, BulkError>> {
    let texts = texts();
    range
        .map(|i| {
            Ok(Row {
                id: i.into(),
                text: texts[i].clone(),
            })
        })
        .collect()
}

async fn collect(
    stream: impl futures::Stream<Item = Result<JobDone, BulkError>>,
) -> Vec<Result<JobDone, BulkError>> {
    stream.collect().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_many_yields_jobs_in_order_and_resumes_from_a_whole_job() {
    let fleet = Fleet::start();
    let client = fleet.nats.tenant_client("acme").await;
    let tenant = Tenant::from_key_file(&fleet.key).unwrap();
    let options = options(TEXTS_PER_JOB);

    // Three jobs, in input order, every row with a vector.
    let rows = stream::iter(library_rows(0..3 * TEXTS_PER_JOB));
    let first: Vec<JobDone> = collect(submit_many(&client, &tenant, &options, 0, rows))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        first.iter().map(|job| job.index).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    let ids: Vec<Value> = first
        .iter()
        .flat_map(|job| &job.rows)
        .map(|row| row.id.clone())
        .collect();
    assert_eq!(
        ids,
        (0..3 * TEXTS_PER_JOB).map(Value::from).collect::<Vec<_>>()
    );
    assert!(first.iter().all(|job| job.sent));
    assert!(
        first
            .iter()
            .flat_map(|job| &job.rows)
            .all(|row| row.outcome.as_ref().is_ok_and(|vector| vector.len() == 384))
    );

    // Resumed at the third job: it is read back (same id, same vectors); the next ones are new.
    let from = 2 * TEXTS_PER_JOB;
    let rows = stream::iter(library_rows(from..5 * TEXTS_PER_JOB));
    let resumed: Vec<JobDone> = collect(submit_many(&client, &tenant, &options, from as u64, rows))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        resumed.iter().map(|job| job.index).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert_eq!(resumed[0].job_id, first[2].job_id);
    assert!(!resumed[0].sent, "a stored job was sent again");
    assert_eq!(resumed[0].rows, first[2].rows);
    assert!(resumed[1].sent && resumed[2].sent);

    // A resume from inside a job would ask for other jobs: refused, and nothing after it.
    let rows = stream::iter(library_rows(5..2 * TEXTS_PER_JOB));
    let misaligned = collect(submit_many(&client, &tenant, &options, 5, rows)).await;
    assert_eq!(misaligned.len(), 1);
    assert!(
        matches!(
            misaligned[0],
            Err(BulkError::Misaligned { first_row: 5, .. })
        ),
        "{:?}",
        misaligned[0]
    );

    // A bad row ends the stream after the jobs before its own.
    let mut rows = library_rows(0..TEXTS_PER_JOB + 2);
    rows.push(Err(BulkError::Usage("a bad row".into())));
    rows.extend(library_rows(TEXTS_PER_JOB + 3..3 * TEXTS_PER_JOB));
    let cut = collect(submit_many(
        &client,
        &tenant,
        &options,
        0,
        stream::iter(rows),
    ))
    .await;
    assert_eq!(cut.len(), 2, "{cut:?}");
    assert!(cut[0].as_ref().is_ok_and(|job| job.index == 0));
    assert!(matches!(cut[1], Err(BulkError::Usage(_))), "{:?}", cut[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infer_retrying_keeps_the_job_id_through_rate_limited_refusals() {
    // One job a second, no burst: right after one job, the next is refused until a token is back.
    let entry = TestTenant::new("acme")
        .tenants_entry()
        .replace("rate_per_second = 100000", "rate_per_second = 1")
        .replace("burst = 100000", "burst = 1");
    let fleet = Fleet::start_with(&entry);
    let client = fleet.nats.tenant_client("acme").await;
    let tenant = Tenant::from_key_file(&fleet.key).unwrap();
    let wait = Duration::from_secs(20);
    // The dispatcher may take a moment to start: the first accepted job spends the token.
    fleet_tests::eventually(Duration::from_secs(30), "a job accepted", || async {
        let job = tenant.embed_job(MODEL, vec!["spends the token".into()]);
        let reply = fleet_client::submit(&client, &tenant, &job, wait)
            .await
            .ok()?;
        (reply.status == SubmitStatus::Accepted).then_some(())
    })
    .await;

    let job = tenant.embed_job(MODEL, vec![texts()[3].clone()]);
    let once = RetryPolicy {
        attempts: 1,
        timeout: wait,
        ..RetryPolicy::default()
    };
    let refused = infer_retrying(&client, &tenant, &job, &once).await.unwrap();
    assert_eq!(refused.retries, 0);
    assert_eq!(refused.result.status, ResultStatus::Rejected, "{refused:?}");
    assert_eq!(
        refused.result.error.as_ref().map(|error| error.code),
        Some(ErrorCode::RateLimited),
        "{refused:?}"
    );

    let patient = RetryPolicy {
        attempts: 20,
        timeout: wait,
        first_pause: Duration::from_millis(100),
        max_pause: Duration::from_millis(400),
    };
    let answered = infer_retrying(&client, &tenant, &job, &patient)
        .await
        .unwrap();
    assert_eq!(answered.result.status, ResultStatus::Ok, "{answered:?}");
    assert_eq!(answered.result.job_id, job.job_id);
    assert!(answered.retries >= 1, "{answered:?}");
}
