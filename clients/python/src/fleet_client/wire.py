"""The wire format of schemas/WIRE.md: names, jobs, their strict MessagePack encoding, Ed25519
signatures, envelopes, and the answers (JobResult, SubmitReply). No I/O except reading a key file.
"""
from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.8 to 3.10
    import tomli as _toml  # type: ignore[no-redef]

from .errors import FleetError, FleetFailed, FleetRefused

#: The model Fleet serves by default (`fleet.infer.all-minilm-l6-v2`).
DEFAULT_MODEL = "all-minilm-l6-v2"
#: Envelope version.
WIRE_VERSION = 1
#: Stream holding stored results, and the largest answer this client decodes.
RESULTS_STREAM = "FLEET_RESULTS"
MAX_ANSWER_BYTES = 64 << 20

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_U64_MAX = (1 << 64) - 1


def validate_name(what: str, value: Any) -> str:
    """Tenant, model, job id and key id: 1 to 64 of `A-Z a-z 0-9 _ -` (one subject token)."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{what} must be 1 to 64 characters of A-Z a-z 0-9 _ -, not {value!r}")
    return value


def new_job_id() -> str:
    """128 random bits in hex, as the Rust client makes them."""
    return secrets.token_hex(16)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# Subjects (WIRE.md, "Subjects").
def infer_subject(model: str) -> str:
    return f"fleet.infer.{validate_name('model', model)}"


def submit_subject(model: str) -> str:
    return f"fleet.submit.{validate_name('model', model)}"


def results_subject(tenant: str, job_id: str) -> str:
    return f"fleet.results.{validate_name('tenant', tenant)}.{validate_name('job id', job_id)}"


def direct_get_subject(tenant: str, job_id: str) -> str:
    """The one way a tenant may read one stored result: a direct get by subject."""
    return f"$JS.API.DIRECT.GET.{RESULTS_STREAM}.{results_subject(tenant, job_id)}"


def inbox_prefix(tenant: str) -> str:
    """Answers go only to a tenant's own inboxes: `_INBOX.<tenant>`."""
    return f"_INBOX.{validate_name('tenant', tenant)}"


# Keys.
@dataclass(frozen=True)
class TenantKey:
    """A tenant's signing key, as `fleet keygen` / `fleet tenant add` write it (TOML with
    `tenant`, `key_id` and `secret_key`: the 32-byte Ed25519 seed in hex)."""

    tenant: str
    key_id: str
    secret_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        validate_name("tenant", self.tenant)
        validate_name("key id", self.key_id)
        if not isinstance(self.secret_key, bytes) or len(self.secret_key) != 32:
            raise ValueError("secret_key must be 32 bytes")

    @classmethod
    def from_hex(cls, tenant: str, key_id: str, secret_key_hex: str) -> "TenantKey":
        try:
            secret = bytes.fromhex(secret_key_hex)
        except (ValueError, TypeError) as error:
            raise ValueError("secret_key is not hex") from error
        if len(secret) != 32:
            raise ValueError("secret_key must be 64 hex characters (32 bytes)")
        return cls(tenant, key_id, secret)

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "TenantKey":
        """Reads a secret key file; unknown keys are refused, as the Rust reader does."""
        path = Path(path)
        try:
            data = _toml.loads(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise FleetError(f"cannot read key file {path}: {error}") from error
        except _toml.TOMLDecodeError as error:
            raise FleetError(f"key file {path} is invalid: {error}") from error
        unknown = set(data) - {"tenant", "key_id", "secret_key"}
        missing = {"tenant", "key_id", "secret_key"} - set(data)
        if unknown or missing:
            raise FleetError(
                f"key file {path} is invalid: "
                + (f"unknown keys {sorted(unknown)} " if unknown else "")
                + (f"missing keys {sorted(missing)}" if missing else "")
            )
        try:
            return cls.from_hex(data["tenant"], data["key_id"], data["secret_key"])
        except ValueError as error:
            raise FleetError(f"key file {path} is invalid: {error}") from error

    def public_key_hex(self) -> str:
        return self._private().public_key().public_bytes_raw().hex()

    def _private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.secret_key)

    def sign(self, body: bytes) -> bytes:
        """Pure Ed25519 (RFC 8032) over `body`."""
        return self._private().sign(body)


# Jobs.
def _uint(what: str, value: Any, top: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise ValueError(f"{what} must be an integer from 0 to {top}, not {value!r}")
    return value


def _flag(what: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, not {value!r}")
    return value


def _text(what: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a str, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates
        raise ValueError(f"{what} is not valid UTF-8: {error}") from error
    return value


def embed_job(
    tenant: str,
    model: str,
    inputs: Sequence[str],
    *,
    job_id: Optional[str] = None,
    created_at_ms: Optional[int] = None,
    deadline_ms: Optional[int] = None,
    priority: int = 0,
    normalize: bool = True,
    truncate: bool = True,
    meta: Optional[Mapping[str, str]] = None,
) -> Dict[str, Any]:
    """A `Job` map for an embedding task, keys in the order of WIRE.md's table (the order the
    test vectors use). `meta` is left out when empty; `deadline_ms` is written (nil when None)."""
    if isinstance(inputs, (str, bytes)):
        raise ValueError("inputs must be a sequence of str, not a single str or bytes")
    inputs = [_text("each input", text) for text in inputs]
    if not inputs:
        raise ValueError("a job needs at least one input")
    job: Dict[str, Any] = {
        "job_id": validate_name("job id", job_id if job_id is not None else new_job_id()),
        "tenant": validate_name("tenant", tenant),
        "model": validate_name("model", model),
        "task": {
            "kind": "embed",
            "inputs": inputs,
            "normalize": _flag("normalize", normalize),
            "truncate": _flag("truncate", truncate),
        },
        "priority": _uint("priority", priority, 255),
        "created_at_ms": _uint(
            "created_at_ms", now_ms() if created_at_ms is None else created_at_ms, _U64_MAX
        ),
        "deadline_ms": None if deadline_ms is None else _uint("deadline_ms", deadline_ms, _U64_MAX),
    }
    if meta:
        job["meta"] = {_text("meta key", k): _text("meta value", v) for k, v in meta.items()}
    return job


def _pack(value: Any) -> bytes:
    # use_bin_type: bytes are `bin`, str is `str` (WIRE.md, "Encoding"); no other types pass.
    return msgpack.packb(value, use_bin_type=True, strict_types=True)


def encode_job(job: Mapping[str, Any]) -> bytes:
    """The job's MessagePack bytes: the signed `body`. Maps with str keys, texts as `str`."""
    return _pack(dict(job))


def encode_envelope(key_id: str, signature: bytes, body: bytes) -> bytes:
    """`SignedJob`: keys `v, key_id, signature, body` (the order the test vectors use)."""
    if len(signature) != 64:
        raise ValueError("an Ed25519 signature is 64 bytes")
    return _pack(
        {
            "v": WIRE_VERSION,
            "key_id": validate_name("key id", key_id),
            "signature": bytes(signature),
            "body": bytes(body),
        }
    )


def sign_job(key: TenantKey, job: Mapping[str, Any]) -> bytes:
    """Encodes `job`, signs the bytes and returns the envelope: the NATS payload."""
    if job.get("tenant") != key.tenant:
        raise ValueError(f"job tenant {job.get('tenant')!r} is not the key's tenant {key.tenant!r}")
    body = encode_job(job)
    return encode_envelope(key.key_id, key.sign(body), body)


# Answers: read leniently (unknown keys ignored, WIRE.md "Encoding").
@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str


@dataclass(frozen=True)
class JobResult:
    """A job's answer. `vectors` is set when `status` is `ok`, `error` otherwise."""

    job_id: str
    tenant: str
    model: str
    status: str  # "ok" | "failed" | "rejected"
    vectors: Optional[List[List[float]]]
    dims: Optional[int]
    error: Optional[ErrorInfo]
    worker: str
    queue_ms: int
    inference_ms: int
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def raise_for_status(self) -> "JobResult":
        """Returns self when ok; raises FleetRefused (rejected) or FleetFailed (failed)."""
        if self.status == "ok":
            return self
        code, message = (self.error.code, self.error.message) if self.error else ("internal", "")
        kind = FleetRefused if self.status == "rejected" else FleetFailed
        raise kind(code, message, job_id=self.job_id or None, answer=self)


@dataclass(frozen=True)
class SubmitReply:
    status: str  # "accepted" | "rejected"
    job_id: str
    stream_seq: Optional[int]
    duplicate: bool
    error: Optional[ErrorInfo]
    raw: Dict[str, Any] = field(repr=False, compare=False)

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def raise_for_status(self) -> "SubmitReply":
        if self.status == "accepted":
            return self
        code, message = (self.error.code, self.error.message) if self.error else ("internal", "")
        raise FleetRefused(code, message, job_id=self.job_id or None, answer=self)


def _unpack_map(data: bytes, what: str) -> Dict[str, Any]:
    if len(data) > MAX_ANSWER_BYTES:
        raise FleetError(f"{what} of {len(data)} bytes is over {MAX_ANSWER_BYTES}")
    try:
        value = msgpack.unpackb(data, raw=False, max_bin_len=MAX_ANSWER_BYTES)
    except Exception as error:  # msgpack raises several types
        raise FleetError(f"cannot decode {what}: {error}") from error
    if not isinstance(value, dict):
        raise FleetError(f"{what} is not a map")
    return value


def _error(value: Any) -> Optional[ErrorInfo]:
    if not isinstance(value, dict):
        return None
    return ErrorInfo(str(value.get("code", "internal")), str(value.get("message", "")))


def decode_result(data: bytes) -> JobResult:
    raw = _unpack_map(data, "JobResult")
    output = raw.get("output") if isinstance(raw.get("output"), dict) else None
    timings = raw.get("timings") if isinstance(raw.get("timings"), dict) else {}
    status = raw.get("status")
    if status not in ("ok", "failed", "rejected"):
        raise FleetError(f"JobResult with unknown status {status!r}")
    vectors = output.get("vectors") if output else None
    if status == "ok" and not isinstance(vectors, list):
        raise FleetError("JobResult ok without output vectors")
    return JobResult(
        job_id=str(raw.get("job_id", "")),
        tenant=str(raw.get("tenant", "")),
        model=str(raw.get("model", "")),
        status=status,
        vectors=vectors,
        dims=output.get("dims") if output else None,
        error=_error(raw.get("error")),
        worker=str(raw.get("worker", "")),
        queue_ms=int(timings.get("queue_ms", 0) or 0),
        inference_ms=int(timings.get("inference_ms", 0) or 0),
        raw=raw,
    )


def decode_submit_reply(data: bytes) -> SubmitReply:
    raw = _unpack_map(data, "SubmitReply")
    status = raw.get("status")
    if status not in ("accepted", "rejected"):
        raise FleetError(f"SubmitReply with unknown status {status!r}")
    return SubmitReply(
        status=status,
        job_id=str(raw.get("job_id", "")),
        stream_seq=raw.get("stream_seq"),
        duplicate=bool(raw.get("duplicate", False)),
        error=_error(raw.get("error")),
        raw=raw,
    )
