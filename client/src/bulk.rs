//! Bulk embedding for ETL pipelines: rows in (JSON lines), one output row per input row in
//! input order, resumable after a kill.
//!
//! Rows are grouped into jobs of `texts_per_job`. A job's id is derived from its content and
//! place (model, position, row ids and texts), so a re-run with the same input and arguments
//! asks for the same jobs: a job whose result is stored is read back, never sent again, and a
//! job sent again within the queue's duplicate window is stored once. Progress is the output
//! itself: it holds whole jobs' rows in input order, so a re-run keeps its complete lines, cuts a
//! torn last line, and goes on from the next row. Memory stays bounded by the jobs in flight:
//! the input is read as it is needed.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, BufWriter, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use async_nats::Client;
use fleet_schemas::{ErrorCode, Job, JobResult, Output, ResultStatus, SubmitStatus};
use futures::{StreamExt, stream};
use rand::Rng;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{ClientError, Tenant, stored_result, submit};

#[derive(Debug, thiserror::Error)]
pub enum BulkError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("input line {line}: {reason}")]
    Row { line: u64, reason: String },
    #[error(
        "{path} line {line} is not an output row ({reason}): is it the output of another input?"
    )]
    Output {
        path: String,
        line: u64,
        reason: String,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// How rows become jobs and how hard a job is tried.
#[derive(Debug, Clone)]
pub struct BulkOptions {
    pub model: String,
    pub texts_per_job: usize,
    /// Jobs awaiting their answer at once.
    pub in_flight: usize,
    /// How long one attempt waits for its answer.
    pub timeout: Duration,
    /// Attempts per job before its rows are given up (`no_answer`).
    pub max_attempts: u32,
    /// The input rows' fields holding the row id and the text.
    pub id_field: String,
    pub text_field: String,
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BulkSummary {
    /// Rows found done in the output at start (a resumed run).
    pub rows_already_done: u64,
    pub rows_ok: u64,
    pub rows_failed: u64,
    /// Jobs sent to the fleet, and jobs whose stored result was read instead.
    pub jobs_sent: u64,
    pub jobs_from_store: u64,
    /// Attempts after the first (timeouts, `overloaded`, `rate_limited`, no dispatcher).
    pub retries: u64,
    /// Failed rows in the whole output, earlier runs' included: the rows of the errors file.
    pub rows_failed_in_output: u64,
}

struct Row {
    id: Value,
    text: String,
}

/// What became of one job's rows.
struct Done {
    rows: Vec<Row>,
    outcome: Result<Vec<Vec<f32>>, (String, String)>,
    sent: bool,
    retries: u64,
}

/// Embeds every row of `input` into `output` (and the rows that failed for good into `errors`),
/// going on from what `output` already holds.
pub async fn submit_rows(
    client: &Client,
    tenant: &Tenant,
    input: Box<dyn BufRead + Send>,
    output: &Path,
    errors: &Path,
    options: &BulkOptions,
) -> Result<BulkSummary, BulkError> {
    let written = |source| BulkError::Write {
        path: output.display().to_string(),
        source,
    };
    let done_rows = resume_point(output)?;
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .open(output)
        .map_err(written)?;
    let mut out = BufWriter::new(file);
    let mut summary = BulkSummary {
        rows_already_done: done_rows,
        ..BulkSummary::default()
    };
    let texts_per_job = options.texts_per_job.max(1);
    let first_job = done_rows / texts_per_job as u64;
    let rows = read_rows(input, options).skip(usize::try_from(done_rows).unwrap_or(usize::MAX));
    let jobs = chunks(rows, texts_per_job)
        .enumerate()
        .map(|(index, chunk)| (first_job + index as u64, chunk));
    let mut results = stream::iter(jobs)
        .map(|(index, chunk)| async move {
            let rows = chunk?;
            Ok::<_, BulkError>(run_job(client, tenant, options, index, rows).await)
        })
        .buffered(options.in_flight.max(1));
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let started = Instant::now();
    let mut last_shown = Instant::now();
    let mut jobs_since_sync = 0;
    while let Some(done) = results.next().await {
        let done = done?;
        summary.jobs_sent += u64::from(done.sent);
        summary.jobs_from_store += u64::from(!done.sent);
        summary.retries += done.retries;
        // One job's rows at once: a kill leaves whole jobs and at most one torn line.
        let mut lines = String::new();
        match &done.outcome {
            Ok(vectors) => {
                for (row, vector) in done.rows.iter().zip(vectors) {
                    lines.push_str(
                        &json!({"id": row.id, "status": "ok", "vector": vector}).to_string(),
                    );
                    lines.push('\n');
                }
                summary.rows_ok += done.rows.len() as u64;
            }
            Err((code, message)) => {
                for row in &done.rows {
                    lines.push_str(
                        &json!({"id": row.id, "status": "failed", "code": code, "message": message})
                            .to_string(),
                    );
                    lines.push('\n');
                }
                summary.rows_failed += done.rows.len() as u64;
            }
        }
        out.write_all(lines.as_bytes())
            .and_then(|()| out.flush())
            .map_err(written)?;
        jobs_since_sync += 1;
        // Durable against a crash of the machine every so often, not after every job.
        if jobs_since_sync == 64 {
            out.get_ref().sync_data().map_err(written)?;
            jobs_since_sync = 0;
        }
        if progress && last_shown.elapsed() > Duration::from_secs(1) {
            last_shown = Instant::now();
            let rows = summary.rows_ok + summary.rows_failed;
            eprint!(
                "\r{} rows ({:.0}/s), {} failed, {} retries   ",
                rows + done_rows,
                rows as f64 / started.elapsed().as_secs_f64(),
                summary.rows_failed,
                summary.retries
            );
        }
    }
    out.get_ref().sync_all().map_err(written)?;
    if progress {
        eprintln!();
    }
    summary.rows_failed_in_output = write_errors(output, errors)?;
    Ok(summary)
}

/// Runs one job: its stored result if there is one; else `submit` with its own id (no deadline:
/// a job may wait in a long queue) and wait for its stored result. Submitting again (same id:
/// the queue stores it once within its duplicate window) after a timeout, `overloaded`,
/// `rate_limited` or a missing dispatcher, with jittered exponential backoff.
async fn run_job(
    client: &Client,
    tenant: &Tenant,
    options: &BulkOptions,
    index: u64,
    rows: Vec<Row>,
) -> Done {
    let job_id = job_id(&options.model, index, &rows);
    let mut done = Done {
        outcome: Err(("no_answer".into(), String::new())),
        rows,
        sent: false,
        retries: 0,
    };
    if let Ok(Some(result)) = stored_result(client, &tenant.name, &job_id).await {
        done.outcome = outcome(&result);
        return done;
    }
    let texts: Vec<String> = done.rows.iter().map(|row| row.text.clone()).collect();
    let mut backoff = Duration::from_millis(200);
    for attempt in 0..options.max_attempts.max(1) {
        if attempt > 0 {
            done.retries += 1;
            let jitter = rand::thread_rng().gen_range(0.5..1.5);
            tokio::time::sleep(backoff.mul_f64(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        let mut job: Job = tenant.embed_job(&options.model, texts.clone());
        job.job_id = job_id.clone();
        done.sent = true;
        let reply = match submit(client, tenant, &job, options.timeout).await {
            Ok(reply) => reply,
            Err(error) => {
                done.outcome = Err(("no_answer".into(), error.to_string()));
                continue;
            }
        };
        if reply.status == SubmitStatus::Rejected {
            let (code, message) = reply.error.map_or_else(
                || ("internal".to_owned(), "refused without a reason".to_owned()),
                |error| (error.code.to_string(), error.message),
            );
            let again = code == ErrorCode::Overloaded.to_string()
                || code == ErrorCode::RateLimited.to_string();
            done.outcome = Err((code, message));
            if again {
                continue;
            }
            return done;
        }
        if let Some(result) = wait_stored(client, &tenant.name, &job_id, options.timeout).await {
            done.outcome = outcome(&result);
            return done;
        }
        done.outcome = Err((
            "no_answer".into(),
            format!("no result within {:?}", options.timeout),
        ));
    }
    done
}

/// Polls for a job's stored result, more slowly as it waits, until `timeout`.
async fn wait_stored(
    client: &Client,
    tenant: &str,
    job_id: &str,
    timeout: Duration,
) -> Option<JobResult> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(20);
    while started.elapsed() < timeout {
        if let Ok(Some(result)) = stored_result(client, tenant, job_id).await {
            return Some(result);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
    None
}

/// The vectors of an ok result, or the code and message rows that failed carry.
fn outcome(result: &JobResult) -> Result<Vec<Vec<f32>>, (String, String)> {
    match (&result.status, &result.output, &result.error) {
        (ResultStatus::Ok, Some(Output::Embeddings { vectors, .. }), _) => Ok(vectors.clone()),
        (_, _, Some(error)) => Err((error.code.to_string(), error.message.clone())),
        _ => Err(("internal".into(), "a result without output or error".into())),
    }
}

/// A job's id from its content and place: the same input and arguments ask for the same jobs.
fn job_id(model: &str, index: u64, rows: &[Row]) -> String {
    let mut hash = Sha256::new();
    hash.update(model.as_bytes());
    hash.update(index.to_be_bytes());
    for row in rows {
        // Length-prefixed, so no two different rows hash alike by shifting bytes between them.
        for part in [row.id.to_string(), row.text.clone()] {
            hash.update((part.len() as u64).to_be_bytes());
            hash.update(part.as_bytes());
        }
    }
    hex::encode(&hash.finalize()[..16])
}

/// The rows of the input, read as they are needed.
fn read_rows(
    input: Box<dyn BufRead + Send>,
    options: &BulkOptions,
) -> impl Iterator<Item = Result<Row, BulkError>> + Send + use<> {
    let (id_field, text_field) = (options.id_field.clone(), options.text_field.clone());
    input
        .lines()
        .enumerate()
        .filter(|(_, line)| line.as_ref().map_or(true, |line| !line.trim().is_empty()))
        .map(move |(number, line)| {
            let line_number = number as u64 + 1;
            let bad = |reason: String| BulkError::Row {
                line: line_number,
                reason,
            };
            let line = line.map_err(|error| bad(error.to_string()))?;
            let mut row: serde_json::Map<String, Value> = serde_json::from_str(&line)
                .map_err(|error| bad(format!("not a JSON object: {error}")))?;
            let id = row
                .remove(&id_field)
                .ok_or_else(|| bad(format!("no field {id_field:?}")))?;
            let text = match row.remove(&text_field) {
                Some(Value::String(text)) => text,
                Some(_) => return Err(bad(format!("field {text_field:?} is not a string"))),
                None => return Err(bad(format!("no field {text_field:?}"))),
            };
            Ok(Row { id, text })
        })
}

/// Groups rows into jobs; a bad row ends the run at its job.
fn chunks(
    mut rows: impl Iterator<Item = Result<Row, BulkError>>,
    size: usize,
) -> impl Iterator<Item = Result<Vec<Row>, BulkError>> {
    std::iter::from_fn(move || {
        let mut chunk = Vec::with_capacity(size);
        for row in rows.by_ref() {
            match row {
                Ok(row) => chunk.push(row),
                Err(error) => return Some(Err(error)),
            }
            if chunk.len() == size {
                break;
            }
        }
        (!chunk.is_empty()).then_some(Ok(chunk))
    })
}

/// How many rows `output` holds whole; a torn last line (a kill mid-write) is cut off.
fn resume_point(output: &Path) -> Result<u64, BulkError> {
    let shown = || output.display().to_string();
    let file = match File::open(output) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(BulkError::Read {
                path: shown(),
                source,
            });
        }
    };
    let mut reader = BufReader::new(file);
    let (mut rows, mut whole_bytes) = (0u64, 0u64);
    let mut line = String::new();
    loop {
        line.clear();
        let read = reader
            .read_line(&mut line)
            .map_err(|source| BulkError::Read {
                path: shown(),
                source,
            })?;
        if read == 0 || !line.ends_with('\n') {
            break;
        }
        let parsed: Result<Value, _> = serde_json::from_str(&line);
        if !parsed.as_ref().is_ok_and(|row| row.get("status").is_some()) {
            return Err(BulkError::Output {
                path: shown(),
                line: rows + 1,
                reason: parsed.err().map_or("no status".into(), |e| e.to_string()),
            });
        }
        rows += 1;
        whole_bytes += read as u64;
    }
    let file = OpenOptions::new()
        .write(true)
        .open(output)
        .map_err(|source| BulkError::Write {
            path: shown(),
            source,
        })?;
    file.set_len(whole_bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| BulkError::Write {
            path: shown(),
            source,
        })?;
    Ok(rows)
}

/// Writes the failed rows of `output` to `errors` (whole, then moved into place), so the
/// errors file always agrees with the output, resumed or not; returns how many there are.
fn write_errors(output: &Path, errors: &Path) -> Result<u64, BulkError> {
    let read = |source| BulkError::Read {
        path: output.display().to_string(),
        source,
    };
    let written = |source| BulkError::Write {
        path: errors.display().to_string(),
        source,
    };
    let partial = PathBuf::from(format!("{}.partial", errors.display()));
    let mut out = BufWriter::new(File::create(&partial).map_err(written)?);
    let input = BufReader::new(File::open(output).map_err(read)?);
    let mut failed = 0;
    for line in input.lines() {
        let line = line.map_err(read)?;
        let row: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if row["status"] != "ok" {
            failed += 1;
            out.write_all(line.as_bytes())
                .and_then(|()| out.write_all(b"\n"))
                .map_err(written)?;
        }
    }
    out.flush().map_err(written)?;
    out.get_ref().sync_all().map_err(written)?;
    std::fs::rename(&partial, errors).map_err(written)?;
    Ok(failed)
}
