//! `fleet submit`'s progress on stderr: a bar (rows done, rate, ETA, failures, retries) while it
//! runs, and a summary line when it ends, always.

use std::{
    io::IsTerminal,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use fleet_client::bulk::{BulkError, BulkSummary};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

/// When to show the bar.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum When {
    /// Only when stderr is a terminal: a log file gets the summary alone.
    Auto,
    /// Also when stderr is not a terminal (a log), as a line at most every 10 s.
    Always,
    Never,
}

/// How often a log gets a progress line.
const LINE_EVERY: Duration = Duration::from_secs(10);

pub struct Bar {
    bar: Option<ProgressBar>,
    /// When stderr is not a terminal: the bar is hidden (it only keeps the rate and ETA), and
    /// a line is written when this long has passed since the last one.
    lines: Option<Mutex<Instant>>,
    /// Whether the bar has been moved to the rows an earlier run did (its first update).
    placed: AtomicBool,
    started: Instant,
}

impl Bar {
    /// A bar over the input's rows, when they can be counted (`total`; asked only when the bar
    /// is shown, as counting a JSON-lines file reads it once).
    pub fn new(
        when: When,
        total: impl FnOnce() -> Result<Option<u64>, BulkError>,
    ) -> Result<Bar, BulkError> {
        let terminal = std::io::stderr().is_terminal();
        let (target, lines) = match when {
            When::Never => (None, None),
            When::Auto | When::Always if terminal => (Some(ProgressDrawTarget::stderr()), None),
            When::Auto => (None, None),
            When::Always => (
                Some(ProgressDrawTarget::hidden()),
                Some(Mutex::new(Instant::now())),
            ),
        };
        let bar = match target {
            Some(target) => {
                let total = total()?;
                let template = match total {
                    Some(_) => {
                        "{elapsed_precise} {wide_bar} {pos}/{len} rows, {rate}, ETA {eta} {msg}"
                    }
                    None => "{elapsed_precise} {pos} rows, {rate} {msg}",
                };
                let style = ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .with_key(
                        "rate",
                        |state: &ProgressState, out: &mut dyn std::fmt::Write| {
                            let _ = write!(out, "{:.0} rows/s", state.per_sec());
                        },
                    );
                Some(ProgressBar::with_draw_target(total, target).with_style(style))
            }
            None => None,
        };
        Ok(Bar {
            bar,
            lines,
            placed: AtomicBool::new(false),
            started: Instant::now(),
        })
    }

    /// Shows the run's figures after a job was written.
    pub fn show(&self, summary: &BulkSummary) {
        let Some(bar) = &self.bar else { return };
        let done = summary.rows_already_done + summary.rows_ok + summary.rows_failed;
        bar.set_position(done);
        if !self.placed.swap(true, Ordering::Relaxed) {
            // The rows an earlier run did are not this run's rate.
            bar.reset_eta();
        }
        let message = format!(
            "{} failed, {} retries",
            summary.rows_failed, summary.retries
        );
        if let Some(last) = &self.lines {
            let mut last = last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if last.elapsed() >= LINE_EVERY {
                *last = Instant::now();
                let total = bar
                    .length()
                    .map_or(String::new(), |total| format!("/{total}"));
                eprintln!(
                    "{done}{total} rows, {:.0} rows/s, ETA {}, {message}",
                    bar.per_sec(),
                    humantime::format_duration(Duration::from_secs(bar.eta().as_secs()))
                );
            }
        }
        bar.set_message(message);
    }

    /// Clears the bar and prints the summary line (or leaves the bar as it was on an error).
    pub fn finish(self, summary: Result<BulkSummary, BulkError>) -> Result<BulkSummary, BulkError> {
        let summary = match summary {
            Ok(summary) => summary,
            Err(error) => {
                if let Some(bar) = &self.bar {
                    bar.abandon();
                }
                return Err(error);
            }
        };
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        let seconds = self.started.elapsed().as_secs_f64();
        let rows = summary.rows_ok + summary.rows_failed;
        eprintln!(
            "fleet submit: {rows} rows in {seconds:.1} s ({:.0} rows/s): {} ok, {} failed; {} \
             done by an earlier run; {} jobs sent ({} already queued, stored once), {} read back \
             from the fleet's results, {} retries; {} failed rows in the output",
            rows as f64 / seconds.max(1e-9),
            summary.rows_ok,
            summary.rows_failed,
            summary.rows_already_done,
            summary.jobs_sent,
            summary.jobs_duplicate,
            summary.jobs_from_store,
            summary.retries,
            summary.rows_failed_in_output,
        );
        Ok(summary)
    }
}
