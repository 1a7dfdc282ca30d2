//! The bounded buffer between the code that logs and the task that sends: pushing never waits
//! on the network; when the buffer is full the oldest line goes, counted.
//!
//! A std mutex guards a ring of lines: a push holds it for a `VecDeque` push (and maybe a pop),
//! never across an await or any I/O, so a logging thread waits at most for another push or for
//! the sender taking a batch out (a `mem::take`-sized move).

use std::{
    collections::VecDeque,
    sync::{Mutex, MutexGuard},
};

use tokio::sync::Notify;

use crate::{
    Index,
    metrics::{DropReason, ShippingMetrics},
};

/// One serialised document and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub index: Index,
    /// The UTC day of its timestamp, `YYYY.MM.DD`: the index's suffix.
    pub day: Day,
    /// The document, one line of JSON.
    pub json: String,
}

/// A UTC day as the index suffix spells it, `YYYY.MM.DD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Day([u8; 10]);

impl Day {
    /// The day of an RFC 3339 timestamp (`YYYY-MM-DDT...`, as humantime writes it).
    pub fn of_rfc3339(timestamp: &str) -> Option<Day> {
        let date = timestamp.as_bytes().get(..10)?;
        let mut day = [0u8; 10];
        for (out, &byte) in day.iter_mut().zip(date) {
            *out = match byte {
                b'-' => b'.',
                b'0'..=b'9' => byte,
                _ => return None,
            };
        }
        (day[4] == b'.' && day[7] == b'.').then_some(Day(day))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits and dots are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("0000.00.00")
    }
}

/// Lines waiting to be sent, at most `capacity`, none over `max_line_bytes`.
pub struct Buffer {
    lines: Mutex<VecDeque<Line>>,
    capacity: usize,
    max_line_bytes: usize,
    /// Wakes the sender when a batch is ready.
    batch_lines: usize,
    pub(crate) ready: Notify,
    metrics: ShippingMetrics,
}

impl Buffer {
    /// A buffer of `capacity` lines (at least 1); `batch_lines` wakes the sender early.
    pub fn new(
        capacity: usize,
        max_line_bytes: usize,
        batch_lines: usize,
        metrics: ShippingMetrics,
    ) -> Buffer {
        let capacity = capacity.max(1);
        metrics
            .capacity
            .set(i64::try_from(capacity).unwrap_or(i64::MAX));
        Buffer {
            // Grown as lines come: a quiet process never holds the full capacity.
            lines: Mutex::new(VecDeque::new()),
            capacity,
            max_line_bytes,
            batch_lines: batch_lines.max(1),
            ready: Notify::new(),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Line>> {
        // Nothing panics while holding the lock; a poisoned one still holds valid lines.
        self.lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a line, dropping the oldest when full; a line over the size cap is dropped itself.
    pub fn push(&self, line: Line) {
        if line.json.len() > self.max_line_bytes {
            self.metrics.dropped(DropReason::TooLarge, 1);
            return;
        }
        let (len, dropped) = {
            let mut lines = self.lock();
            let dropped = if lines.len() >= self.capacity {
                lines.pop_front()
            } else {
                None
            };
            lines.push_back(line);
            (lines.len(), dropped)
        };
        // The dropped line is freed outside the lock.
        if dropped.is_some() {
            self.metrics.dropped(DropReason::BufferFull, 1);
        }
        self.metrics.buffered.set(len as i64);
        if len >= self.batch_lines {
            self.ready.notify_one();
        }
    }

    /// Takes up to `max` of the oldest lines out.
    pub fn take(&self, max: usize) -> Vec<Line> {
        let (batch, len) = {
            let mut lines = self.lock();
            let count = max.min(lines.len());
            let batch: Vec<Line> = lines.drain(..count).collect();
            // A buffer drained after an outage gives its memory back.
            if lines.is_empty() {
                lines.shrink_to(self.batch_lines);
            }
            (batch, lines.len())
        };
        self.metrics.buffered.set(len as i64);
        batch
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str) -> Line {
        Line {
            index: Index::Logs,
            day: Day::of_rfc3339("2026-12-03T15:00:00Z").expect("a day"),
            json: text.to_owned(),
        }
    }

    fn texts(lines: &[Line]) -> Vec<&str> {
        lines.iter().map(|line| line.json.as_str()).collect()
    }

    #[test]
    fn a_full_buffer_drops_its_oldest_lines_and_counts_them() {
        let metrics = ShippingMetrics::default();
        let buffer = Buffer::new(3, 1024, 100, metrics.clone());
        for text in ["1", "2", "3", "4", "5"] {
            buffer.push(line(text));
        }
        assert_eq!(buffer.len(), 3, "bounded by its capacity");
        assert_eq!(metrics.dropped_total(DropReason::BufferFull), 2);
        assert_eq!(metrics.buffered.get(), 3);
        assert_eq!(metrics.capacity.get(), 3);
        assert_eq!(
            texts(&buffer.take(10)),
            ["3", "4", "5"],
            "the newest kept, in order"
        );
        assert_eq!(metrics.buffered.get(), 0);
        assert_eq!(metrics.dropped_total(DropReason::TooLarge), 0);
    }

    #[test]
    fn a_line_over_the_size_cap_is_dropped_and_counted() {
        let metrics = ShippingMetrics::default();
        let buffer = Buffer::new(10, 8, 100, metrics.clone());
        buffer.push(line("12345678"));
        buffer.push(line("123456789"));
        assert_eq!(texts(&buffer.take(10)), ["12345678"], "the cap itself fits");
        assert_eq!(metrics.dropped_total(DropReason::TooLarge), 1);
        assert_eq!(metrics.dropped_total(DropReason::BufferFull), 0);
    }

    #[test]
    fn take_gives_the_oldest_lines_a_batch_at_a_time() {
        let buffer = Buffer::new(10, 1024, 100, ShippingMetrics::default());
        for text in ["a", "b", "c"] {
            buffer.push(line(text));
        }
        assert_eq!(texts(&buffer.take(2)), ["a", "b"]);
        assert_eq!(texts(&buffer.take(2)), ["c"]);
        assert!(buffer.take(2).is_empty());
        assert!(buffer.is_empty());
    }

    #[tokio::test]
    async fn a_full_batch_wakes_the_sender() {
        let buffer = Buffer::new(10, 1024, 2, ShippingMetrics::default());
        buffer.push(line("a"));
        let woken = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            buffer.ready.notified(),
        );
        assert!(woken.await.is_err(), "one line is not a batch");
        buffer.push(line("b"));
        tokio::time::timeout(std::time::Duration::from_secs(5), buffer.ready.notified())
            .await
            .expect("two lines are");
    }

    #[test]
    fn days_are_read_from_rfc3339_timestamps() {
        let day = Day::of_rfc3339("2026-01-31T23:59:59.999999Z").expect("a day");
        assert_eq!(day.as_str(), "2026.01.31");
        assert_eq!(Day::of_rfc3339("2026-01"), None);
        assert_eq!(Day::of_rfc3339("yesterday at noon"), None);
    }
}
