//! Parquet in and out.
//!
//! Input: a file with an id column (strings, or 32/64-bit integers) and a text column (strings),
//! read by record batches of [`BATCH_ROWS`] rows from the footer's row groups, only those two
//! columns, from the resume row on: never the whole file.
//!
//! Output: one row per input row, in input order: `id` (string; a JSON-lines input's non-string
//! id as its JSON text), `vector` (`List<Float32>`, null for a failed row), `status` (`ok` or
//! `failed`), `code` and `message` (null for an ok row).
//!
//! Crash safety and resume. A Parquet file is whole only once its footer is written, so the
//! output cannot be appended to job by job as JSON lines are. Instead, while a run goes on, its
//! rows are committed in parts: `<output>.parts/part-NNNNNN.parquet`, each a whole Parquet file
//! of the next `rows_per_part` rows (whole jobs), written as `<part>.tmp`, synced, then renamed,
//! so a part either exists whole or not at all. When the input is done, the parts are copied in
//! order into `<output>.partial`, which is synced and renamed to the output, and only then are
//! the parts removed. The progress of a run is therefore the output itself, never a side record:
//! - the output file exists: the run finished (parts still there are a finished merge's, left
//!   by a kill before their removal, and are removed);
//! - else the committed parts, numbered from 0 without a gap, hold the rows done, counted from
//!   their footers; a `.tmp` part (killed while writing) is removed, and its rows are asked for
//!   again: their jobs' results are stored in `FLEET_RESULTS`, so they are read back, not sent.
//!
//! Parts have a fixed size and the final file's row groups ([`ROW_GROUP_ROWS`]) do not depend on
//! the parts, so a run killed and resumed writes the same bytes as an uninterrupted one.

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
};

use arrow_array::{
    Array, ArrayRef, RecordBatch,
    builder::{Float32Builder, ListBuilder, StringBuilder},
    cast::AsArray,
    types::{Int32Type, Int64Type},
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use parquet::{
    arrow::{ArrowWriter, ProjectionMask, arrow_reader::ParquetRecordBatchReaderBuilder},
    basic::Compression,
    file::properties::WriterProperties,
};
use serde_json::{Value, json};

use super::{BulkError, Row, RowResult, Rows, Sink, write_errors};

/// Rows decoded at once from the input (and from parts when merging).
const BATCH_ROWS: usize = 1024;
/// Rows per row group of the finished output: a writer holds one row group in memory (about
/// 1.6 KB a row with 384-dimension vectors).
const ROW_GROUP_ROWS: usize = 4096;

fn parquet_error(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> BulkError + '_ {
    move |error| BulkError::Parquet {
        path: path.display().to_string(),
        reason: error.to_string(),
    }
}

fn arrow_error(path: &Path) -> impl Fn(arrow_schema::ArrowError) -> BulkError + '_ {
    move |error| BulkError::Parquet {
        path: path.display().to_string(),
        reason: error.to_string(),
    }
}

fn io_read(path: &Path) -> impl Fn(std::io::Error) -> BulkError + '_ {
    move |source| BulkError::Read {
        path: path.display().to_string(),
        source,
    }
}

fn io_write(path: &Path) -> impl Fn(std::io::Error) -> BulkError + '_ {
    move |source| BulkError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// The rows of a Parquet file, as its footer says.
pub(super) fn count_rows(path: &Path) -> Result<u64, BulkError> {
    let file = File::open(path).map_err(io_read(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_error(path))?;
    Ok(u64::try_from(builder.metadata().file_metadata().num_rows()).unwrap_or(0))
}

/// The rows of `path` from row `from_row` on, read a batch at a time.
pub(super) fn read_rows(
    path: &Path,
    from_row: u64,
    id_field: &str,
    text_field: &str,
) -> Result<Rows, BulkError> {
    let file = File::open(path).map_err(io_read(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_error(path))?;
    let schema = builder.schema().clone();
    let column = |name: &str, accepts: &[DataType]| {
        let columns = || {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            names.join(", ")
        };
        let index = schema.index_of(name).map_err(|_| BulkError::Parquet {
            path: path.display().to_string(),
            reason: format!("no column {name:?} (it has: {})", columns()),
        })?;
        let data_type = schema.field(index).data_type();
        if !accepts.contains(data_type) {
            return Err(BulkError::Parquet {
                path: path.display().to_string(),
                reason: format!("column {name:?} is {data_type}, not one of {accepts:?}"),
            });
        }
        Ok(index)
    };
    let strings = [DataType::Utf8, DataType::LargeUtf8, DataType::Utf8View];
    let mut ids = strings.to_vec();
    ids.extend([DataType::Int64, DataType::Int32]);
    let id_index = column(id_field, &ids)?;
    let text_index = column(text_field, &strings)?;
    let projection = ProjectionMask::roots(builder.parquet_schema(), [id_index, text_index]);
    let reader = builder
        .with_projection(projection)
        .with_batch_size(BATCH_ROWS)
        .with_offset(usize::try_from(from_row).unwrap_or(usize::MAX))
        .build()
        .map_err(parquet_error(path))?;
    let (shown, id_field, text_field) = (
        path.display().to_string(),
        id_field.to_owned(),
        text_field.to_owned(),
    );
    let mut next_row = from_row;
    let rows = reader.flat_map(move |batch| {
        let first = next_row;
        let rows: Vec<Result<Row, BulkError>> = match batch {
            Ok(batch) => {
                next_row += batch.num_rows() as u64;
                rows_of(&batch, &id_field, &text_field, first, &shown)
            }
            Err(error) => vec![Err(BulkError::Parquet {
                path: shown.clone(),
                reason: error.to_string(),
            })],
        };
        rows
    });
    Ok(Box::new(rows))
}

/// The rows of one batch (its columns' types were checked when the file was opened).
fn rows_of(
    batch: &RecordBatch,
    id_field: &str,
    text_field: &str,
    first: u64,
    path: &str,
) -> Vec<Result<Row, BulkError>> {
    let (Some(ids), Some(texts)) = (
        batch.column_by_name(id_field),
        batch.column_by_name(text_field),
    ) else {
        return vec![Err(BulkError::Parquet {
            path: path.to_owned(),
            reason: "a record batch without the id or text column".into(),
        })];
    };
    (0..batch.num_rows())
        .map(|i| {
            let bad = |reason: String| BulkError::ParquetRow {
                path: path.to_owned(),
                row: first + i as u64 + 1,
                reason,
            };
            let id = cell(ids, i).ok_or_else(|| bad(format!("{id_field:?} is null")))?;
            let Some(Value::String(text)) = cell(texts, i) else {
                return Err(bad(format!("{text_field:?} is null")));
            };
            Ok(Row { id, text })
        })
        .collect()
}

/// A cell of a string or integer column as JSON (the form job ids are derived from, so a
/// Parquet row and a JSON-lines row with the same id and text make the same job); None if null.
fn cell(column: &ArrayRef, i: usize) -> Option<Value> {
    if column.is_null(i) {
        return None;
    }
    if let Some(array) = column.as_string_opt::<i32>() {
        Some(array.value(i).into())
    } else if let Some(array) = column.as_string_opt::<i64>() {
        Some(array.value(i).into())
    } else if let Some(array) = column.as_string_view_opt() {
        Some(array.value(i).into())
    } else if let Some(array) = column.as_primitive_opt::<Int64Type>() {
        Some(array.value(i).into())
    } else {
        column
            .as_primitive_opt::<Int32Type>()
            .map(|array| array.value(i).into())
    }
}

fn output_schema() -> SchemaRef {
    let item = Arc::new(Field::new_list_field(DataType::Float32, false));
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("vector", DataType::List(item), true),
        Field::new("status", DataType::Utf8, false),
        Field::new("code", DataType::Utf8, true),
        Field::new("message", DataType::Utf8, true),
    ]))
}

fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build()
}

fn batch_of(rows: Vec<RowResult>, path: &Path) -> Result<RecordBatch, BulkError> {
    let item = Arc::new(Field::new_list_field(DataType::Float32, false));
    let mut ids = StringBuilder::new();
    let mut vectors = ListBuilder::new(Float32Builder::new()).with_field(item);
    let (mut statuses, mut codes, mut messages) = (
        StringBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    for row in rows {
        match row.id {
            Value::String(id) => ids.append_value(id),
            other => ids.append_value(other.to_string()),
        }
        match row.outcome {
            Ok(vector) => {
                vectors.values().append_slice(&vector);
                vectors.append(true);
                statuses.append_value("ok");
                codes.append_null();
                messages.append_null();
            }
            Err(error) => {
                vectors.append_null();
                statuses.append_value("failed");
                codes.append_value(error.code);
                messages.append_value(error.message);
            }
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(vectors.finish()),
        Arc::new(statuses.finish()),
        Arc::new(codes.finish()),
        Arc::new(messages.finish()),
    ];
    RecordBatch::try_new(output_schema(), columns).map_err(arrow_error(path))
}

/// Writes `batches` as a new Parquet file at `path` by way of `<path><suffix>`: written, synced,
/// renamed, and the rename synced, so `path` is either whole or absent.
fn write_file_atomically(
    path: &Path,
    suffix: &str,
    batches: impl Iterator<Item = Result<RecordBatch, BulkError>>,
) -> Result<(), BulkError> {
    let partial = PathBuf::from(format!("{}{suffix}", path.display()));
    let file = File::create(&partial).map_err(io_write(&partial))?;
    let mut writer = ArrowWriter::try_new(file, output_schema(), Some(writer_properties()))
        .map_err(parquet_error(&partial))?;
    for batch in batches {
        writer.write(&batch?).map_err(parquet_error(&partial))?;
    }
    let file = writer.into_inner().map_err(parquet_error(&partial))?;
    file.sync_all().map_err(io_write(&partial))?;
    std::fs::rename(&partial, path).map_err(io_write(path))?;
    sync_dir(path)
}

/// Makes a rename in `path`'s folder durable.
fn sync_dir(path: &Path) -> Result<(), BulkError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_write(dir))
}

/// A reader of an output file (or part), once its columns are checked to be an output's.
fn open_output(path: &Path) -> Result<ParquetRecordBatchReaderBuilder<File>, BulkError> {
    let file = File::open(path).map_err(io_read(path))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_error(path))?;
    let columns = |schema: &Schema| -> Vec<(String, DataType)> {
        let fields = schema.fields().iter();
        fields
            .map(|field| (field.name().clone(), field.data_type().clone()))
            .collect()
    };
    let found = columns(builder.schema());
    if found != columns(&output_schema()) {
        return Err(BulkError::Parquet {
            path: path.display().to_string(),
            reason: format!(
                "not an output of fleet submit (columns {found:?}): is it the output of \
                 something else?"
            ),
        });
    }
    Ok(builder)
}

/// The batches of an output file (or part), `columns` only when given.
fn read_output(
    path: &Path,
    columns: Option<&[&str]>,
) -> Result<impl Iterator<Item = Result<RecordBatch, BulkError>> + use<>, BulkError> {
    let builder = open_output(path)?;
    let builder = match columns {
        Some(columns) => {
            let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
            builder.with_projection(mask)
        }
        None => builder,
    };
    let reader = builder
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(parquet_error(path))?;
    let shown = path.display().to_string();
    Ok(reader.map(move |batch| {
        batch.map_err(|error| BulkError::Parquet {
            path: shown.clone(),
            reason: error.to_string(),
        })
    }))
}

/// Rows in an output file or part, from its footer.
fn rows_in(path: &Path) -> Result<u64, BulkError> {
    let rows = open_output(path)?.metadata().file_metadata().num_rows();
    Ok(u64::try_from(rows).unwrap_or(0))
}

/// A Parquet output being written (see the module's comment).
pub(super) struct Output {
    path: PathBuf,
    parts: PathBuf,
    /// Rows of the output, when it is already finished.
    finished: Option<u64>,
    rows_done: u64,
    next_part: u64,
    rows_per_part: usize,
    pending: Vec<RowResult>,
}

impl Output {
    /// Opens the output at `path` where it stands (see the module's comment).
    pub(super) fn open(path: &Path, rows_per_part: usize) -> Result<Self, BulkError> {
        let parts = PathBuf::from(format!("{}.parts", path.display()));
        let mut output = Output {
            path: path.to_owned(),
            parts,
            finished: None,
            rows_done: 0,
            next_part: 0,
            rows_per_part: rows_per_part.max(1),
            pending: Vec::new(),
        };
        if path.exists() {
            let rows = rows_in(path)?;
            output.finished = Some(rows);
            output.rows_done = rows;
            if output.parts.exists() {
                std::fs::remove_dir_all(&output.parts).map_err(io_write(&output.parts))?;
            }
            return Ok(output);
        }
        let entries = match std::fs::read_dir(&output.parts) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(output),
            Err(source) => return Err(io_read(&output.parts)(source)),
        };
        let mut numbers = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_read(&output.parts))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // A part a kill interrupted: never committed, its rows are asked for again.
                std::fs::remove_file(entry.path()).map_err(io_write(&entry.path()))?;
                continue;
            }
            let number = name
                .strip_prefix("part-")
                .and_then(|rest| rest.strip_suffix(".parquet"))
                .and_then(|number| number.parse::<u64>().ok())
                .ok_or_else(|| BulkError::Parquet {
                    path: output.parts.display().to_string(),
                    reason: format!("{name} is not a part of fleet submit's output"),
                })?;
            numbers.push(number);
        }
        numbers.sort_unstable();
        for (expected, &number) in numbers.iter().enumerate() {
            if number != expected as u64 {
                return Err(BulkError::Parquet {
                    path: output.parts.display().to_string(),
                    reason: format!("part {expected} is missing (parts are committed in order)"),
                });
            }
            output.rows_done += rows_in(&output.part(number))?;
        }
        output.next_part = numbers.len() as u64;
        Ok(output)
    }

    fn part(&self, number: u64) -> PathBuf {
        self.parts.join(format!("part-{number:06}.parquet"))
    }

    fn commit_part(&mut self) -> Result<(), BulkError> {
        let rows = std::mem::take(&mut self.pending);
        if self.next_part == 0 {
            std::fs::create_dir_all(&self.parts).map_err(io_write(&self.parts))?;
        }
        let part = self.part(self.next_part);
        let batch = batch_of(rows, &part)?;
        write_file_atomically(&part, ".tmp", std::iter::once(Ok(batch)))?;
        self.next_part += 1;
        Ok(())
    }
}

impl Sink for Output {
    fn rows_done(&self) -> u64 {
        self.rows_done
    }

    fn write_job(&mut self, rows: Vec<RowResult>) -> Result<(), BulkError> {
        if let Some(rows) = self.finished {
            return Err(BulkError::Finished {
                path: self.path.display().to_string(),
                rows,
            });
        }
        self.pending.extend(rows);
        if self.pending.len() >= self.rows_per_part {
            self.commit_part()?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, errors: Option<&Path>) -> Result<u64, BulkError> {
        if self.finished.is_none() {
            if !self.pending.is_empty() {
                self.commit_part()?;
            }
            // One part open at a time: the merge holds a batch and a row group, whatever the size.
            let batches = (0..self.next_part).flat_map(|number| {
                let batches: Box<dyn Iterator<Item = _>> =
                    match read_output(&self.part(number), None) {
                        Ok(batches) => Box::new(batches),
                        Err(error) => Box::new(std::iter::once(Err(error))),
                    };
                batches
            });
            write_file_atomically(&self.path, ".partial", batches)?;
            if self.parts.exists() {
                std::fs::remove_dir_all(&self.parts).map_err(io_write(&self.parts))?;
            }
        }
        let columns = ["id", "status", "code", "message"];
        let failed = read_output(&self.path, Some(&columns))?.flat_map(|batch| {
            let lines: Vec<Result<String, BulkError>> = match batch {
                Ok(batch) => failed_lines(&batch),
                Err(error) => vec![Err(error)],
            };
            lines
        });
        write_errors(errors, failed)
    }
}

/// The failed rows of an output batch as JSON lines, as a JSON-lines output writes them.
fn failed_lines(batch: &RecordBatch) -> Vec<Result<String, BulkError>> {
    let text = |name: &str, i: usize| {
        batch
            .column_by_name(name)
            .and_then(|column| column.as_string_opt::<i32>())
            .filter(|column| !column.is_null(i))
            .map(|column| column.value(i).to_owned())
    };
    (0..batch.num_rows())
        .filter(|&i| text("status", i).as_deref() != Some("ok"))
        .map(|i| {
            Ok(json!({
                "id": text("id", i), "status": "failed", "code": text("code", i),
                "message": text("message", i)
            })
            .to_string())
        })
        .collect()
}
