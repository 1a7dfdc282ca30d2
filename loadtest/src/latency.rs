//! `loadtest latency`: answer latency by request-reply (`infer`) under a load that does not
//! bend to the fleet's answers (open loop: a fixed or Poisson arrival rate) or that waits for
//! them (closed loop: a fixed number in flight).
//!
//! In open loop every latency counts from the instant the request was due, not from when it
//! went out: a load generator that fell behind (or a fleet that stalled it) would otherwise
//! leave the waiting out of its figures (coordinated omission). Latencies go to an HDR
//! histogram (3 significant digits, 1 µs to 1 h).

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use fleet_client::{ClientError, infer};
use fleet_schemas::ResultStatus;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::json;
use tokio::{sync::mpsc, time::Instant};

use crate::Run;

#[derive(Debug, clap::Args)]
pub struct LatencyArgs {
    /// Open loop: requests per second, sent whatever the answers do. Without it: closed loop,
    /// --in-flight requests at a time.
    #[arg(long, env = "LOADTEST_RATE")]
    rate: Option<f64>,
    /// Open loop: how requests arrive, evenly spaced or as a Poisson process.
    #[arg(long, env = "LOADTEST_ARRIVALS", value_enum, default_value = "fixed")]
    arrivals: Arrivals,
    /// How long requests are sent (e.g. `30s`).
    #[arg(long, env = "LOADTEST_DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Texts per job.
    #[arg(long, env = "LOADTEST_TEXTS_PER_JOB", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    texts_per_job: u16,
    /// Seconds to wait for one answer.
    #[arg(long, env = "LOADTEST_TIMEOUT_SECS", default_value_t = 30)]
    timeout_secs: u64,
    /// Open loop: the most requests awaiting an answer; a request due beyond it is counted as
    /// not sent (the load generator, not the fleet, is saturated), never silently.
    #[arg(long, env = "LOADTEST_MAX_OUTSTANDING", default_value_t = 10_000)]
    max_outstanding: usize,
    /// Also write the report (JSON) here.
    #[arg(long, env = "LOADTEST_REPORT")]
    report: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Arrivals {
    Fixed,
    Poisson,
}

/// How one request ended.
enum Outcome {
    Ok,
    /// The fleet answered with an error: its wire code.
    Refused(String),
    TimedOut,
    /// No answer for another reason (no dispatcher, connection).
    Failed,
}

struct Sample {
    /// When it was due (open loop) or sent (closed loop), from the start of the run.
    due: Duration,
    latency: Duration,
    outcome: Outcome,
}

const TEXT: &str = "A sentence of ordinary length to embed, about a dozen words long.";

pub async fn latency(run: &Arc<Run>, args: &LatencyArgs) -> anyhow::Result<()> {
    let (samples_tx, mut samples_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let texts = vec![TEXT.to_owned(); usize::from(args.texts_per_job)];
    let timeout = Duration::from_secs(args.timeout_secs);
    let one = {
        let run = Arc::clone(run);
        move |due: Duration, sent_at: Instant| {
            let (run, texts, samples_tx) = (Arc::clone(&run), texts.clone(), samples_tx.clone());
            async move {
                // Signed at send time: a job must be fresh when it reaches the dispatcher.
                let job = run.tenant.embed_job(&run.model, texts);
                let outcome = match infer(&run.client, &run.tenant, &job, timeout).await {
                    Ok(result) if result.status == ResultStatus::Ok => Outcome::Ok,
                    Ok(result) => Outcome::Refused(
                        result
                            .error
                            .map_or_else(|| "none".to_owned(), |error| error.code.to_string()),
                    ),
                    Err(ClientError::TimedOut { .. }) => Outcome::TimedOut,
                    Err(_) => Outcome::Failed,
                };
                let latency = sent_at.elapsed();
                let _ = samples_tx.send(Sample {
                    due,
                    latency,
                    outcome,
                });
            }
        }
    };
    let mut not_sent = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    match args.rate {
        Some(rate) => {
            anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be positive");
            let mut due = Duration::ZERO;
            let mut rng = StdRng::from_entropy();
            while due < args.duration {
                tokio::time::sleep_until(started + due).await;
                while tasks.try_join_next().is_some() {}
                if tasks.len() >= args.max_outstanding {
                    not_sent += 1;
                } else {
                    // The latency counts from when the request was due, not from now.
                    tasks.spawn(one(due, started + due));
                }
                let gap = match args.arrivals {
                    Arrivals::Fixed => 1.0 / rate,
                    // Exponential gaps: -ln(U) / rate, U in (0, 1].
                    Arrivals::Poisson => -(1.0 - rng.r#gen::<f64>()).ln() / rate,
                };
                due += Duration::from_secs_f64(gap);
            }
        }
        None => {
            for _ in 0..run.in_flight.max(1) {
                let one = one.clone();
                let duration = args.duration;
                tasks.spawn(async move {
                    loop {
                        let now = Instant::now();
                        let due = now - started;
                        if due >= duration {
                            break;
                        }
                        one(due, now).await;
                    }
                });
            }
        }
    }
    drop(one);
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed();
    let mut samples = Vec::new();
    while let Ok(sample) = samples_rx.try_recv() {
        samples.push(sample);
    }
    let report = report(args, &samples, not_sent, elapsed)?;
    let text = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.report {
        std::fs::write(path, &text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn percentiles(histogram: &Histogram<u64>) -> serde_json::Value {
    let ms = |micros: u64| micros as f64 / 1000.0;
    json!({
        "p50": ms(histogram.value_at_quantile(0.50)),
        "p90": ms(histogram.value_at_quantile(0.90)),
        "p99": ms(histogram.value_at_quantile(0.99)),
        "p99_9": ms(histogram.value_at_quantile(0.999)),
        "max": ms(histogram.max()),
        "mean": histogram.mean() / 1000.0,
    })
}

fn report(
    args: &LatencyArgs,
    samples: &[Sample],
    not_sent: u64,
    elapsed: Duration,
) -> anyhow::Result<serde_json::Value> {
    let mut answered = histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut seconds: BTreeMap<u64, (u64, u64, Histogram<u64>)> = BTreeMap::new();
    for sample in samples {
        let micros = u64::try_from(sample.latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let second = seconds
            .entry(sample.due.as_secs())
            .or_insert_with(|| (0, 0, histogram()));
        match &sample.outcome {
            Outcome::Ok => {
                answered.saturating_record(micros);
                second.0 += 1;
                second.2.saturating_record(micros);
            }
            other => {
                second.1 += 1;
                let code = match other {
                    Outcome::Refused(code) => code.clone(),
                    Outcome::TimedOut => "timed_out".to_owned(),
                    _ => "no_answer".to_owned(),
                };
                *errors.entry(code).or_default() += 1;
            }
        }
    }
    let ok = answered.len();
    let timeline: Vec<_> = seconds
        .iter()
        .map(|(second, (ok, failed, latencies))| {
            json!({
                "second": second, "ok": ok, "errors": failed,
                "latency_ms": if latencies.is_empty() { json!(null) } else { percentiles(latencies) },
            })
        })
        .collect();
    Ok(json!({
        "bench": "latency",
        "loop": if args.rate.is_some() { "open" } else { "closed" },
        "rate": args.rate,
        "arrivals": args.rate.map(|_| format!("{:?}", args.arrivals).to_lowercase()),
        "duration_s": args.duration.as_secs_f64(),
        "texts_per_job": args.texts_per_job,
        "requests": samples.len() as u64 + not_sent,
        "ok": ok,
        "errors": errors,
        "not_sent": not_sent,
        "ok_per_s": ok as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
        "latency_ms": if ok == 0 { json!(null) } else { percentiles(&answered) },
        "timeline": timeline,
    }))
}
