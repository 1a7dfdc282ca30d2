//! What one request of a latency run is: its texts (drawn from a corpus or made to a length
//! distribution), how many per job, and how it is sent and its answer awaited: `infer`
//! (request-reply, the answer is the result) or `submit` followed by reading the stored result
//! back from `FLEET_RESULTS`, as an ETL caller does.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use fleet_client::{ClientError, infer, stored_result, submit};
use fleet_schemas::{JobResult, ResultStatus, SubmitStatus, now_ms};
use rand::{Rng, seq::SliceRandom};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{Run, dist::Dist};

#[derive(Debug, clap::Args)]
pub struct WorkloadArgs {
    /// How a request is made: `sync` sends `infer` and waits for the answer; `async` sends
    /// `submit`, then reads the job's stored result from FLEET_RESULTS (a direct get every
    /// --poll-interval). Either way the latency ends when the result is in hand.
    #[arg(long, env = "LOADTEST_MODE", value_enum, default_value = "sync")]
    mode: Mode,
    /// Async mode: how often a submitted job's stored result is looked for. Its latency is
    /// over by up to this much: the price of not polling harder.
    #[arg(long, env = "LOADTEST_POLL_INTERVAL", default_value = "5ms", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Texts per job: `N`, `LO..HI` (uniform, both included) or `V:W,V:W,...` (V with weight W).
    #[arg(long, env = "LOADTEST_TEXTS_PER_JOB", default_value = "1")]
    texts_per_job: Dist,
    /// Texts drawn at random from this corpus (JSON lines, `{"id", "text"}`), so their lengths
    /// follow the corpus's.
    #[arg(long, env = "LOADTEST_CORPUS", conflicts_with = "text_words")]
    corpus: Option<PathBuf>,
    /// Without --corpus: words per text, a distribution written as for --texts-per-job.
    #[arg(long, env = "LOADTEST_TEXT_WORDS", default_value = "12")]
    text_words: Dist,
    /// How long to wait for one request's result (e.g. `30s`).
    #[arg(long, env = "LOADTEST_TIMEOUT", default_value = "30s", value_parser = fleet_service::positive_duration)]
    timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Sync,
    Async,
}

/// Where texts come from.
enum Texts {
    Corpus { path: PathBuf, texts: Vec<String> },
    Words(Dist),
}

pub struct Workload {
    mode: Mode,
    poll_interval: Duration,
    texts_per_job: Dist,
    texts: Texts,
    timeout: Duration,
}

/// How one request ended: ok, or an error code (the fleet's wire code, or `timed_out`,
/// `no_answer`, `result_unreadable` for what happened on the way).
pub enum Outcome {
    Ok,
    Error(String),
}

/// Words synthetic texts are made of: ordinary English, so the tokenizer sees ordinary tokens.
const WORDS: &[&str] = &[
    "a", "sentence", "of", "ordinary", "length", "to", "embed", "about", "the", "fleet", "that",
    "answers", "each", "caller", "with", "vectors", "from", "its", "model", "queue",
];

#[derive(Deserialize)]
struct CorpusLine {
    text: String,
}

/// The texts of a corpus file, one `{"id", "text"}` object per line.
pub fn read_corpus(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| {
            serde_json::from_str::<CorpusLine>(line)
                .map(|c| c.text)
                .with_context(|| {
                    format!(
                        "{} line {}: corpus lines must be {{\"id\", \"text\"}}",
                        path.display(),
                        number + 1
                    )
                })
        })
        .collect()
}

impl Workload {
    pub fn new(args: &WorkloadArgs) -> anyhow::Result<Self> {
        let texts = match &args.corpus {
            Some(path) => {
                let texts = read_corpus(path)?;
                anyhow::ensure!(!texts.is_empty(), "{} holds no texts", path.display());
                Texts::Corpus {
                    path: path.clone(),
                    texts,
                }
            }
            None => Texts::Words(args.text_words.clone()),
        };
        anyhow::ensure!(
            !args.poll_interval.is_zero(),
            "--poll-interval must be above zero"
        );
        Ok(Workload {
            mode: args.mode,
            poll_interval: args.poll_interval,
            texts_per_job: args.texts_per_job.clone(),
            texts,
            timeout: args.timeout,
        })
    }

    /// The texts of one job, drawn afresh.
    pub fn texts(&self) -> Vec<String> {
        let mut rng = rand::thread_rng();
        let count = self.texts_per_job.sample(&mut rng);
        (0..count)
            .map(|_| match &self.texts {
                Texts::Corpus { texts, .. } => texts.choose(&mut rng).cloned().unwrap_or_default(),
                Texts::Words(words) => {
                    // A random first word, so the texts of a run are not all one string.
                    let first = rng.gen_range(0..WORDS.len());
                    (0..words.sample(&mut rng) as usize)
                        .map(|i| WORDS[(first + i) % WORDS.len()])
                        .collect::<Vec<_>>()
                        .join(" ")
                }
            })
            .collect()
    }

    /// Sends one job of `texts` and awaits its result; also when the fleet accepted it (async
    /// mode only).
    pub async fn request(&self, run: &Arc<Run>, texts: Vec<String>) -> (Outcome, Option<Instant>) {
        // Signed at send time: a job must be fresh when it reaches the dispatcher.
        let mut job = run.tenant.embed_job(&run.model, texts);
        match self.mode {
            Mode::Sync => {
                let outcome = match infer(&run.client, &run.tenant, &job, self.timeout).await {
                    Ok(result) => result_outcome(&result),
                    Err(error) => failure(&error),
                };
                (outcome, None)
            }
            Mode::Async => {
                let deadline = Instant::now() + self.timeout;
                // As `infer` does: nobody reads the result after the timeout, so the fleet
                // should answer `expired` rather than run the job then.
                let timeout_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
                job.deadline_ms = Some(now_ms().saturating_add(timeout_ms));
                match submit(&run.client, &run.tenant, &job, self.timeout).await {
                    Ok(reply) if reply.status == SubmitStatus::Accepted => {}
                    Ok(reply) => {
                        let code = reply
                            .error
                            .map_or_else(|| "none".to_owned(), |e| e.code.to_string());
                        return (Outcome::Error(code), None);
                    }
                    Err(error) => return (failure(&error), None),
                }
                let accepted = Instant::now();
                loop {
                    tokio::time::sleep(self.poll_interval).await;
                    match stored_result(&run.client, &run.tenant.name, &job.job_id).await {
                        Ok(Some(result)) => return (result_outcome(&result), Some(accepted)),
                        Ok(None) if Instant::now() < deadline => {}
                        Ok(None) => return (Outcome::Error("timed_out".into()), Some(accepted)),
                        Err(_) => {
                            return (Outcome::Error("result_unreadable".into()), Some(accepted));
                        }
                    }
                }
            }
        }
    }

    /// What the report says about the workload.
    pub fn describe(&self) -> serde_json::Map<String, Value> {
        let mut described = serde_json::Map::new();
        described.insert(
            "mode".into(),
            json!(match self.mode {
                Mode::Sync => "sync",
                Mode::Async => "async",
            }),
        );
        if self.mode == Mode::Async {
            described.insert(
                "poll_interval_ms".into(),
                json!(self.poll_interval.as_secs_f64() * 1000.0),
            );
        }
        described.insert(
            "texts_per_job".into(),
            json!(self.texts_per_job.to_string()),
        );
        described.insert(
            "texts_from".into(),
            match &self.texts {
                Texts::Corpus { path, texts } => {
                    json!({ "corpus": path.display().to_string(), "texts": texts.len() })
                }
                Texts::Words(words) => json!({ "words_per_text": words.to_string() }),
            },
        );
        described.insert("timeout_s".into(), json!(self.timeout.as_secs_f64()));
        described
    }
}

fn result_outcome(result: &JobResult) -> Outcome {
    if result.status == ResultStatus::Ok {
        Outcome::Ok
    } else {
        Outcome::Error(
            result
                .error
                .as_ref()
                .map_or_else(|| "none".to_owned(), |error| error.code.to_string()),
        )
    }
}

fn failure(error: &ClientError) -> Outcome {
    Outcome::Error(match error {
        ClientError::TimedOut { .. } => "timed_out".into(),
        _ => "no_answer".into(),
    })
}
