"""The exceptions the client raises."""
from __future__ import annotations

from typing import Any, Optional


class FleetError(Exception):
    """Anything that went wrong talking to a Fleet."""


class FleetJobError(FleetError):
    """A job answered with an error code (WIRE.md, "Error codes")."""

    def __init__(self, code: str, message: str, *, job_id: Optional[str] = None, answer: Any = None):
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.job_id = job_id
        #: The JobResult or SubmitReply that carried the error.
        self.answer = answer


class FleetRefused(FleetJobError):
    """The dispatcher refused the job (`status` = `rejected`): e.g. `too_large`, `forbidden`,
    `unknown_model`, `rate_limited`, `overloaded`, `expired`, or `no_worker` (an `infer` for a
    model no live worker serves now: nothing was queued; `submit` queues it all the same, and its
    reply's `raw["no_worker"]` is True)."""


class FleetFailed(FleetJobError):
    """The job ran and failed (`status` = `failed`): e.g. `input_too_long`, `internal`."""


class FleetTimeout(FleetError):
    """No answer within the timeout; sending the same job id again is safe."""


class NoDispatcher(FleetError):
    """Nobody serves the subject: no dispatcher for this model (or this connection may not
    reach one)."""
