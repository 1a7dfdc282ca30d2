"""Talking to a Fleet over NATS with nats-py: connect as a tenant, `infer`, `submit`, read
stored results."""
from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import nats
import nats.errors

from . import wire
from .errors import FleetError, FleetTimeout, NoDispatcher
from .wire import JobResult, SubmitReply, TenantKey

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_URL = "nats://127.0.0.1:4222"


def _read_secret(what: str, path: PathLike) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as error:
        raise FleetError(f"cannot read the {what} file {path}: {error}") from error
    if not text:
        raise FleetError(f"the {what} file {path} is empty")
    return text


@dataclass
class ConnectOptions:
    """Where and how to connect: the same settings (and environment variables) as the Rust
    processes' `--nats-*` flags. Secrets come from files or the environment."""

    url: Optional[str] = None  # NATS_URL; several separated by commas
    creds_file: Optional[PathLike] = None  # NATS_CREDS: JWT and nkey seed
    nkey_seed_file: Optional[PathLike] = None  # NATS_NKEY_FILE: an nkey seed (SU...)
    user: Optional[str] = None  # NATS_USER
    password: Optional[str] = None  # NATS_PASSWORD
    password_file: Optional[PathLike] = None  # NATS_PASSWORD_FILE
    token: Optional[str] = None  # NATS_TOKEN
    token_file: Optional[PathLike] = None  # NATS_TOKEN_FILE
    tls_ca: Optional[PathLike] = None  # NATS_TLS_CA: turns TLS on
    tls_cert: Optional[PathLike] = None  # NATS_TLS_CERT (with tls_key)
    tls_key: Optional[PathLike] = None  # NATS_TLS_KEY
    tls: Optional[bool] = None  # NATS_TLS: require TLS (system roots without tls_ca)
    connect_timeout: float = 5.0
    name: str = "fleet-python-client"

    _ENV = {
        "url": "NATS_URL",
        "creds_file": "NATS_CREDS",
        "nkey_seed_file": "NATS_NKEY_FILE",
        "user": "NATS_USER",
        "password": "NATS_PASSWORD",
        "password_file": "NATS_PASSWORD_FILE",
        "token": "NATS_TOKEN",
        "token_file": "NATS_TOKEN_FILE",
        "tls_ca": "NATS_TLS_CA",
        "tls_cert": "NATS_TLS_CERT",
        "tls_key": "NATS_TLS_KEY",
        "tls": "NATS_TLS",
    }

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None, **given: Any) -> "ConnectOptions":
        """Settings given as arguments win over the environment (as flags do in Fleet)."""
        environ = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        unknown = set(given) - known
        if unknown:
            raise TypeError(f"unknown connect options: {sorted(unknown)}")
        values: Dict[str, Any] = {}
        for name, var in cls._ENV.items():
            if given.get(name) is not None:
                values[name] = given[name]
            elif environ.get(var):
                value: Any = environ[var]
                if name == "tls":
                    value = value.strip().lower() in ("1", "true", "yes", "on")
                values[name] = value
        for name in known - set(cls._ENV):
            if name in given:
                values[name] = given[name]
        return cls(**values)

    def servers(self) -> List[str]:
        urls = [u.strip() for u in (self.url or DEFAULT_URL).split(",") if u.strip()]
        if not urls:
            raise FleetError("no NATS URL")
        return urls

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        wants = bool(self.tls or self.tls_ca or self.tls_cert or self.tls_key) or any(
            u.startswith("tls://") for u in self.servers()
        )
        if not wants:
            return None
        if bool(self.tls_cert) != bool(self.tls_key):
            raise FleetError("a client certificate needs its key (tls_cert with tls_key)")
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert:
            context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        return context

    def nats_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for `nats.connect` (without the inbox prefix)."""
        kwargs: Dict[str, Any] = {
            "servers": self.servers(),
            "name": self.name,
            "connect_timeout": self.connect_timeout,
            "max_reconnect_attempts": 10,
            "reconnect_time_wait": 1,
        }
        context = self.ssl_context()
        if context is not None:
            kwargs["tls"] = context
        if self.creds_file:
            kwargs["user_credentials"] = str(self.creds_file)
        if self.nkey_seed_file:
            kwargs["nkeys_seed_str"] = _read_secret("nkey seed", self.nkey_seed_file)
        if self.user:
            kwargs["user"] = self.user
            password = self.password
            if self.password_file:
                password = _read_secret("password", self.password_file)
            if password is None:
                raise FleetError("a NATS user needs a password (password_file or NATS_PASSWORD)")
            kwargs["password"] = password
        token = _read_secret("token", self.token_file) if self.token_file else self.token
        if token:
            kwargs["token"] = token
        return kwargs


async def _quiet(_error: Exception) -> None:
    """nats-py logs connection errors itself through this callback; the caller sees them as
    exceptions instead."""


class FleetClient:
    """One tenant's connection to a Fleet. Make it with `await FleetClient.connect(...)`; use it
    as an async context manager, or call `close()`."""

    def __init__(self, nc: Any, key: TenantKey, model: str = wire.DEFAULT_MODEL):
        self.nc = nc
        self.key = key
        self.model = wire.validate_name("model", model)

    @property
    def tenant(self) -> str:
        return self.key.tenant

    @classmethod
    async def connect(
        cls,
        key: Union[PathLike, TenantKey, None] = None,
        url: Optional[str] = None,
        *,
        model: Optional[str] = None,
        **options: Any,
    ) -> "FleetClient":
        """Loads the tenant's key (a path, a TenantKey, or FLEET_KEY, default
        `fleet-key.toml`) and connects with the inbox prefix `_INBOX.<tenant>`, so answers come
        to this tenant's own inboxes (WIRE.md). `options` are those of ConnectOptions; unset ones
        come from the environment (NATS_URL, NATS_NKEY_FILE, NATS_TLS_CA, ...)."""
        if not isinstance(key, TenantKey):
            key = TenantKey.load(key if key is not None else os.environ.get("FLEET_KEY", "fleet-key.toml"))
        settings = ConnectOptions.from_env(url=url, **options)
        kwargs = settings.nats_kwargs()
        try:
            nc = await nats.connect(
                inbox_prefix=wire.inbox_prefix(key.tenant),
                error_cb=_quiet,
                allow_reconnect=True,
                **kwargs,
            )
        except Exception as error:
            raise FleetError(f"cannot connect to NATS at {', '.join(kwargs['servers'])}: {error!r}") from error
        return cls(nc, key, model or os.environ.get("FLEET_MODEL") or wire.DEFAULT_MODEL)

    async def close(self) -> None:
        if not self.nc.is_closed:
            await self.nc.drain()

    async def __aenter__(self) -> "FleetClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # Jobs.
    def job(self, texts: Sequence[str], model: Optional[str] = None, **job_fields: Any) -> Dict[str, Any]:
        """An embedding job of this tenant (see `wire.embed_job` for the fields)."""
        return wire.embed_job(self.tenant, model or self.model, texts, **job_fields)

    async def _request(self, subject: str, payload: bytes, timeout: float) -> Any:
        try:
            return await self.nc.request(subject, payload, timeout=timeout)
        except nats.errors.NoRespondersError as error:
            raise NoDispatcher(
                f"nobody serves {subject}: no dispatcher is running for this model on this NATS "
                "server (or this connection may not reach one)"
            ) from error
        except nats.errors.TimeoutError as error:
            raise FleetTimeout(f"no answer on {subject} within {timeout} s") from error
        except nats.errors.Error as error:  # closed or draining connection, bad subject, ...
            raise FleetError(f"request on {subject} failed: {error!r}") from error

    async def infer_job(self, job: Mapping[str, Any], timeout: float = 30.0, *, check: bool = True) -> JobResult:
        """Sends a built job on `fleet.infer.<model>` and waits for its JobResult (the worker's
        answer, or the dispatcher's refusal). With `check`, a refusal raises FleetRefused and a
        failure FleetFailed."""
        payload = wire.sign_job(self.key, job)
        msg = await self._request(wire.infer_subject(job["model"]), payload, timeout)
        result = wire.decode_result(msg.data)
        return result.raise_for_status() if check else result

    async def infer(
        self,
        texts: Sequence[str],
        model: Optional[str] = None,
        timeout: float = 30.0,
        job_id: Optional[str] = None,
        *,
        check: bool = True,
        **job_fields: Any,
    ) -> JobResult:
        """Embeds `texts` through request-reply: `result.vectors` holds one vector per text.
        A job without `deadline_ms` gets one at the end of `timeout` (nobody waits for its answer
        after that). Re-sending with the same `job_id` after a FleetTimeout is safe: the queue
        stores a job id once, and a repeated call is answered with the stored result."""
        if job_fields.get("deadline_ms") is None:
            job_fields["deadline_ms"] = wire.now_ms() + int(timeout * 1000)
        job = self.job(texts, model, job_id=job_id, **job_fields)
        return await self.infer_job(job, timeout, check=check)

    async def submit_job(self, job: Mapping[str, Any], timeout: float = 10.0, *, check: bool = True) -> SubmitReply:
        """Sends a built job on `fleet.submit.<model>`; the reply says whether it was queued.
        With `check`, a refusal raises FleetRefused."""
        payload = wire.sign_job(self.key, job)
        msg = await self._request(wire.submit_subject(job["model"]), payload, timeout)
        reply = wire.decode_submit_reply(msg.data)
        return reply.raise_for_status() if check else reply

    async def submit(
        self,
        texts: Sequence[str],
        model: Optional[str] = None,
        timeout: float = 10.0,
        job_id: Optional[str] = None,
        *,
        check: bool = True,
        **job_fields: Any,
    ) -> SubmitReply:
        """Queues an embedding job (no deadline unless given); read its result later with
        `get_result(reply.job_id)` or `wait_result`."""
        job = self.job(texts, model, job_id=job_id, **job_fields)
        return await self.submit_job(job, timeout, check=check)

    # Results.
    async def get_result(self, job_id: str, timeout: float = 5.0) -> Optional[JobResult]:
        """The stored result of one of this tenant's jobs, or None (not finished, never sent, or
        past the results' retention): a direct get of the last message on
        `fleet.results.<tenant>.<job_id>`, the one read a tenant may do (WIRE.md, "Reading
        results"). The result is returned as stored, `failed` included."""
        subject = wire.direct_get_subject(self.tenant, job_id)
        try:
            msg = await self.nc.request(subject, b"", timeout=timeout)
        except nats.errors.NoRespondersError as error:
            raise FleetError("no JetStream answers direct gets on FLEET_RESULTS") from error
        except nats.errors.TimeoutError as error:
            raise FleetTimeout(f"no answer on {subject} within {timeout} s") from error
        except nats.errors.Error as error:
            raise FleetError(f"cannot read the stored result of job {job_id}: {error!r}") from error
        status = (msg.headers or {}).get("Status")
        if status == "404":
            return None
        if status:
            description = (msg.headers or {}).get("Description", "")
            raise FleetError(f"cannot read the stored result of job {job_id}: {status} {description}".strip())
        return wire.decode_result(msg.data)

    async def wait_result(self, job_id: str, timeout: float = 120.0) -> Optional[JobResult]:
        """Polls for a job's stored result, more slowly as it waits, until `timeout`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        pause = 0.02
        while True:
            try:
                result = await self.get_result(job_id)
            except FleetError:
                result = None
            if result is not None:
                return result
            left = end - loop.time()
            if left <= 0:
                return None
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 0.5)

    async def embed_file(self, input: PathLike, output: PathLike, **options: Any) -> "BulkSummary":
        """Embeds every row of a JSON-lines file into `output` (see `fleet_client.bulk`)."""
        from .bulk import embed_file

        return await embed_file(self, input, output, **options)


from .bulk import BulkSummary  # noqa: E402  (for the annotation above)
