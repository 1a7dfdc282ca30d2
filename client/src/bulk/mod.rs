//! Bulk embedding for ETL pipelines: rows in, one result per row out in input order, resumable
//! after a kill.
//!
//! [`submit_many`] is the library form: a stream of rows in, a stream of each job's results out.
//! [`submit_file`] runs it from an input file (JSON lines or Parquet) into an output file of the
//! same kinds, which is what `fleet submit` does.
//!
//! Rows are grouped into jobs of `texts_per_job`. A job's id is derived from its content and
//! place (model, position, row ids and texts), so a re-run with the same input and arguments
//! asks for the same jobs: a job whose result is stored is read back, never sent again, and a
//! job sent again within the queue's duplicate window is stored once. Progress is the output
//! itself: it holds whole jobs' rows in input order, so a re-run counts what it holds, and goes
//! on from the next row (see [`json_lines`] and [`parquet_files`] for how each kind of output is
//! made crash-safe). Memory stays bounded by the jobs in flight: the input is read as needed.

pub mod json_lines;
pub mod parquet_files;

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use async_nats::Client;
use fleet_schemas::{Job, JobResult, Output, ResultStatus, SubmitStatus};
use futures::{Stream, StreamExt, stream};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{ClientError, RetryPolicy, Tenant, is_retryable, stored_result, submit};

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
    #[error("input row {row} of {path}: {reason}")]
    ParquetRow {
        path: String,
        row: u64,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Parquet { path: String, reason: String },
    #[error(
        "{path} line {line} is not an output row ({reason}): is it the output of another input?"
    )]
    Output {
        path: String,
        line: u64,
        reason: String,
    },
    #[error(
        "resuming after row {first_row}, which is not the end of a job of {texts_per_job} rows: \
         was the output written with another --texts-per-job?"
    )]
    Misaligned {
        first_row: u64,
        texts_per_job: usize,
    },
    #[error(
        "{path} is a finished output of {rows} rows, and the input has more: write to another \
         output (or remove it to start again)"
    )]
    Finished { path: String, rows: u64 },
    #[error("{0}")]
    Usage(String),
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
    /// Attempts per job (its rows then fail `no_answer`), how long each waits for the job's
    /// stored result, and the pauses between them.
    pub retry: RetryPolicy,
}

/// One input row: its id (any JSON value; copied to its result) and the text to embed.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: Value,
    pub text: String,
}

/// Why a row has no vector: the error code (`no_answer` when the fleet never answered) and
/// message of its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub code: String,
    pub message: String,
}

/// One row's result: its id and its vector, or why there is none.
#[derive(Debug, Clone, PartialEq)]
pub struct RowResult {
    pub id: Value,
    pub outcome: Result<Vec<f32>, RowError>,
}

/// What became of one job: its rows' results in input order, and how it was got.
#[derive(Debug, Clone)]
pub struct JobDone {
    /// The job's place (0 for the input's first rows) and its content-derived id.
    pub index: u64,
    pub job_id: String,
    pub rows: Vec<RowResult>,
    /// False when its stored result was read back (an earlier run's job): nothing was sent.
    pub sent: bool,
    /// Attempts after the first.
    pub retries: u64,
    /// Sends the queue answered `duplicate`: it already held the job (sent by a run that was
    /// killed before the answer, or by an attempt that timed out), and stored it once.
    pub duplicates: u64,
}

/// Embeds a stream of rows, `texts_per_job` rows a job, `in_flight` jobs at a time, and yields
/// each job's results in input order (whatever order the fleet answers in).
///
/// Each job is first looked up in `FLEET_RESULTS` under its content-derived id (model, place,
/// row ids and texts): a job an earlier run got answered is read back, not sent. Otherwise it is
/// submitted, with no deadline (it may wait in a long queue), and its stored result awaited; a
/// timeout, no dispatcher, `overloaded` or `rate_limited` submits it again under the same id
/// (the queue stores it once) after a jittered pause, up to `retry.attempts`. Other refusals
/// fail the job's rows with the refusal's code.
///
/// `first_row` is the place of the stream's first row in the whole input: 0 for a fresh run, or
/// the rows a resumed run already has (a whole number of jobs, or the job ids would differ).
/// A row the stream yields as an error ends the stream there, after the jobs before it.
///
/// ```no_run
/// # async fn example(client: async_nats::Client, tenant: fleet_client::Tenant) -> Result<(), fleet_client::bulk::BulkError> {
/// use fleet_client::{RetryPolicy, bulk::{BulkOptions, Row, submit_many}};
/// use futures::{StreamExt, stream};
/// let options = BulkOptions {
///     model: "all-minilm-l6-v2".into(),
///     texts_per_job: 32,
///     in_flight: 64,
///     retry: RetryPolicy::default(),
/// };
/// let rows = (0..1000).map(|i| Ok(Row { id: i.into(), text: format!("row {i}") }));
/// let mut jobs = std::pin::pin!(submit_many(&client, &tenant, &options, 0, stream::iter(rows)));
/// while let Some(job) = jobs.next().await {
///     for row in job?.rows {
///         println!("{}: {:?}", row.id, row.outcome.map(|vector| vector.len()));
///     }
/// }
/// # Ok(()) }
/// ```
pub fn submit_many<'a>(
    client: &'a Client,
    tenant: &'a Tenant,
    options: &'a BulkOptions,
    first_row: u64,
    rows: impl Stream<Item = Result<Row, BulkError>> + 'a,
) -> impl Stream<Item = Result<JobDone, BulkError>> + 'a {
    let texts_per_job = options.texts_per_job.max(1);
    let first_job = first_row / texts_per_job as u64;
    let aligned = first_row.is_multiple_of(texts_per_job as u64);
    rows.chunks(texts_per_job)
        .enumerate()
        .map(move |(offset, chunk)| async move {
            if !aligned {
                return Err(BulkError::Misaligned {
                    first_row,
                    texts_per_job,
                });
            }
            let rows = chunk.into_iter().collect::<Result<Vec<Row>, _>>()?;
            Ok(run_job(client, tenant, options, first_job + offset as u64, rows).await)
        })
        .buffered(options.in_flight.max(1))
        // Nothing after a bad row or a misaligned resume: the output must stay whole jobs.
        .scan(false, |failed, done| {
            let next = (!*failed).then(|| {
                *failed = done.is_err();
                done
            });
            std::future::ready(next)
        })
}

/// Where rows come from and where their results go, and in which format.
#[derive(Debug, Clone)]
pub struct Files {
    /// Input rows (`-`: standard input, JSON lines only).
    pub input: PathBuf,
    pub input_format: Format,
    /// The input fields (JSON) or columns (Parquet) holding a row's id and its text.
    pub id_field: String,
    pub text_field: String,
    /// Output rows (`-`: standard output, JSON lines only).
    pub output: PathBuf,
    pub output_format: Format,
    /// Where the failed rows go too (JSON lines, whatever the output's format); `None` keeps
    /// them in the output only.
    pub errors: Option<PathBuf>,
    /// Parquet output: rows per committed part (rounded up to whole jobs).
    pub rows_per_part: usize,
}

/// A file format for rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet.
    Parquet,
}

impl Format {
    /// The format a file's name says: `.parquet` or `.pq` is Parquet, anything else JSON lines.
    pub fn of_path(path: &Path) -> Format {
        match path.extension().and_then(|extension| extension.to_str()) {
            Some("parquet" | "pq") => Format::Parquet,
            _ => Format::Jsonl,
        }
    }
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
    /// Sends the queue already held and stored once (see [`JobDone::duplicates`]).
    pub jobs_duplicate: u64,
    /// Failed rows in the whole output, earlier runs' included: the rows of the errors file.
    pub rows_failed_in_output: u64,
}

/// An output being written: whole jobs at a time, made durable as its format says.
trait Sink {
    /// Rows the output held whole when it was opened (an earlier run's).
    fn rows_done(&self) -> u64;
    fn write_job(&mut self, rows: Vec<RowResult>) -> Result<(), BulkError>;
    /// Makes the output whole and durable, then writes its failed rows (JSON lines) to
    /// `errors`, if given; returns how many there are.
    fn finish(self: Box<Self>, errors: Option<&Path>) -> Result<u64, BulkError>;
}

/// Rows read from an input, from a given row on.
type Rows = Box<dyn Iterator<Item = Result<Row, BulkError>> + Send>;

impl Files {
    /// How many rows the input holds, when that can be known without holding it: a Parquet
    /// file's footer says; a JSON-lines file is counted in one pass; standard input cannot be.
    pub fn count_input_rows(&self) -> Result<Option<u64>, BulkError> {
        if self.input.as_os_str() == "-" {
            return Ok(None);
        }
        match self.input_format {
            Format::Jsonl => json_lines::count_rows(&self.input).map(Some),
            Format::Parquet => parquet_files::count_rows(&self.input).map(Some),
        }
    }

    fn open_output(&self, texts_per_job: usize) -> Result<Box<dyn Sink>, BulkError> {
        let stdout = self.output.as_os_str() == "-";
        Ok(match self.output_format {
            Format::Jsonl if stdout => Box::new(json_lines::Stdout::open()?),
            Format::Parquet if stdout => {
                return Err(BulkError::Usage(
                    "Parquet output must be a file (it is committed in parts and resumed), not \
                     standard output"
                        .into(),
                ));
            }
            Format::Jsonl => Box::new(json_lines::Output::open(&self.output)?),
            Format::Parquet => {
                // Parts hold whole jobs, so a part's end is a place a resume can start from.
                let jobs = self.rows_per_part.max(1).div_ceil(texts_per_job);
                Box::new(parquet_files::Output::open(
                    &self.output,
                    jobs * texts_per_job,
                )?)
            }
        })
    }

    fn open_input(&self, from_row: u64) -> Result<Rows, BulkError> {
        match self.input_format {
            Format::Jsonl => json_lines::read_rows(
                &self.input,
                from_row,
                self.id_field.clone(),
                self.text_field.clone(),
            ),
            Format::Parquet if self.input.as_os_str() == "-" => Err(BulkError::Usage(
                "Parquet input must be a file (its footer is read first), not standard input"
                    .into(),
            )),
            Format::Parquet => {
                parquet_files::read_rows(&self.input, from_row, &self.id_field, &self.text_field)
            }
        }
    }
}

/// Embeds every row of `files.input` into `files.output` (and the rows that failed for good
/// into `files.errors`), going on from what the output already holds. `progress` is called
/// after each job is written, with the run's figures so far.
pub async fn submit_file(
    client: &Client,
    tenant: &Tenant,
    files: &Files,
    options: &BulkOptions,
    progress: &mut (dyn FnMut(&BulkSummary) + Send),
) -> Result<BulkSummary, BulkError> {
    let mut output = files.open_output(options.texts_per_job.max(1))?;
    let mut summary = BulkSummary {
        rows_already_done: output.rows_done(),
        ..BulkSummary::default()
    };
    let rows = files.open_input(summary.rows_already_done)?;
    let mut jobs = std::pin::pin!(submit_many(
        client,
        tenant,
        options,
        summary.rows_already_done,
        stream::iter(rows),
    ));
    while let Some(done) = jobs.next().await {
        let done = done?;
        summary.jobs_sent += u64::from(done.sent);
        summary.jobs_from_store += u64::from(!done.sent);
        summary.retries += done.retries;
        summary.jobs_duplicate += done.duplicates;
        let failed = done.rows.iter().filter(|row| row.outcome.is_err()).count() as u64;
        summary.rows_failed += failed;
        summary.rows_ok += done.rows.len() as u64 - failed;
        output.write_job(done.rows)?;
        progress(&summary);
    }
    summary.rows_failed_in_output = output.finish(files.errors.as_deref())?;
    Ok(summary)
}

/// Runs one job: its stored result if there is one; else `submit` with its own id (no deadline:
/// a job may wait in a long queue) and wait for its stored result, as [`submit_many`] says.
async fn run_job(
    client: &Client,
    tenant: &Tenant,
    options: &BulkOptions,
    index: u64,
    rows: Vec<Row>,
) -> JobDone {
    let job_id = job_id(&options.model, index, &rows);
    let mut sent = false;
    let mut retries = 0;
    let mut duplicates = 0;
    let outcome = 'outcome: {
        if let Ok(Some(result)) = stored_result(client, &tenant.name, &job_id).await {
            break 'outcome outcome(result);
        }
        let texts: Vec<String> = rows.iter().map(|row| row.text.clone()).collect();
        let mut last = no_answer(String::new());
        for attempt in 0..options.retry.attempts.max(1) {
            if attempt > 0 {
                retries += 1;
                options.retry.pause(attempt).await;
            }
            let mut job: Job = tenant.embed_job(&options.model, texts.clone());
            job.job_id = job_id.clone();
            sent = true;
            let reply = match submit(client, tenant, &job, options.retry.timeout).await {
                Ok(reply) => reply,
                Err(error) => {
                    last = no_answer(error.to_string());
                    continue;
                }
            };
            duplicates += u64::from(reply.duplicate);
            if reply.status == SubmitStatus::Rejected {
                let Some(error) = reply.error else {
                    break 'outcome Err(RowError {
                        code: "internal".into(),
                        message: "refused without a reason".into(),
                    });
                };
                let again = is_retryable(error.code);
                last = Err(RowError {
                    code: error.code.to_string(),
                    message: error.message,
                });
                if again {
                    continue;
                }
                break 'outcome last;
            }
            if let Some(result) =
                wait_stored(client, &tenant.name, &job_id, options.retry.timeout).await
            {
                break 'outcome outcome(result);
            }
            last = no_answer(format!("no result within {:?}", options.retry.timeout));
        }
        last
    };
    let rows = match outcome {
        Ok(vectors) => rows
            .into_iter()
            .zip(vectors.into_iter().map(Ok))
            .map(|(row, outcome)| RowResult {
                id: row.id,
                outcome,
            })
            .collect(),
        Err(error) => rows
            .into_iter()
            .map(|row| RowResult {
                id: row.id,
                outcome: Err(error.clone()),
            })
            .collect(),
    };
    JobDone {
        index,
        job_id,
        rows,
        sent,
        retries,
        duplicates,
    }
}

fn no_answer(message: String) -> Result<Vec<Vec<f32>>, RowError> {
    Err(RowError {
        code: "no_answer".into(),
        message,
    })
}

/// Polls for a job's stored result, more slowly as it waits, until `timeout`.
async fn wait_stored(
    client: &Client,
    tenant: &str,
    job_id: &str,
    timeout: std::time::Duration,
) -> Option<JobResult> {
    let started = Instant::now();
    let mut pause = std::time::Duration::from_millis(20);
    while started.elapsed() < timeout {
        if let Ok(Some(result)) = stored_result(client, tenant, job_id).await {
            return Some(result);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(500));
    }
    None
}

/// The vectors of an ok result, or the code and message its rows fail with.
fn outcome(result: JobResult) -> Result<Vec<Vec<f32>>, RowError> {
    match (result.status, result.output, result.error) {
        (ResultStatus::Ok, Some(Output::Embeddings { vectors, .. }), _) => Ok(vectors),
        (_, _, Some(error)) => Err(RowError {
            code: error.code.to_string(),
            message: error.message,
        }),
        _ => Err(RowError {
            code: "internal".into(),
            message: "a result without output or error".into(),
        }),
    }
}

/// A job's id from its content and place: the same input and arguments ask for the same jobs.
/// The Python client derives the same ids (either can resume the other's run).
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

/// Writes `lines` to `errors` whole, then moves it into place, so the errors file always
/// agrees with the output, resumed or not; returns how many lines there are (counted only,
/// without an errors file).
fn write_errors(
    errors: Option<&Path>,
    lines: impl Iterator<Item = Result<String, BulkError>>,
) -> Result<u64, BulkError> {
    use std::io::Write;
    let Some(errors) = errors else {
        return lines.map(|line| line.map(|_| 1)).sum();
    };
    let written = |source| BulkError::Write {
        path: errors.display().to_string(),
        source,
    };
    let partial = PathBuf::from(format!("{}.partial", errors.display()));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(written)?);
    let mut count = 0;
    for line in lines {
        count += 1;
        out.write_all(line?.as_bytes())
            .and_then(|()| out.write_all(b"\n"))
            .map_err(written)?;
    }
    out.flush().map_err(written)?;
    out.get_ref().sync_all().map_err(written)?;
    std::fs::rename(&partial, errors).map_err(written)?;
    Ok(count)
}
