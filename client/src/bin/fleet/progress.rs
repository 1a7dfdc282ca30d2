//! `fleet submit`'s progress on stderr: a bar (rows done, rate, ETA, failures, retries) while it
//! runs, and a summary line when it ends, always.

use std::{
    io::IsTerminal,
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use fleet_client::bulk::{BulkError, BulkSummary};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};

/// When to show the bar.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum When {
    /// Only when stderr is a terminal: a log file gets the summary alone.
    Auto,
    /// Also when stderr is not a terminal, as a line a second.
    Always,
    Never,
}

pub struct Bar {
    bar: Option<ProgressBar>,
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
        let target = match when {
            When::Never => None,
            When::Auto | When::Always if terminal => Some(ProgressDrawTarget::stderr()),
            When::Auto => None,
            When::Always => Some(ProgressDrawTarget::term_like_with_hz(Box::new(Lines), 1)),
        };
        let bar = match target {
            Some(target) => {
                let total = total()?;
                let template = match total {
                    Some(_) => {
                        "{elapsed_precise} {wide_bar} {pos}/{len} rows, {per_sec}, ETA {eta} {msg}"
                    }
                    None => "{elapsed_precise} {pos} rows, {per_sec} {msg}",
                };
                let style = ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                Some(ProgressBar::with_draw_target(total, target).with_style(style))
            }
            None => None,
        };
        Ok(Bar {
            bar,
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
        bar.set_message(format!(
            "{} failed, {} retries",
            summary.rows_failed, summary.retries
        ));
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
             done by an earlier run; {} jobs sent, {} read back from the fleet's results, {} \
             retries; {} failed rows in the output",
            rows as f64 / seconds.max(1e-9),
            summary.rows_ok,
            summary.rows_failed,
            summary.rows_already_done,
            summary.jobs_sent,
            summary.jobs_from_store,
            summary.retries,
            summary.rows_failed_in_output,
        );
        Ok(summary)
    }
}

/// A draw target for stderr that is not a terminal: each redraw is a new line, as a log wants.
#[derive(Debug)]
struct Lines;

impl TermLike for Lines {
    fn width(&self) -> u16 {
        100
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, line: &str) -> std::io::Result<()> {
        eprintln!("{line}");
        Ok(())
    }
    fn write_str(&self, text: &str) -> std::io::Result<()> {
        eprint!("{text}");
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
}
