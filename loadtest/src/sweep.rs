//! `loadtest sweep`: the offered rate (open loop) or the requests in flight (closed loop)
//! stepped up until a step breaks a bound: its p99, its error ratio, or throughput that no
//! longer follows the load. The knee is the last step that met every bound: the most load the
//! fleet carries at that latency.
//!
//! Each step sends for `--step-duration`, then waits for its answers before the next starts,
//! so a step's backlog never counts against the next one.

use std::{sync::Arc, time::Duration};

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{
    Run,
    latency::{Arrivals, Load, Step, Summary, run_step, timeline},
    report,
    workload::{Workload, WorkloadArgs},
};

#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// What is stepped up: `open`, the offered rate (requests/s); `closed`, the requests in
    /// flight (--in-flight is not used).
    #[arg(
        long = "loop",
        env = "LOADTEST_SWEEP_LOOP",
        value_enum,
        default_value = "open"
    )]
    loop_kind: LoopKind,
    /// Open loop: how requests arrive, evenly spaced or as a Poisson process.
    #[arg(long, env = "LOADTEST_ARRIVALS", value_enum, default_value = "fixed")]
    arrivals: Arrivals,
    /// The first step's rate (open loop) or requests in flight (closed loop).
    #[arg(long, env = "LOADTEST_SWEEP_START")]
    start: f64,
    /// Each step's load is the previous one's times this (2 when neither this nor --step is
    /// given).
    #[arg(long, env = "LOADTEST_SWEEP_FACTOR", conflicts_with = "step")]
    factor: Option<f64>,
    /// Each step's load is the previous one's plus this.
    #[arg(long, env = "LOADTEST_SWEEP_STEP")]
    step: Option<f64>,
    /// How long each step sends (e.g. `10s`).
    #[arg(long, env = "LOADTEST_STEP_DURATION", default_value = "10s", value_parser = fleet_service::positive_duration)]
    step_duration: Duration,
    /// The most steps, whatever the bounds say.
    #[arg(long, env = "LOADTEST_MAX_STEPS", default_value_t = 20)]
    max_steps: usize,
    /// Bound: a step's p99 latency above this ends the sweep (e.g. `500ms`).
    #[arg(long, env = "LOADTEST_MAX_P99", default_value = "1s", value_parser = humantime::parse_duration)]
    max_p99: Duration,
    /// Bound: a step with a larger share of its requests failed ends the sweep.
    #[arg(long, env = "LOADTEST_MAX_ERROR_RATIO", default_value_t = 0.01)]
    max_error_ratio: f64,
    /// Bound: throughput must follow the load. Open loop: answers per second at least this
    /// fraction of the offered rate. Closed loop: throughput at least this fraction of the
    /// previous step's scaled by the growth in requests in flight (Little's law at constant
    /// latency).
    #[arg(long, env = "LOADTEST_MIN_FOLLOW", default_value_t = 0.9)]
    min_follow: f64,
    /// Open loop: the most requests awaiting an answer; a request due beyond it is counted as
    /// not sent and ends the sweep (the load generator is saturated, not the fleet).
    #[arg(long, env = "LOADTEST_MAX_OUTSTANDING", default_value_t = 10_000)]
    max_outstanding: usize,
    #[command(flatten)]
    report: report::ReportArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LoopKind {
    Open,
    Closed,
}

impl SweepArgs {
    fn load(&self, offered: f64) -> Load {
        match self.loop_kind {
            LoopKind::Open => Load::Open {
                rate: offered,
                arrivals: self.arrivals,
            },
            LoopKind::Closed => Load::Closed {
                in_flight: offered as usize,
            },
        }
    }

    /// The load after `offered`. Requests in flight are whole and each step adds at least one.
    fn next(&self, offered: f64) -> f64 {
        let next = match (self.step, self.factor) {
            (Some(step), _) => offered + step,
            (None, factor) => offered * factor.unwrap_or(2.0),
        };
        match self.loop_kind {
            LoopKind::Open => next,
            LoopKind::Closed => next.round().max(offered + 1.0),
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        let positive = |value: f64| value.is_finite() && value > 0.0;
        anyhow::ensure!(positive(self.start), "--start must be positive");
        if self.loop_kind == LoopKind::Closed {
            anyhow::ensure!(
                self.start.fract() == 0.0,
                "--start is a count of requests in flight in closed loop"
            );
        }
        anyhow::ensure!(
            self.factor.is_none_or(|f| f.is_finite() && f > 1.0),
            "--factor must be above 1"
        );
        anyhow::ensure!(self.step.is_none_or(positive), "--step must be positive");
        anyhow::ensure!(self.max_steps > 0, "--max-steps must be at least 1");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.max_error_ratio),
            "--max-error-ratio is a ratio between 0 and 1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.min_follow),
            "--min-follow is a ratio between 0 and 1"
        );
        Ok(())
    }

    /// The bounds `summary` breaks, in words (none: the step meets them all). `previous` is the
    /// step before, its load and its throughput.
    fn broken_bounds(
        &self,
        offered: f64,
        summary: &Summary,
        previous: Option<(f64, f64)>,
    ) -> Vec<String> {
        let mut broken = Vec::new();
        match summary.p99() {
            Some(p99) if p99 <= self.max_p99 => {}
            Some(p99) => broken.push(format!(
                "p99 {:.1} ms above {:.1} ms",
                p99.as_secs_f64() * 1000.0,
                self.max_p99.as_secs_f64() * 1000.0
            )),
            None => broken.push("no request answered ok".to_owned()),
        }
        if summary.error_ratio() > self.max_error_ratio {
            broken.push(format!(
                "error ratio {:.4} above {}",
                summary.error_ratio(),
                self.max_error_ratio
            ));
        }
        if summary.not_sent > 0 {
            broken.push(format!(
                "{} requests not sent: the load generator is saturated",
                summary.not_sent
            ));
        }
        let achieved = summary.ok_per_s();
        match self.loop_kind {
            LoopKind::Open if achieved < self.min_follow * offered => broken.push(format!(
                "{achieved:.1} answers/s, under {} of the {offered} offered",
                self.min_follow
            )),
            LoopKind::Closed => {
                if let Some((previous_offered, previous_achieved)) = previous {
                    let expected = previous_achieved * offered / previous_offered;
                    if achieved < self.min_follow * expected {
                        broken.push(format!(
                            "{achieved:.1} answers/s, under {} of the {expected:.1} that \
                             {offered} in flight would carry at the previous step's latency",
                            self.min_follow
                        ));
                    }
                }
            }
            LoopKind::Open => {}
        }
        broken
    }
}

pub async fn sweep(run: &Arc<Run>, args: &SweepArgs) -> anyhow::Result<()> {
    args.check()?;
    let workload = Arc::new(Workload::new(&args.workload)?);
    let origin = Instant::now();
    let mut offered = args.start;
    let mut steps: Vec<Value> = Vec::new();
    let mut samples: Vec<Step> = Vec::new();
    let mut knee = Value::Null;
    let mut stop_reason = format!("{} steps, all within the bounds", args.max_steps);
    let mut previous = None;
    for index in 0..args.max_steps {
        let load = args.load(offered);
        let started = origin.elapsed();
        let step = run_step(
            run,
            &workload,
            load,
            origin,
            args.step_duration,
            args.max_outstanding,
        )
        .await;
        let summary = Summary::of(&step);
        let broken = args.broken_bounds(offered, &summary, previous);
        let mut described = serde_json::Map::new();
        described.insert("step".into(), json!(index));
        described.insert("offered".into(), json!(offered));
        described.insert("started_s".into(), json!(started.as_secs_f64()));
        described.extend(summary.json());
        described.insert("cpu_us_per_text".into(), json!(step.cpu_us_per_text));
        described.insert("meets_bounds".into(), json!(broken.is_empty()));
        described.insert("broken_bounds".into(), json!(broken));
        eprintln!("{}", Value::Object(described.clone()));
        let described = Value::Object(described);
        steps.push(described.clone());
        samples.push(step);
        if !broken.is_empty() {
            stop_reason = format!("step {index} ({offered}): {}", broken.join("; "));
            break;
        }
        knee = described;
        previous = Some((offered, summary.ok_per_s()));
        offered = args.next(offered);
    }
    let report = json!({
        "bench": "sweep",
        "loop": args.load(args.start).loop_name(),
        "arrivals": (args.loop_kind == LoopKind::Open).then_some(args.arrivals.name()),
        "offered_unit": match args.loop_kind {
            LoopKind::Open => "requests/s",
            LoopKind::Closed => "requests in flight",
        },
        "step_duration_s": args.step_duration.as_secs_f64(),
        "workload": workload.describe(),
        "bounds": {
            "max_p99_ms": args.max_p99.as_secs_f64() * 1000.0,
            "max_error_ratio": args.max_error_ratio,
            "min_follow": args.min_follow,
        },
        "steps": steps,
        "knee": knee,
        "stop_reason": stop_reason,
        "timeline": timeline(samples.iter().flat_map(|step| &step.samples)),
    });
    report::write(&args.report, &report)
}
