"""A Python client for Fleet, written from schemas/WIRE.md.

Async::

    async with await FleetClient.connect("acme-key.toml", nkey_seed_file="acme.nk") as fleet:
        result = await fleet.infer(["hello", "world"])      # result.vectors: 384 floats each

Blocking, a whole file (NATS settings from the arguments or NATS_* environment variables)::

    import fleet_client
    fleet_client.embed_file("rows.jsonl", "embeddings.jsonl", key="acme-key.toml")
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional, Sequence

from .bulk import BulkError, BulkSummary, job_id_for, to_json
from .client import ConnectOptions, FleetClient
from .errors import FleetError, FleetFailed, FleetJobError, FleetRefused, FleetTimeout, NoDispatcher
from .wire import (
    DEFAULT_MODEL,
    ErrorInfo,
    JobResult,
    SubmitReply,
    TenantKey,
    embed_job,
    encode_envelope,
    encode_job,
    new_job_id,
    sign_job,
)

__version__ = "0.1.0"

__all__ = [
    "BulkError",
    "BulkSummary",
    "ConnectOptions",
    "DEFAULT_MODEL",
    "ErrorInfo",
    "FleetClient",
    "FleetError",
    "FleetFailed",
    "FleetJobError",
    "FleetRefused",
    "FleetTimeout",
    "JobResult",
    "NoDispatcher",
    "SubmitReply",
    "TenantKey",
    "embed_file",
    "embed_job",
    "encode_envelope",
    "encode_job",
    "infer",
    "job_id_for",
    "new_job_id",
    "sign_job",
    "to_json",
]


def embed_file(input: Any, output: Any, key: Any = None, url: Optional[str] = None, **options: Any) -> BulkSummary:
    """Blocking: connects, embeds every row of `input` into `output` (resuming from what it
    holds), closes. `options` are FleetClient.connect's (model, nkey_seed_file, tls_ca, ...)
    and embed_file's (texts_per_job, in_flight, job_timeout, max_attempts, id_field,
    text_field, errors)."""
    bulk_names = {"errors", "texts_per_job", "in_flight", "job_timeout", "max_attempts", "id_field", "text_field"}
    bulk = {k: options.pop(k) for k in list(options) if k in bulk_names}

    async def run() -> BulkSummary:
        async with await FleetClient.connect(key, url, **options) as fleet:
            return await fleet.embed_file(input, output, **bulk)

    return asyncio.run(run())


def infer(texts: Sequence[str], key: Any = None, url: Optional[str] = None, *, timeout: float = 30.0, **options: Any) -> JobResult:
    """Blocking: connects, embeds `texts` through request-reply, closes. Raises FleetRefused or
    FleetFailed for a job answered with an error."""
    job_names = {"job_id", "normalize", "truncate", "meta", "priority", "deadline_ms"}
    job = {k: options.pop(k) for k in list(options) if k in job_names}

    async def run() -> JobResult:
        async with await FleetClient.connect(key, url, **options) as fleet:
            return await fleet.infer(texts, timeout=timeout, **job)

    return asyncio.run(run())
