//! JSON lines in and out. Input: one object per line with the row's id and text (blank lines
//! skipped). Output: one line per row, `{"id", "status": "ok", "vector"}` or `{"id", "status":
//! "failed", "code", "message"}`, appended a whole job at a time and flushed, so a kill leaves
//! whole jobs and at most one torn last line, which a resume cuts off before going on from the
//! row after the last whole line.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, BufWriter, Seek, Write},
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

use super::{BulkError, Row, RowResult, Rows, Sink, write_errors};

/// Jobs between two syncs to disk: durable against a crash of the machine every so often, not
/// after every job (a kill of the process loses nothing flushed).
const JOBS_PER_SYNC: u32 = 64;

/// The rows of `path` (`-`: standard input) from row `from_row` on, read as they are needed.
pub(super) fn read_rows(
    path: &Path,
    from_row: u64,
    id_field: String,
    text_field: String,
) -> Result<Rows, BulkError> {
    let input: Box<dyn BufRead + Send> = if path.as_os_str() == "-" {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let file = File::open(path).map_err(|source| BulkError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Box::new(BufReader::new(file))
    };
    let rows = input
        .lines()
        .enumerate()
        .filter(|(_, line)| line.as_ref().map_or(true, |line| !line.trim().is_empty()))
        .skip(usize::try_from(from_row).unwrap_or(usize::MAX))
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
        });
    Ok(Box::new(rows))
}

/// The rows (lines that are not blank) of a JSON-lines file, counted in one streaming pass.
pub(super) fn count_rows(path: &Path) -> Result<u64, BulkError> {
    let read = |source| BulkError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(read)?);
    let (mut rows, mut blank) = (0, true);
    loop {
        let buffer = reader.fill_buf().map_err(read)?;
        if buffer.is_empty() {
            return Ok(rows + u64::from(!blank));
        }
        for &byte in buffer {
            if byte == b'\n' {
                rows += u64::from(!blank);
                blank = true;
            } else if !byte.is_ascii_whitespace() {
                blank = false;
            }
        }
        let consumed = buffer.len();
        reader.consume(consumed);
    }
}

/// A JSON-lines output being appended to.
pub(super) struct Output {
    path: PathBuf,
    out: BufWriter<File>,
    rows_done: u64,
    jobs_since_sync: u32,
}

impl Output {
    /// Opens `path` for appending after its whole lines (a torn last line is cut off).
    pub(super) fn open(path: &Path) -> Result<Self, BulkError> {
        let rows_done = resume_point(path)?;
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(|source| BulkError::Write {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Output {
            path: path.to_owned(),
            out: BufWriter::new(file),
            rows_done,
            jobs_since_sync: 0,
        })
    }

    fn written(&self, source: std::io::Error) -> BulkError {
        BulkError::Write {
            path: self.path.display().to_string(),
            source,
        }
    }
}

impl Sink for Output {
    fn rows_done(&self) -> u64 {
        self.rows_done
    }

    fn write_job(&mut self, rows: Vec<RowResult>) -> Result<(), BulkError> {
        // One job's rows in one write: a kill leaves whole jobs and at most one torn line.
        let lines: String = rows.into_iter().map(output_line).collect();
        let written = self
            .out
            .write_all(lines.as_bytes())
            .and_then(|()| self.out.flush());
        written.map_err(|source| self.written(source))?;
        self.jobs_since_sync += 1;
        if self.jobs_since_sync == JOBS_PER_SYNC {
            let synced = self.out.get_ref().sync_data();
            synced.map_err(|source| self.written(source))?;
            self.jobs_since_sync = 0;
        }
        Ok(())
    }

    fn finish(self: Box<Self>, errors: Option<&Path>) -> Result<u64, BulkError> {
        let synced = self.out.get_ref().sync_all();
        synced.map_err(|source| self.written(source))?;
        let read = |source| BulkError::Read {
            path: self.path.display().to_string(),
            source,
        };
        let input = BufReader::new(File::open(&self.path).map_err(read)?);
        // The output's failed lines as they are: every line was checked by the resume or
        // written by this run.
        let failed = input.lines().filter_map(|line| match line {
            Ok(line) => {
                let ok = serde_json::from_str::<Status>(&line).is_ok_and(|row| row.status == "ok");
                (!ok).then_some(Ok(line))
            }
            Err(source) => Some(Err(read(source))),
        });
        write_errors(errors, failed)
    }
}

/// A row's output line, newline included.
fn output_line(row: RowResult) -> String {
    let line = match row.outcome {
        Ok(vector) => json!({"id": row.id, "status": "ok", "vector": vector}),
        Err(error) => json!({
            "id": row.id, "status": "failed", "code": error.code, "message": error.message
        }),
    };
    format!("{line}\n")
}

/// JSON lines on standard output, for a pipeline that reads them from a pipe. There is nothing
/// to resume from: a re-run writes every row again, and reads the jobs an earlier run got
/// answered back from the fleet's stored results instead of sending them.
pub(super) struct Stdout {
    /// The failed rows' lines, for the errors file: spooled to an unnamed temporary file, so
    /// memory stays bounded however many rows fail.
    failed: BufWriter<File>,
}

impl Stdout {
    pub(super) fn open() -> Result<Self, BulkError> {
        let spool = tempfile::tempfile().map_err(|source| BulkError::Write {
            path: "a temporary file".into(),
            source,
        })?;
        Ok(Stdout {
            failed: BufWriter::new(spool),
        })
    }
}

impl Sink for Stdout {
    fn rows_done(&self) -> u64 {
        0
    }

    fn write_job(&mut self, rows: Vec<RowResult>) -> Result<(), BulkError> {
        let mut lines = String::new();
        for row in rows {
            let failed = row.outcome.is_err();
            let line = output_line(row);
            if failed {
                let spooled = self.failed.write_all(line.as_bytes());
                spooled.map_err(|source| BulkError::Write {
                    path: "a temporary file".into(),
                    source,
                })?;
            }
            lines.push_str(&line);
        }
        let mut stdout = std::io::stdout().lock();
        stdout
            .write_all(lines.as_bytes())
            .and_then(|()| stdout.flush())
            .map_err(|source| BulkError::Write {
                path: "standard output".into(),
                source,
            })
    }

    fn finish(self: Box<Self>, errors: Option<&Path>) -> Result<u64, BulkError> {
        let spool_error = |source| BulkError::Read {
            path: "a temporary file".into(),
            source,
        };
        let mut spool = self
            .failed
            .into_inner()
            .map_err(|error| spool_error(error.into_error()))?;
        spool.rewind().map_err(spool_error)?;
        let failed = BufReader::new(spool)
            .lines()
            .map(|line| line.map_err(spool_error));
        write_errors(errors, failed)
    }
}

/// The one field of an output line that a resume and the errors file read: serde skips the
/// rest (the vector) without building it, several times faster than a whole `Value` over an
/// output of a million rows.
#[derive(serde::Deserialize)]
struct Status {
    status: Value,
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
        if let Err(error) = serde_json::from_str::<Status>(&line) {
            return Err(BulkError::Output {
                path: shown(),
                line: rows + 1,
                reason: error.to_string(),
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
