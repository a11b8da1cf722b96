"""The repository interface: what the service needs from a store, and nothing about leases or retries.

A backend owns the bytes (files, locks, fsync, SQL). The service passes *mutators*: functions that
take the current job and return the new one (or raise a ServiceError to refuse); the backend applies
them atomically, so a rule is checked against the state it replaces and no other process can act
on the job in between.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable, Iterable, Iterator, Protocol

from ..models import RemoteJob

Mutator = Callable[[RemoteJob], RemoteJob]


def pure(mutate: Mutator) -> Mutator:
    """Mark ``mutate`` as a pure function of the job it is given: no side effects (no logging, no
    I/O), so a backend may apply it to a snapshot outside its lock and, when the job changed
    meanwhile, again to the current version. The JSON-file store then writes and fsyncs the new
    record before it takes the lock, which it holds only to check the version and rename."""
    mutate.pure = True  # type: ignore[attr-defined]
    return mutate


def is_pure(mutate: Mutator) -> bool:
    return getattr(mutate, "pure", False) is True


@dataclass(frozen=True)
class JobFilter:
    status: str | None = None
    content_type: str | None = None
    ingestion_task_id: str | None = None
    worker_id: str | None = None

    def matches(self, job_status: str, content_type: str, ingestion_task_id: str,
                worker_id: str | None) -> bool:
        return ((self.status is None or self.status == job_status)
                and (self.content_type is None or self.content_type == content_type)
                and (self.ingestion_task_id is None or self.ingestion_task_id == ingestion_task_id)
                and (self.worker_id is None or self.worker_id == worker_id))


@dataclass
class StoreStats:
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    oldest_pending_created_at: datetime | None = None
    worker_last_seen: dict[str, datetime] = field(default_factory=dict)


class JobRepository(Protocol):
    def create(self, job: RemoteJob) -> RemoteJob:
        """Store a new job; its id must be new."""

    def get(self, job_id: str) -> RemoteJob:
        """The job, or JobNotFound."""

    def update(self, job_id: str, mutate: Mutator) -> RemoteJob:
        """Apply ``mutate`` to the job atomically and return what was stored."""

    def claim(self, content_types: Iterable[str], limit: int, now: datetime,
              mutate: Mutator) -> list[RemoteJob]:
        """Take up to ``limit`` pending jobs available at ``now``, best first, applying ``mutate``."""

    def delete(self, job_id: str, only_if: Callable[[RemoteJob], bool] | None = None) -> bool:
        """Remove the job, or JobNotFound. With ``only_if``, it is called with the job as stored
        while no one else can change it (in SQL: ``SELECT ... FOR UPDATE``, check, ``DELETE``), and
        the job is kept when it returns False. True when the job was removed."""

    def list(self, filters: JobFilter, after: str | None, limit: int) -> tuple[list[RemoteJob], str | None]:
        """Jobs in creation order after the cursor ``after``, and the cursor of the next page."""

    def lapsed(self, now: datetime, limit: int) -> list[str]:
        """Ids of processing jobs whose lease ended before ``now``."""

    def pending_available_before(self, cutoff: datetime, limit: int) -> list[str]:
        """Ids of pending jobs claimable since before ``cutoff`` (``available_at < cutoff``), oldest
        first: the optional pending TTL counts from when a job last became claimable, so a job
        re-queued or retried is not expired for the time it spent queued or running before."""

    def recently_completed(self, content_type: str, limit: int) -> list[RemoteJob]:
        """The ``limit`` most recently completed jobs of ``content_type``, newest first (for
        ``estimated_completion``; in SQL: ``ORDER BY completed_at DESC LIMIT``)."""

    def finished_before(self, cutoff: datetime, limit: int) -> list[str]:
        """Ids of terminal jobs that finished before ``cutoff`` (for cleanup-old)."""

    def finished_since(self, cutoff: datetime, limit: int, after_id: str | None = None) -> list[str]:
        """Ids of terminal jobs in (finish time, id) order from ``cutoff`` on: finished at or after
        it, or with ``after_id`` after the pair (cutoff, after_id), so a caller can page through
        jobs that share a finish time (reconciling completion events)."""

    def stats(self) -> StoreStats:
        """Counts by (status, content type), the oldest pending job and when each worker was last seen."""

    def has_available(self, content_types: Iterable[str], now: datetime) -> bool:
        """Whether a claim for these content types would find a job now (cheap, no lock held long)."""

    def next_available_at(self, content_types: Iterable[str]) -> datetime | None:
        """When the earliest delayed pending job of these types becomes available."""

    def wait_for_change(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until the store changes; True when it did."""

    def iter_all(self) -> Iterator[RemoteJob]:
        """Every job, for export."""

    def put(self, job: RemoteJob) -> RemoteJob:
        """Store ``job`` as it is (import): replaces any job with the same id."""

    def check_writable(self) -> None:
        """Raise StoreUnavailable when the store cannot take writes."""
