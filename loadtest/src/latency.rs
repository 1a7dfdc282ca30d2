//! `loadtest latency`: answer latency under a load that does not bend to the fleet's answers
//! (open loop: a fixed or Poisson arrival rate) or that waits for them (closed loop: a fixed
//! number in flight), by `infer` or by `submit` and the stored result (see [`crate::workload`]).
//!
//! In open loop every latency counts from the instant the request was due, not from when it
//! went out: a load generator that fell behind (or a fleet that stalled it) would otherwise
//! leave the waiting out of its figures (coordinated omission). Latencies go to an HDR
//! histogram (3 significant digits, 1 µs to 1 h).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use tokio::{sync::mpsc, time::Instant};

use crate::{
    Run, report,
    workload::{Outcome, Workload, WorkloadArgs},
};

#[derive(Debug, clap::Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
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
    /// Open loop: the most requests awaiting an answer; a request due beyond it is counted as
    /// not sent (the load generator, not the fleet, is saturated), never silently.
    #[arg(long, env = "LOADTEST_MAX_OUTSTANDING", default_value_t = 10_000)]
    max_outstanding: usize,
    #[command(flatten)]
    report: report::ReportArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Arrivals {
    Fixed,
    Poisson,
}

impl Arrivals {
    pub fn name(self) -> &'static str {
        match self {
            Arrivals::Fixed => "fixed",
            Arrivals::Poisson => "poisson",
        }
    }
}

/// The load of one run or sweep step.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    Open { rate: f64, arrivals: Arrivals },
    Closed { in_flight: usize },
}

impl Load {
    pub fn loop_name(self) -> &'static str {
        match self {
            Load::Open { .. } => "open",
            Load::Closed { .. } => "closed",
        }
    }
}

pub struct Sample {
    /// When it was due (open loop) or sent (closed loop), from the start of the whole run.
    due: Duration,
    latency: Duration,
    /// From when it was due until the fleet accepted it (async mode).
    accepted: Option<Duration>,
    outcome: Outcome,
    texts: u32,
}

/// What one stretch of load did.
pub struct Step {
    pub samples: Vec<Sample>,
    pub not_sent: u64,
    /// From the first request due to the last answer.
    pub elapsed: Duration,
    /// Microseconds of CPU per text answered ok, per watched process.
    pub cpu_us_per_text: serde_json::Map<String, Value>,
}

/// Runs `load` for `duration`, then waits for every answer. Times count from `origin`, so the
/// steps of a sweep share one timeline.
pub async fn run_step(
    run: &Arc<Run>,
    workload: &Arc<Workload>,
    load: Load,
    origin: Instant,
    duration: Duration,
    max_outstanding: usize,
) -> Step {
    let (samples_tx, mut samples_rx) = mpsc::unbounded_channel();
    let cpu_before = run.cpu.sample();
    let step_start = Instant::now();
    let one = {
        let (run, workload) = (Arc::clone(run), Arc::clone(workload));
        move |due_at: Instant| {
            let (run, workload, samples_tx) =
                (Arc::clone(&run), Arc::clone(&workload), samples_tx.clone());
            async move {
                let texts = workload.texts();
                let count = texts.len() as u32;
                let (outcome, accepted_at) = workload.request(&run, texts).await;
                let _ = samples_tx.send(Sample {
                    due: due_at - origin,
                    latency: due_at.elapsed(),
                    accepted: accepted_at.map(|at| at - due_at),
                    outcome,
                    texts: count,
                });
            }
        }
    };
    let mut not_sent = 0u64;
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Open { rate, arrivals } => {
            let mut offset = Duration::ZERO;
            let mut rng = StdRng::from_entropy();
            while offset < duration {
                let due_at = step_start + offset;
                tokio::time::sleep_until(due_at).await;
                while tasks.try_join_next().is_some() {}
                if tasks.len() >= max_outstanding {
                    not_sent += 1;
                } else {
                    // The latency counts from when the request was due, not from now.
                    tasks.spawn(one(due_at));
                }
                let gap = match arrivals {
                    Arrivals::Fixed => 1.0 / rate,
                    // Exponential gaps: -ln(U) / rate, U in (0, 1].
                    Arrivals::Poisson => -(1.0 - rng.r#gen::<f64>()).ln() / rate,
                };
                offset += Duration::from_secs_f64(gap);
            }
        }
        Load::Closed { in_flight } => {
            for _ in 0..in_flight.max(1) {
                let one = one.clone();
                tasks.spawn(async move {
                    loop {
                        let now = Instant::now();
                        if now - step_start >= duration {
                            break;
                        }
                        one(now).await;
                    }
                });
            }
        }
    }
    drop(one);
    while tasks.join_next().await.is_some() {}
    let elapsed = step_start.elapsed();
    let mut samples = Vec::new();
    while let Ok(sample) = samples_rx.try_recv() {
        samples.push(sample);
    }
    let texts_ok: u64 = samples
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Ok))
        .map(|s| u64::from(s.texts))
        .sum();
    let cpu_us_per_text = run
        .cpu
        .per_job(&cpu_before, &run.cpu.sample(), texts_ok as usize);
    Step {
        samples,
        not_sent,
        elapsed,
        cpu_us_per_text,
    }
}

pub async fn latency(run: &Arc<Run>, args: &LatencyArgs) -> anyhow::Result<()> {
    let workload = Arc::new(Workload::new(&args.workload)?);
    let load = match args.rate {
        Some(rate) => {
            anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be positive");
            Load::Open {
                rate,
                arrivals: args.arrivals,
            }
        }
        None => Load::Closed {
            in_flight: run.in_flight,
        },
    };
    let step = run_step(
        run,
        &workload,
        load,
        Instant::now(),
        args.duration,
        args.max_outstanding,
    )
    .await;
    let mut report = serde_json::Map::new();
    report.insert("bench".into(), json!("latency"));
    report.insert("loop".into(), json!(load.loop_name()));
    report.insert("rate".into(), json!(args.rate));
    report.insert(
        "arrivals".into(),
        json!(args.rate.map(|_| args.arrivals.name())),
    );
    report.insert(
        "in_flight".into(),
        json!(args.rate.is_none().then_some(run.in_flight)),
    );
    report.insert("duration_s".into(), json!(args.duration.as_secs_f64()));
    report.extend(workload.describe());
    report.extend(Summary::of(&step).json());
    report.insert("cpu_us_per_text".into(), json!(step.cpu_us_per_text));
    report.insert("timeline".into(), json!(timeline(&step.samples)));
    report::write(&args.report, &Value::Object(report))
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros())
        .unwrap_or(u64::MAX)
        .max(1)
}

fn percentiles(histogram: &Histogram<u64>) -> Value {
    if histogram.is_empty() {
        return Value::Null;
    }
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

/// Counts and percentiles of one step (or a whole latency run).
pub struct Summary {
    /// Sent and not sent.
    pub requests: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub not_sent: u64,
    texts_ok: u64,
    seconds: f64,
    latency: Histogram<u64>,
    accepted: Histogram<u64>,
}

impl Summary {
    pub fn of(step: &Step) -> Summary {
        let mut summary = Summary {
            requests: step.samples.len() as u64 + step.not_sent,
            ok: 0,
            errors: BTreeMap::new(),
            not_sent: step.not_sent,
            texts_ok: 0,
            seconds: step.elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
            latency: histogram(),
            accepted: histogram(),
        };
        for sample in &step.samples {
            if let Some(accepted) = sample.accepted {
                summary.accepted.saturating_record(micros(accepted));
            }
            match &sample.outcome {
                Outcome::Ok => {
                    summary.ok += 1;
                    summary.texts_ok += u64::from(sample.texts);
                    summary.latency.saturating_record(micros(sample.latency));
                }
                Outcome::Error(code) => *summary.errors.entry(code.clone()).or_default() += 1,
            }
        }
        summary
    }

    /// Answers ok per second, from the first request due to the last answer.
    pub fn ok_per_s(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// Errors among the requests sent.
    pub fn error_ratio(&self) -> f64 {
        let sent = self.requests - self.not_sent;
        self.errors.values().sum::<u64>() as f64 / sent.max(1) as f64
    }

    pub fn p99(&self) -> Option<Duration> {
        (!self.latency.is_empty())
            .then(|| Duration::from_micros(self.latency.value_at_quantile(0.99)))
    }

    pub fn json(&self) -> serde_json::Map<String, Value> {
        let mut fields = serde_json::Map::new();
        fields.insert("requests".into(), json!(self.requests));
        fields.insert("ok".into(), json!(self.ok));
        fields.insert("errors".into(), json!(self.errors));
        fields.insert("error_ratio".into(), json!(self.error_ratio()));
        fields.insert("not_sent".into(), json!(self.not_sent));
        fields.insert("texts_ok".into(), json!(self.texts_ok));
        fields.insert("seconds".into(), json!(self.seconds));
        fields.insert("ok_per_s".into(), json!(self.ok_per_s()));
        fields.insert(
            "texts_per_s".into(),
            json!(self.texts_ok as f64 / self.seconds),
        );
        fields.insert("latency_ms".into(), percentiles(&self.latency));
        if !self.accepted.is_empty() {
            fields.insert("accepted_ms".into(), percentiles(&self.accepted));
        }
        fields
    }
}

/// Per second of the run: requests due (`sent`, not-sent ones excluded), their outcomes and
/// latency percentiles by the second they were due, and ok answers by the second they came
/// (`completed_ok`: the throughput).
pub fn timeline<'a>(samples: impl IntoIterator<Item = &'a Sample>) -> Vec<Value> {
    #[derive(Default)]
    struct Second {
        sent: u64,
        ok: u64,
        errors: u64,
        completed_ok: u64,
        latency: Option<Histogram<u64>>,
    }
    let mut seconds: BTreeMap<u64, Second> = BTreeMap::new();
    for sample in samples {
        let due = seconds.entry(sample.due.as_secs()).or_default();
        due.sent += 1;
        match sample.outcome {
            Outcome::Ok => {
                due.ok += 1;
                due.latency
                    .get_or_insert_with(histogram)
                    .saturating_record(micros(sample.latency));
                seconds
                    .entry((sample.due + sample.latency).as_secs())
                    .or_default()
                    .completed_ok += 1;
            }
            Outcome::Error(_) => due.errors += 1,
        }
    }
    seconds
        .iter()
        .map(|(second, s)| {
            json!({
                "second": second, "sent": s.sent, "ok": s.ok, "errors": s.errors,
                "completed_ok": s.completed_ok,
                "latency_ms": s.latency.as_ref().map_or(Value::Null, percentiles),
            })
        })
        .collect()
}
