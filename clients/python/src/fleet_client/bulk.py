"""Bulk embedding with resume, with the semantics of the Rust `fleet submit`
(client/src/bulk.rs): rows in (JSON lines), one output row per input row in input order.

Rows are grouped into jobs of `texts_per_job`. A job's id is derived from its content and place
(`job_id_for`), exactly as the Rust client derives it, so a re-run, by either client, with the
same input and arguments asks for the same jobs: a job whose result is stored is read back,
never sent again. Progress is the output itself: it holds whole jobs' rows in input order, so a
re-run keeps its complete lines, cuts a torn last line, and goes on from the next row. Output
rows are written as the Rust client writes them (serde_json: keys sorted, floats in shortest
form), so the two clients' outputs are byte for byte the same and either can resume the other's.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Deque, Iterator, List, Optional, Tuple, Union

from . import wire
from .errors import FleetError

if TYPE_CHECKING:  # pragma: no cover
    from .client import FleetClient

PathLike = Union[str, "os.PathLike[str]"]


class BulkError(FleetError):
    """The run stopped: a bad input row, an output that is not one, or an I/O error. The
    output so far stays valid: fix the cause and run again to go on."""


@dataclass
class BulkSummary:
    """What a run did (the fields of the Rust `BulkSummary`)."""

    rows_already_done: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    jobs_sent: int = 0
    jobs_from_store: int = 0
    retries: int = 0
    rows_failed_in_output: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# JSON exactly as serde_json writes a `serde_json::Value` (no preserve_order: map keys sorted).
_I64_MIN, _U64_MAX = -(1 << 63), (1 << 64) - 1


def _json_float(value: float) -> str:
    if not math.isfinite(value):
        return "null"  # serde_json turns a non-finite float into null
    text = repr(value)  # shortest digits that read back to the same double
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    exp = int(exponent)
    if exp == -5:  # zmij writes decimal exponents -5..=15 in fixed notation, repr -4..=15
        sign = "-" if mantissa.startswith("-") else ""
        digits = mantissa.lstrip("-").replace(".", "")
        return f"{sign}0.0000{digits}"
    return f"{mantissa}e{'+' if exp >= 0 else '-'}{abs(exp)}"


def to_json(value: Any) -> str:
    """Compact JSON, byte for byte as serde_json's `Value::to_string`."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value) if _I64_MIN <= value <= _U64_MAX else _json_float(float(value))
    if isinstance(value, float):
        return _json_float(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{to_json(value[k])}" for k in sorted(value)) + "}"
    raise TypeError(f"not JSON: {type(value).__name__}")


def job_id_for(model: str, index: int, rows: List[Tuple[Any, str]]) -> str:
    """A job's id from its content and place: the first 16 bytes, in hex, of SHA-256 over the
    model, the job's index (u64, big-endian), and per row the row id's JSON and the text, each
    prefixed by its length in bytes (u64, big-endian)."""
    digest = hashlib.sha256()
    digest.update(model.encode("utf-8"))
    digest.update(index.to_bytes(8, "big"))
    for row_id, text in rows:
        for part in (to_json(row_id).encode("utf-8"), text.encode("utf-8")):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.digest()[:16].hex()


def _read_rows(path: PathLike, id_field: str, text_field: str) -> Iterator[Tuple[Any, str]]:
    """The input's rows, read as they are needed; blank lines are skipped."""
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, start=1):
            line = raw[:-1] if raw.endswith(b"\n") else raw
            line = line[:-1] if line.endswith(b"\r") else line
            try:
                text_line = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise BulkError(f"input line {number}: {error}") from error
            if not text_line.strip():
                continue
            try:
                row = json.loads(text_line)
            except ValueError as error:
                raise BulkError(f"input line {number}: not a JSON object: {error}") from error
            if not isinstance(row, dict):
                raise BulkError(f"input line {number}: not a JSON object")
            if id_field not in row:
                raise BulkError(f"input line {number}: no field {id_field!r}")
            if text_field not in row:
                raise BulkError(f"input line {number}: no field {text_field!r}")
            if not isinstance(row[text_field], str):
                raise BulkError(f"input line {number}: field {text_field!r} is not a string")
            yield row[id_field], row[text_field]


def resume_point(output: PathLike) -> int:
    """How many rows `output` holds whole; a torn last line (a kill mid-write) is cut off."""
    path = Path(output)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return 0
    rows = whole = 0
    with handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
                ok = isinstance(row, dict) and "status" in row
                reason = "no status"
            except ValueError as error:
                ok, reason = False, str(error)
            if not ok:
                raise BulkError(
                    f"{path} line {rows + 1} is not an output row ({reason}): is it the output of another input?"
                )
            rows += 1
            whole += len(line)
    with open(path, "r+b") as handle:
        handle.truncate(whole)
        os.fsync(handle.fileno())
    return rows


def _outcome(result: wire.JobResult) -> Tuple[Optional[list], Optional[Tuple[str, str]]]:
    if result.status == "ok" and result.vectors is not None:
        return result.vectors, None
    if result.error is not None:
        return None, (result.error.code, result.error.message)
    return None, ("internal", "a result without output or error")


async def _run_job(
    client: "FleetClient", model: str, index: int, rows: List[Tuple[Any, str]], timeout: float, max_attempts: int
) -> Tuple[Optional[list], Optional[Tuple[str, str]], bool, int]:
    """Runs one job: its stored result if there is one; else `submit` with its own id (no
    deadline: a job may wait in a long queue) and wait for its stored result. Submits again (same
    id) after a timeout, `overloaded`, `rate_limited` or no dispatcher, with jittered exponential
    backoff. Returns (vectors, error, sent, retries)."""
    job_id = job_id_for(model, index, rows)
    try:
        stored = await client.get_result(job_id)
    except FleetError:
        stored = None
    if stored is not None:
        return (*_outcome(stored), False, 0)
    texts = [text for _, text in rows]
    error: Tuple[str, str] = ("no_answer", "")
    sent, retries, backoff = False, 0, 0.2
    for attempt in range(max(1, max_attempts)):
        if attempt > 0:
            retries += 1
            await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 10.0)
        sent = True
        try:
            reply = await client.submit(texts, model, timeout=timeout, job_id=job_id, check=False)
        except FleetError as failure:
            error = ("no_answer", str(failure))
            continue
        if not reply.accepted:
            code, message = (reply.error.code, reply.error.message) if reply.error else ("internal", "refused without a reason")
            error = (code, message)
            if code in ("overloaded", "rate_limited"):
                continue
            return None, error, sent, retries
        result = await client.wait_result(job_id, timeout)
        if result is not None:
            return (*_outcome(result), sent, retries)
        error = ("no_answer", f"no result within {timeout:g}s")
    return None, error, sent, retries


def _write_errors(output: Path, errors: Path) -> int:
    """Writes the failed rows of `output` to `errors` (whole, then moved into place)."""
    partial = Path(f"{errors}.partial")
    failed = 0
    with open(output, "rb") as rows, open(partial, "wb") as out:
        for line in rows:
            line = line.rstrip(b"\n")
            try:
                status = json.loads(line).get("status")
            except (ValueError, AttributeError):
                status = None
            if status != "ok":
                failed += 1
                out.write(line + b"\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, errors)
    return failed


async def embed_file(
    client: "FleetClient",
    input: PathLike,
    output: PathLike,
    *,
    errors: Optional[PathLike] = None,
    model: Optional[str] = None,
    texts_per_job: int = 32,
    in_flight: int = 64,
    job_timeout: float = 120.0,
    max_attempts: int = 8,
    id_field: str = "id",
    text_field: str = "text",
) -> BulkSummary:
    """Embeds every row of `input` (JSON lines with `id_field` and `text_field`) into `output`,
    going on from what `output` already holds. Output rows, in input order:
    `{"id", "status": "ok", "vector"}` or `{"code", "id", "message", "status": "failed"}`; the
    failed ones also go to `errors` (default `<output>.errors`)."""
    model = wire.validate_name("model", model or client.model)
    output = Path(output)
    errors = Path(errors) if errors is not None else Path(f"{output}.errors")
    texts_per_job, in_flight = max(1, texts_per_job), max(1, in_flight)
    done_rows = resume_point(output)
    summary = BulkSummary(rows_already_done=done_rows)
    rows = _read_rows(input, id_field, text_field)

    def jobs() -> Iterator[Tuple[int, List[Tuple[Any, str]]]]:
        for _ in range(done_rows):
            if next(rows, None) is None:
                return
        index = done_rows // texts_per_job
        while True:
            chunk: List[Tuple[Any, str]] = []
            for row in rows:
                chunk.append(row)
                if len(chunk) == texts_per_job:
                    break
            if not chunk:
                return
            yield index, chunk
            index += 1

    pending: Deque[Tuple[List[Tuple[Any, str]], "asyncio.Future[Any]"]] = collections.deque()
    source = jobs()
    exhausted = False

    def fill() -> None:
        nonlocal exhausted
        while not exhausted and len(pending) < in_flight:
            try:
                item = next(source)
            except StopIteration:
                exhausted = True
                return
            except BulkError as error:
                # A bad row ends the run at its job, after the jobs before it are written.
                exhausted = True
                future = asyncio.get_running_loop().create_future()
                future.set_exception(error)
                pending.append(([], future))
                return
            index, chunk = item
            task = asyncio.ensure_future(_run_job(client, model, index, chunk, job_timeout, max_attempts))
            pending.append((chunk, task))

    jobs_since_sync = 0
    with open(output, "ab") as out:
        try:
            fill()
            while pending:
                chunk, task = pending.popleft()
                vectors, error, sent, retries = await task
                fill()
                summary.jobs_sent += int(sent)
                summary.jobs_from_store += int(not sent)
                summary.retries += retries
                lines = []
                if vectors is not None:
                    for (row_id, _), vector in zip(chunk, vectors):
                        lines.append(to_json({"id": row_id, "status": "ok", "vector": vector}))
                    summary.rows_ok += len(chunk)
                else:
                    code, message = error or ("internal", "")
                    for row_id, _ in chunk:
                        lines.append(to_json({"id": row_id, "status": "failed", "code": code, "message": message}))
                    summary.rows_failed += len(chunk)
                # One job's rows in one write: a kill leaves whole jobs and at most one torn line.
                out.write(("\n".join(lines) + "\n").encode("utf-8"))
                out.flush()
                jobs_since_sync += 1
                if jobs_since_sync == 64:
                    os.fsync(out.fileno())
                    jobs_since_sync = 0
        finally:
            for _, task in pending:
                task.cancel()
        out.flush()
        os.fsync(out.fileno())
    summary.rows_failed_in_output = _write_errors(output, errors)
    return summary
