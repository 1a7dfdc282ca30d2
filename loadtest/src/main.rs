//! `loadtest`: drives a live fleet and prints a report as JSON lines.
//!
//! * `dispatch`: signed jobs through one dispatcher (`fleet.submit.<model>`, each answer
//!   awaited) side by side with raw JetStream async publishing of same-shaped payloads from the
//!   same client, the same number in flight: the dispatcher's overhead as a ratio.
//! * `embed`: a corpus of texts through the whole fleet by request-reply (`fleet.infer`).
//! * `latency`: answer latency percentiles under an open-loop (fixed or Poisson rate) or
//!   closed-loop load, by request-reply (`infer`) or by `submit` and the stored result.
//! * `sweep`: the load stepped up until latency, errors or throughput break a bound; the knee.
//!
//! `latency` and `sweep` also write a report folder: JSON, Markdown and SVG plots.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use async_nats::{HeaderMap, jetstream};
use clap::{Parser, Subcommand, ValueEnum};
use fleet_client::{CallerArgs, Tenant};
use fleet_schemas::{ResultStatus, SubmitReply, SubmitStatus, decode, subject};
use fleet_service::positive_duration;
use futures::{StreamExt, stream};

mod cpu;
mod dist;
mod latency;
mod report;
mod sweep;
mod workload;

/// Fleet load generator.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version)]
struct Cli {
    #[command(flatten)]
    caller: CallerArgs,
    /// Requests in flight at once.
    #[arg(long, env = "LOADTEST_IN_FLIGHT", default_value_t = 256)]
    in_flight: usize,
    /// A process whose CPU time per job to report, as name=pid (repeatable; this process is
    /// always reported as `loadtest`).
    #[arg(long = "cpu-of", env = "LOADTEST_CPU_OF", value_delimiter = ',')]
    cpu_of: Vec<cpu::Watched>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Dispatcher intake against raw JetStream publishing.
    Dispatch {
        /// Jobs per phase.
        #[arg(long, env = "LOADTEST_JOBS", default_value_t = 20_000)]
        jobs: usize,
        /// Rounds; each round runs every phase, alternating which goes first.
        #[arg(long, env = "LOADTEST_ROUNDS", default_value_t = 3)]
        rounds: usize,
        /// Phases of a round. With `raw-jetstream`, FLEET_JOBS is purged before each phase
        /// (see --purge-fleet-jobs), which needs a Fleet user's rights; `dispatcher` alone
        /// needs only a tenant's (under the shipped broker config), and leaves the queued jobs
        /// in place.
        #[arg(
            long,
            env = "LOADTEST_PHASES",
            value_delimiter = ',',
            default_value = "raw-jetstream,dispatcher"
        )]
        phases: Vec<Phase>,
        /// Allows the `raw-jetstream` phase to empty FLEET_JOBS, every job queued there
        /// included: only for a fleet that exists for this benchmark.
        #[arg(long, env = "LOADTEST_PURGE_FLEET_JOBS")]
        purge_fleet_jobs: bool,
    },
    /// A corpus (`{"id", "text"}` per line) through the fleet by request-reply.
    Embed(EmbedArgs),
    /// Answer latency percentiles, errors by code and a per-second timeline, under an open-loop
    /// (--rate) or closed-loop (--in-flight) load.
    Latency(latency::LatencyArgs),
    /// The offered rate or the requests in flight stepped up until a step's p99, error ratio or
    /// throughput breaks a bound; reports the knee (the last step within the bounds).
    Sweep(sweep::SweepArgs),
}

#[derive(Debug, clap::Args)]
struct EmbedArgs {
    /// JSONL corpus, one `{"id", "text"}` object per line.
    #[arg(long, env = "LOADTEST_CORPUS")]
    corpus: PathBuf,
    /// Texts per job.
    #[arg(long, env = "LOADTEST_TEXTS_PER_JOB", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    texts_per_job: u16,
    /// Most texts taken from the corpus (0: all).
    #[arg(long, env = "LOADTEST_LIMIT", default_value_t = 0)]
    limit: usize,
    /// How long to wait for one answer.
    #[arg(long, env = "LOADTEST_TIMEOUT", default_value = "2m", value_parser = positive_duration)]
    timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (tenant, client) = cli.caller.connect().await?;
    let run = Arc::new(Run {
        client,
        tenant,
        model: cli.caller.model.clone(),
        in_flight: cli.in_flight,
        cpu: cpu::CpuWatch::new(&cli.cpu_of)?,
    });
    match cli.command {
        Command::Dispatch {
            jobs,
            rounds,
            phases,
            purge_fleet_jobs,
        } => {
            if phases.contains(&Phase::RawJetStream) && !purge_fleet_jobs {
                bail!(
                    "the raw-jetstream phase empties FLEET_JOBS (every job queued there) before \
                     each phase: give --purge-fleet-jobs if this fleet exists for the benchmark, \
                     or --phases dispatcher"
                );
            }
            dispatch(&run, jobs, rounds, &phases).await
        }
        Command::Embed(ref args) => embed(&run, args).await,
        Command::Latency(ref args) => latency::latency(&run, args).await,
        Command::Sweep(ref args) => sweep::sweep(&run, args).await,
    }
}

/// What every load run shares: the connection, the caller, the model, the concurrency and the
/// processes whose CPU time is reported.
struct Run {
    client: async_nats::Client,
    tenant: Tenant,
    model: String,
    in_flight: usize,
    cpu: cpu::CpuWatch,
}

/// `count` signed envelopes of one-text jobs, made before timing so signing is not measured,
/// each with the `Nats-Msg-Id` the dispatcher would queue it under.
fn signed_jobs(
    tenant: &Tenant,
    model: &str,
    count: usize,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let text = "A sentence of ordinary length to embed, about a dozen words long.";
    (0..count)
        .map(|_| {
            let job = tenant.embed_job(model, vec![text.to_owned()]);
            Ok((
                subject::msg_id(&job.tenant, &job.job_id),
                tenant.sign(&job)?,
            ))
        })
        .collect()
}

async fn dispatch(run: &Run, jobs: usize, rounds: usize, phases: &[Phase]) -> anyhow::Result<()> {
    let js = jetstream::new(run.client.clone());
    let purge = phases.contains(&Phase::RawJetStream);
    for round in 0..rounds {
        let mut phases = phases.to_vec();
        if round % 2 == 1 {
            phases.reverse();
        }
        for phase in phases {
            if purge {
                purge_jobs(&js).await?;
            }
            // Fresh ids per phase: the duplicate window would otherwise turn the second phase's
            // publishes into cheap duplicate acks.
            let payloads = signed_jobs(&run.tenant, &run.model, jobs)?;
            let cpu_before = run.cpu.sample();
            let started = Instant::now();
            match phase {
                Phase::RawJetStream => {
                    raw_publish(&js, &run.model, payloads, run.in_flight).await?
                }
                Phase::Dispatcher => {
                    through_dispatcher(&run.client, &run.model, payloads, run.in_flight).await?
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            let cpu_us_per_job = run.cpu.per_job(&cpu_before, &run.cpu.sample(), jobs);
            println!(
                "{}",
                serde_json::json!({
                    "bench": "dispatch", "round": round, "phase": phase.name(), "jobs": jobs,
                    "in_flight": run.in_flight, "seconds": seconds, "jobs_per_s": jobs as f64 / seconds,
                    "cpu_us_per_job": cpu_us_per_job,
                })
            );
        }
    }
    if purge {
        purge_jobs(&js).await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Phase {
    RawJetStream,
    Dispatcher,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::RawJetStream => "raw_jetstream",
            Phase::Dispatcher => "dispatcher",
        }
    }
}

async fn purge_jobs(js: &jetstream::Context) -> anyhow::Result<()> {
    js.get_stream(subject::JOBS_STREAM)
        .await
        .context("FLEET_JOBS must exist: start a dispatcher first")?
        .purge()
        .await
        .context("cannot purge FLEET_JOBS")?;
    Ok(())
}

async fn raw_publish(
    js: &jetstream::Context,
    model: &str,
    payloads: Vec<(String, Vec<u8>)>,
    in_flight: usize,
) -> anyhow::Result<()> {
    let target = subject::jobs(model);
    let results: Vec<anyhow::Result<()>> = stream::iter(payloads)
        .map(|(msg_id, payload)| {
            let target = target.clone();
            async move {
                let mut headers = HeaderMap::new();
                headers.insert(subject::MSG_ID, msg_id.as_str());
                let ack = js
                    .publish_with_headers(target, headers, payload.into())
                    .await?
                    .await?;
                if ack.duplicate {
                    bail!("unexpected duplicate");
                }
                Ok(())
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn through_dispatcher(
    client: &async_nats::Client,
    model: &str,
    payloads: Vec<(String, Vec<u8>)>,
    in_flight: usize,
) -> anyhow::Result<()> {
    let target = subject::submit(model);
    let results: Vec<anyhow::Result<()>> = stream::iter(payloads)
        .map(|(_, payload)| {
            let target = target.clone();
            async move {
                let answer = client.request(target, payload.into()).await?;
                let reply: SubmitReply = decode(&answer.payload, 1 << 20)?;
                if reply.status != SubmitStatus::Accepted || reply.duplicate {
                    bail!("job not freshly accepted: {reply:?}");
                }
                Ok(())
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await;
    results.into_iter().collect()
}

async fn embed(run: &Run, args: &EmbedArgs) -> anyhow::Result<()> {
    let timeout = args.timeout;
    let texts_per_job = usize::from(args.texts_per_job);
    let mut texts = workload::read_corpus(&args.corpus)?;
    if args.limit > 0 {
        texts.truncate(args.limit);
    }
    let total = texts.len();
    let cpu_before = run.cpu.sample();
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = stream::iter(texts.chunks(texts_per_job))
        .map(|chunk| {
            async move {
                // Signed at send time: a job must be fresh when it reaches the dispatcher.
                let job = run.tenant.embed_job(&run.model, chunk.to_vec());
                let result = fleet_client::infer(&run.client, &run.tenant, &job, timeout).await?;
                if result.status != ResultStatus::Ok {
                    bail!(
                        "job {} answered {:?}: {:?}",
                        job.job_id,
                        result.status,
                        result.error
                    );
                }
                Ok(())
            }
        })
        .buffer_unordered(run.in_flight)
        .collect()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let cpu_us_per_text = run.cpu.per_job(&cpu_before, &run.cpu.sample(), total);
    let failures = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(first)) = results.into_iter().find(|r| r.is_err()) {
        bail!("{failures} jobs failed; first: {first:#}");
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "embed_end_to_end", "texts": total, "texts_per_job": texts_per_job,
            "in_flight": run.in_flight, "seconds": seconds, "texts_per_s": total as f64 / seconds,
            "cpu_us_per_text": cpu_us_per_text,
        })
    );
    Ok(())
}
