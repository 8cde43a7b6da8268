"""Errors of the service domain: a small hierarchy, each error with a stable machine-readable `code`.

The class says what kind of refusal it is; `code` says which one (`invalid_params`, `in_use`, …) and is what
clients and failed jobs see. Nothing here knows about HTTP: `app.api.errors` maps each class to a status in
one table, and the worker records `code` on the failed job.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A request or operation the service refuses; `code` is stable, `message` is for people."""

    code = "invalid_request"
    retry_after: int | None = None
    """Seconds after which a retry may succeed (sent as `Retry-After`); None: retrying will not help."""

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message, self.details = message, details
        if code is not None:
            self.code = code


class InvalidInput(DomainError):
    """The request names something wrong: a bad parameter, an unknown model, a broken upload."""


class NotFound(DomainError):
    """The resource does not exist for this tenant (another tenant's ids included)."""

    code = "not_found"


class Conflict(DomainError):
    """The resource is in a state that forbids the operation (in use, finished, not ready, key reused)."""

    code = "conflict"


class TooLarge(DomainError):
    """An upload or archive exceeds a configured limit."""

    code = "payload_too_large"


class UpstreamFailed(DomainError):
    """A remote service the request depends on (the Hugging Face Hub) failed or is unreachable."""

    code = "upstream_failed"


class Unavailable(DomainError):
    """A part of this service (the database, the job queue, the storage) is down; retrying later may succeed."""

    code = "unavailable"
    retry_after = 5


class InsufficientStorage(DomainError):
    """The storage or scratch space is (nearly) full: nothing is written below the configured free space."""

    code = "insufficient_storage"
    retry_after: int | None = 60


class QuotaExceeded(InsufficientStorage):
    """The tenant's stored inputs would exceed its quota (count or bytes); deleting some frees it, waiting does
    not."""

    code = "quota_exceeded"
    retry_after = None


class RateLimited(DomainError):
    """Too many requests (or failed authentications) in the current window; `retry_after` says when to retry."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None, details: Any = None) -> None:
        super().__init__(message, code=code, details=details)
        self.retry_after = max(int(retry_after), 1)


def not_found(kind: str, ident: str) -> NotFound:
    return NotFound(f"{kind} {ident} not found")
