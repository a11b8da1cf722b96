"""``Idempotency-Key`` on create: a producer that retries its own request gets the job it already made.

The same key with the same body answers 200 with the original job; with a different body, 422. Keys
are scoped to the API key that sent them (two producers cannot collide) and kept ``IDEMPOTENCY_TTL_
SECONDS`` (default 24 h); older records are ignored and purged.

Exactly one job per key, across threads and gunicorn processes and through a crash: the record is
taken under a lock on the key (``flock`` on one of 256 stripe files), and written *before* the job,
naming the job id it reserves. Under that lock a ``reserved`` record means its creator died between
the two writes: the job is then created (or found) under the reserved id and the record completed, so
a crash can neither lose the job nor make a second one. ``store.base.IdempotencyRecords`` is the
storage interface, provided by the backend beside the jobs: one JSON file per key next to them
(``store/files/idempotency.py``), or, with PostgreSQL, a table with the key as primary key, locked
with ``pg_advisory_xact_lock``, so that every API host sees the same records
(``store/postgres/idempotency.py``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from .exceptions import InvalidRequest, ServiceError
from .models import RemoteJob, from_iso, new_job_id, to_iso

if TYPE_CHECKING:
    from .service import JobService
    from .store.base import IdempotencyRecords

HEADER = "Idempotency-Key"
KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,255}$")
RESERVED, DONE = "reserved", "done"
PURGE_INTERVAL_SECONDS = 600.0
PURGE_BATCH = 1000
STRIPES = 256

log = structlog.get_logger(__name__)


class IdempotencyKeyReused(ServiceError):
    status_code = 422
    title = "Idempotency key reused"


class IdempotentJobGone(ServiceError):
    status_code = 409
    title = "Idempotent job deleted"


class IdempotencyKeyBusy(ServiceError):
    """Another request with the key held it longer than a create may wait (PostgreSQL backend)."""

    status_code = 409
    title = "Idempotency key in use"


def parse_key(value: str | None) -> str | None:
    """The header's key, None when absent; 422 when it is not 1-255 visible ASCII characters."""
    if value is None:
        return None
    if not KEY_PATTERN.match(value):
        raise InvalidRequest(f"{HEADER} must be 1-255 visible ASCII characters (no spaces)",
                             errors={HEADER: ["must be 1-255 visible ASCII characters (no spaces)"]})
    return value


def key_id_of(scope: str, key: str) -> str:
    """The record's name: the key hashed with the API key name it was sent with."""
    return hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()


def fingerprint_of(request: dict[str, Any]) -> str:
    """The validated request (defaults filled in), so equal bodies match whatever their spelling."""
    return hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()


@dataclasses.dataclass
class IdempotencyRecord:
    key_id: str
    fingerprint: str
    job_id: str
    request: dict[str, Any]
    created_at: datetime
    state: str = RESERVED

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), created_at=to_iso(self.created_at))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "IdempotencyRecord":
        return cls(**dict(data, created_at=from_iso(data["created_at"])))


class IdempotentCreates:
    def __init__(self, records: "IdempotencyRecords", service: "JobService", ttl_seconds: float) -> None:
        self.records = records
        self.service = service
        self.ttl = timedelta(seconds=ttl_seconds)
        self._next_purge = 0.0

    def create(self, scope: str, key: str, request: dict[str, Any]) -> tuple[RemoteJob, bool]:
        """The job for ``key`` (made now when new); the flag says whether this call created it."""
        key_id, fingerprint = key_id_of(scope, key), fingerprint_of(request)
        self._maybe_purge()
        with self.records.locked(key_id):
            now = self.service.clock()
            record = self.records.get(key_id)
            if record is not None and record.created_at + self.ttl <= now:
                record = None  # expired: the key may name a new request
            if record is None:
                record = IdempotencyRecord(key_id, fingerprint, new_job_id(), request, now)
                self.records.put(record)
                return self._complete(record, existing=None), True
            if record.fingerprint != fingerprint:
                raise IdempotencyKeyReused(f"this {HEADER} was used with a different request body",
                                           errors={HEADER: ["already used with a different request body"]})
            existing = self._find(record.job_id)
            if record.state == DONE:
                if existing is None:
                    raise IdempotentJobGone(f"the job created with this {HEADER} ({record.job_id}) was deleted",
                                            job_id=record.job_id)
                log.info("job.create_replayed", job_id=existing.id)
                return existing, False
            log.warning("idempotency.recovered", job_id=record.job_id, job_existed=existing is not None)
            return self._complete(record, existing), existing is None

    def _complete(self, record: IdempotencyRecord, existing: RemoteJob | None) -> RemoteJob:
        """Create the reserved job (unless it exists), then mark the record done."""
        job = existing
        if job is None:
            try:
                job = self.service.create(**record.request, job_id=record.job_id)
            except ServiceError:
                self.records.delete(record.key_id)  # refused: nothing was made, the key stays free
                raise
        record.state = DONE
        self.records.put(record)
        return job

    def _find(self, job_id: str) -> RemoteJob | None:
        try:
            return self.service.get(job_id)
        except ServiceError:
            return None

    def _maybe_purge(self) -> None:
        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + PURGE_INTERVAL_SECONDS
        purged = self.records.purge(self.service.clock() - self.ttl, PURGE_BATCH)
        if purged:
            log.info("idempotency.purged", count=purged)
        if purged >= PURGE_BATCH:
            self._next_purge = 0.0  # more may be left: the next create purges the next batch
