"""What a call to the service can end in, as exceptions.

Every answer the service gives with an error status is an :class:`ApiError` carrying the
problem+json body (RFC 9457: ``type``, ``title``, ``status``, ``detail``, ``errors`` for a 422);
the subclass names the status, so a worker writes ``except LeaseLost`` rather than comparing
numbers. A request that got no answer at all (refused, reset, timed out, after the retries) is a
:class:`ConnectionFailed`. Neither is ever a bare ``http.client`` or ``OSError``.
"""
from __future__ import annotations

from typing import Any


class ClientError(Exception):
    """Base of everything this package raises."""


class ConfigError(ClientError, ValueError):
    """The client cannot be built as asked (a base URL without a scheme, ...)."""


class ConnectionFailed(ClientError):
    """No answer from the service: connection refused or reset, a timeout, a broken stream."""

    def __init__(self, method: str, path: str, cause: BaseException, attempts: int) -> None:
        super().__init__(f"{method} {path}: no answer after {attempts} attempt(s): "
                         f"{type(cause).__name__}: {cause}")
        self.method = method
        self.path = path
        self.cause = cause
        self.attempts = attempts


class ApiError(ClientError):
    """The service answered with an error status; ``problem`` is its problem+json body."""

    status: int = 0

    def __init__(self, method: str, path: str, status: int, problem: dict[str, Any],
                 headers: dict[str, str] | None = None) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.problem = problem
        self.headers = headers or {}
        super().__init__(f"{method} {path}: {status} {self.title}: {self.detail}")

    @property
    def title(self) -> str:
        return str(self.problem.get("title") or "")

    @property
    def detail(self) -> str:
        return str(self.problem.get("detail") or "")

    @property
    def errors(self) -> dict[str, list[str]]:
        """A validation error's messages per field (empty for other errors)."""
        errors = self.problem.get("errors")
        return errors if isinstance(errors, dict) else {}


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    """401: the key is missing, unknown or revoked."""

    status = 401


class Forbidden(ApiError):
    """403: the key lacks the role, is bound to another worker id, or a download token is bad."""

    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    """409: the job's state does not allow the action."""

    status = 409


class LeaseLost(Conflict):
    """409 to a worker's heartbeat, download, result or release: the job was cancelled, re-queued
    or handed to another worker. Stop working on it and send nothing more."""


class PayloadTooLarge(ApiError):
    status = 413


class InvalidRequest(ApiError):
    """422: the request parsed but is not valid (``errors`` names the fields)."""

    status = 422


class ServiceUnavailable(ApiError):
    """503 (or 502/504 from a proxy) still answered after the retries."""

    status = 503


class ServerError(ApiError):
    """Any other 5xx."""

    status = 500


class ReleaseUnsupported(ClientError):
    """The server has no ``POST /<id>/release`` route (404 or 405 for the route itself, not for
    the job): an older server. Hand the job back another way (a retryable failure result)."""


class DownloadError(ClientError):
    """The downloaded bytes are not what the server announced (size or sha-256)."""


class DownloadStopped(ClientError):
    """The ``stop`` event given to a download was set: it ended between two chunks, its partial
    file removed."""


class WaitTimeout(ClientError, TimeoutError):
    """:meth:`Client.wait` gave up before the job reached a terminal state."""

    def __init__(self, job_id: str, timeout: float, last_status: str | None) -> None:
        super().__init__(f"job {job_id} is still {last_status} after {timeout:g} s")
        self.job_id = job_id
        self.last_status = last_status


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                         409: Conflict, 413: PayloadTooLarge, 422: InvalidRequest,
                                         502: ServiceUnavailable, 503: ServiceUnavailable,
                                         504: ServiceUnavailable}


def error_for(method: str, path: str, status: int, problem: dict[str, Any], headers: dict[str, str],
              conflict: type[Conflict] = Conflict) -> ApiError:
    """The exception for an error answer; ``conflict`` is the class a 409 becomes (``LeaseLost``
    for the calls a lease holder makes)."""
    if status == 409:
        cls: type[ApiError] = conflict
    else:
        cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return cls(method, path, status, problem, headers)
