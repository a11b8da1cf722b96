"""The service's own errors. Views raise them; ``errors.py`` renders each as problem+json."""
from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every domain error: an HTTP status, a short title and a detail for the client, and
    for a passing condition how many seconds a client should wait before it tries again
    (``Retry-After``)."""

    status_code = 400
    title = "Bad request"
    retry_after: int | None = None  # seconds, sent as Retry-After when set

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class JobNotFound(ServiceError):
    status_code = 404
    title = "Job not found"


class JobUnreadable(JobNotFound):
    """The job's record exists but cannot be read (damaged on disk): an operator must run fsck.

    A kind of JobNotFound, so code that skips vanished jobs (lease reaping, cleanup) skips a
    damaged one too instead of failing; the client is told the truth (500, run fsck), not 404.
    """

    status_code = 500
    title = "Job record unreadable"


class InvalidTransition(ServiceError):
    """The job's state does not allow the action (a cancelled job cannot complete, ...)."""

    status_code = 409
    title = "Invalid state transition"


class LeaseConflict(ServiceError):
    """The caller does not hold the job's current attempt (stale worker, re-assigned job)."""

    status_code = 409
    title = "Lease not held"


class InvalidRequest(ServiceError):
    """A request that parsed but breaks a rule the schema cannot see (e.g. a source outside the roots)."""

    status_code = 422
    title = "Unprocessable request"

    def __init__(self, detail: str, errors: dict[str, list[str]] | None = None, **extra: Any) -> None:
        super().__init__(detail, **extra)
        if errors:
            self.extra["errors"] = errors


class SourceForbidden(ServiceError):
    status_code = 403
    title = "Forbidden"


class SourceMissing(ServiceError):
    status_code = 404
    title = "Source file not found"


class StoreUnavailable(ServiceError):
    status_code = 503
    title = "Store unavailable"
    retry_after = 5


class StoreFull(StoreUnavailable):
    """The store's file system has no space (or no inodes) left: nothing was changed; the same
    request succeeds once an operator frees space, without a restart."""

    title = "Store full"
    retry_after = 30


class StoreBusy(StoreUnavailable):
    """The store's lock could not be had within STORE_LOCK_TIMEOUT_SECONDS: another process holds
    it (stopped, or stuck in a system call). Nothing was changed; the request may be repeated."""

    title = "Store busy"
    retry_after = 1


# -- files: uploads (tus), source checksums, artifacts

class UploadNotFound(ServiceError):
    status_code = 404
    title = "Upload not found"


class UploadGone(ServiceError):
    """The upload expired (``UPLOAD_EXPIRY_SECONDS``) before it was finished."""

    status_code = 410
    title = "Upload expired"


class OffsetMismatch(ServiceError):
    status_code = 409
    title = "Upload-Offset mismatch"


class UploadBusyError(ServiceError):
    status_code = 409
    title = "Upload busy"
    retry_after = 1


class PayloadTooLarge(ServiceError):
    status_code = 413
    title = "Payload too large"


class UnsupportedMedia(ServiceError):
    status_code = 415
    title = "Unsupported media type"


class TusVersionUnsupported(ServiceError):
    status_code = 412
    title = "Precondition failed"


class ChecksumMismatch(ServiceError):
    """tus's checksum extension: the chunk's bytes do not match ``Upload-Checksum``; nothing was stored."""

    status_code = 460
    title = "Checksum mismatch"


class ChecksumUnsupported(ServiceError):
    status_code = 400
    title = "Checksum algorithm not supported"


class InsufficientStorage(ServiceError):
    """The blob store's disk has no room for the bytes: nothing was stored (507, RFC 4918)."""

    status_code = 507
    title = "Insufficient storage"
    retry_after = 60


class SourceChanged(ServiceError):
    """The source's bytes are not the ones the job was created with: never serve other bytes."""

    status_code = 409
    title = "Source changed"


class ArtifactNotFound(ServiceError):
    status_code = 404
    title = "Artifact not found"


class DigestMismatch(ServiceError):
    status_code = 400
    title = "Content-Digest mismatch"
