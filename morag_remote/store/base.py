"""Every storage interface the service needs, and the :class:`Backend` that bundles one of each.

A backend package (``store/files/``, ``store/postgres/``) implements all of them and imports the
domain modules (models, auth, idempotency, events), never the reverse; ``store/factory.py`` is the
only module that names both. Nothing here knows about leases or retries.

A backend owns the bytes (files, locks, fsync, SQL). The service passes *mutators*: functions that
take the current job and return the new one (or raise a ServiceError to refuse); the backend applies
them atomically, so a rule is checked against the state it replaces and no other process can act
on the job in between.
"""
from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, BinaryIO, Callable, Collection, Iterable, Iterator, Mapping, Protocol

from ..models import RemoteJob
from ..routing import Capabilities, Requirements

if TYPE_CHECKING:
    from ..auth import ApiKey
    from ..events.model import Event
    from ..events.outbox import Checkpoint
    from ..idempotency import IdempotencyRecord
    from ..workers import WorkerRecord

Mutator = Callable[[RemoteJob], RemoteJob]


class NoChange(Exception):
    """Raised by a mutator to leave the job as it is: the backend writes nothing and lets the
    exception reach the caller, which reads the job it carries (a repeated result, a lapse that
    another process handled first). Every backend passes the store contract's test of this."""

    def __init__(self, job: RemoteJob) -> None:
        self.job = job


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


@dataclass(frozen=True)
class TypeControl:
    """An operator's run-time setting of one content type, durable and shared by every process
    and host: paused (not claimed; running jobs go on, creates are accepted) and a fleet-wide limit
    of jobs processing at once that replaces the configured ``MAX_PROCESSING`` (None: the
    configured one, if any)."""

    content_type: str
    paused: bool = False
    max_processing: int | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True)
class ClaimRoute:
    """What a claim may take besides the content types: ``capabilities`` of the poller (None: only
    jobs without requirements) and the configured limits per type (``MAX_PROCESSING``), which a
    stored :class:`TypeControl` overrides. The store applies the controls and counts the jobs
    processing under the same lock (files) or in the same transaction (SQL) as the claim."""

    capabilities: Capabilities | None = None
    limits: Mapping[str, int] = field(default_factory=dict)

    def limit_for(self, content_type: str, control: TypeControl | None) -> int | None:
        if control is not None and control.max_processing is not None:
            return control.max_processing
        return self.limits.get(content_type)


@dataclass(frozen=True)
class Claimable:
    """``count`` pending jobs of ``content_type`` needing ``requirements`` (None: nothing) that a
    claim could take now: the type is not paused and below its limit (the count is capped by the
    room left), the jobs are available. ``count`` may be higher than a claim would find (jobs past
    their ``expires_at``, one type's room shared by its requirement sets): it says how many long
    polls are worth waking, and waking one too many costs a claim, one too few a lost wake-up."""

    content_type: str
    requirements: Requirements | None
    count: int


@dataclass(frozen=True)
class Availability:
    """What waiting long polls of some content types could claim now (:meth:`JobRepository.availability`):
    the claimable jobs per type and requirement set, when that may next change without a write
    (``next_at``: the first delayed job of those types becomes available, or the first lease ends),
    and whether a lease has already lapsed (a claim hands such jobs back before it claims)."""

    ready: tuple[Claimable, ...] = ()
    next_at: datetime | None = None
    lapsed: bool = False


class JobRepository(Protocol):
    def create(self, job: RemoteJob) -> RemoteJob:
        """Store a new job; its id must be new."""

    def get(self, job_id: str) -> RemoteJob:
        """The job, or JobNotFound."""

    def update(self, job_id: str, mutate: Mutator) -> RemoteJob:
        """Apply ``mutate`` to the job atomically and return what was stored."""

    def claim(self, content_types: Iterable[str], limit: int, now: datetime,
              mutate: Mutator, route: ClaimRoute | None = None) -> list[RemoteJob]:
        """Take up to ``limit`` pending jobs available at ``now``, best first, applying ``mutate``:
        never one past its ``expires_at``, none of a paused type, none whose requirements the
        route's capabilities do not meet, and no more of a type than its limit allows (counted
        exactly, against every process and host)."""

    def controls(self) -> dict[str, TypeControl]:
        """Every stored :class:`TypeControl`, by content type."""

    def set_control(self, content_type: str, change: Callable[[TypeControl], TypeControl],
                    now: datetime) -> TypeControl:
        """Apply ``change`` to the type's control (a default one when none is stored) atomically
        and store the result durably; returns it."""

    def expired_pending(self, now: datetime, limit: int) -> list[str]:
        """Ids of pending jobs whose ``expires_at`` is at or before ``now``, soonest first."""

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

    def availability(self, content_types: Iterable[str], now: datetime,
                     route: ClaimRoute | None = None) -> Availability:
        """What a claim for these types could take at ``now`` (``route``'s limits applied; its
        capabilities are not: each :class:`Claimable` names its requirements), for the long polls
        to wake as many waiters per type as there are jobs (one read, no lock held long)."""

    def change_marker(self) -> int | None:
        """A value that moves whenever this process learns of a change, for
        :meth:`wait_for_change`'s ``since``; None when the backend keeps none (then a waiter is
        woken by any change made after it started waiting)."""

    def wait_for_change(self, timeout: float, since: int | None = None) -> bool:
        """Block up to ``timeout`` seconds until the store changes (with ``since``: changed since
        that :meth:`change_marker`); True when it did."""

    def iter_all(self) -> Iterator[RemoteJob]:
        """Every job, for export."""

    def put(self, job: RemoteJob) -> RemoteJob:
        """Store ``job`` as it is (import): replaces any job with the same id."""

    def check_writable(self) -> None:
        """Raise StoreUnavailable when the store cannot take writes."""


class KeyRepository(Protocol):
    """API keys: only their hashes are kept (rules in ``auth.py``)."""

    def create(self, name: str, role: str, worker_id: str | None = None) -> tuple[ApiKey, str]:
        """A new key and its secret (shown once); KeyRequestInvalid when the name is taken."""

    def list(self) -> list[ApiKey]: ...

    def revoke(self, name: str) -> None: ...

    def has_keys(self) -> bool: ...

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key whose hash matches, or None; notes its last use (at most once a minute)."""


class IdempotencyRecords(Protocol):
    """Idempotency-Key records (rules in ``idempotency.py``)."""

    def locked(self, key_id: str) -> AbstractContextManager:
        """Hold the key exclusively (across processes) for a lookup-then-write."""

    def get(self, key_id: str) -> IdempotencyRecord | None: ...

    def put(self, record: IdempotencyRecord) -> None: ...

    def delete(self, key_id: str) -> None: ...

    def purge(self, before: datetime, limit: int) -> int:
        """Remove records created before ``before``; returns how many."""


class EventOutbox(Protocol):
    """Completion events, stored before anyone tries to send them (rules in ``events/``)."""

    def record(self, event: Event, now: datetime, claim_seconds: float | None) -> tuple[Event, bool]:
        """Store ``event`` unless one with its id exists; return the stored event and whether the
        caller now holds a claim on it. With ``claim_seconds`` the caller wants to attempt it at once:
        a new event is claimed by its recorder, an existing one only when it is pending, due and not
        claimed. With None nothing is claimed (the event waits for the next delivery run)."""

    def get(self, event_id: str) -> Event | None:
        """The event, delivered or not; None when there is none with this id."""

    def claim(self, now: datetime, limit: int, claim_seconds: float, *, due_only: bool = True,
              exclude_webhooks: Collection[str | None] = ()) -> list[Event]:
        """Take up to ``limit`` pending events that no one holds (and, with ``due_only``, that are
        due: see :func:`claimable`), oldest :func:`schedule` first, skipping those bound for
        ``exclude_webhooks``; each is marked as an attempt in flight until ``now + claim_seconds``."""

    def mark_delivered(self, event_id: str, now: datetime) -> None:
        """The receiver accepted the event (no-op when it is gone or delivered already)."""

    def mark_failed(self, event_id: str, error: str, next_attempt_at: datetime) -> None:
        """The attempt failed: release the claim, schedule the next attempt."""

    def checkpoint(self) -> Checkpoint | None:
        """How far reconciliation got: every terminal job before it in (finish time, id) order."""

    def set_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Move the reconciliation checkpoint (never backwards)."""

    def purge_delivered(self, before: datetime, limit: int) -> int:
        """Forget delivered events older than ``before``; returns how many."""

    def counts(self) -> dict[str, int]:
        """How many events are pending and delivered."""


class WorkerRegistry(Protocol):
    """The workers heard from (rules in ``workers.py``): telemetry, not acknowledged changes, so a
    backend need not make each write durable before it returns."""

    def seen(self, worker_id: str, when: datetime, content_types: list[str] | None,
             metadata: dict | None) -> None:
        """Record that the worker called at ``when``; keep the stored content types and metadata
        where the call said none."""

    def list(self, since: datetime) -> list[WorkerRecord]:
        """Every worker seen at or after ``since``."""

    def forget_before(self, cutoff: datetime) -> int:
        """Remove workers last seen before ``cutoff``; returns how many."""


class ThroughputSeries(Protocol):
    """Jobs claimed, completed and failed per UTC minute (rules in ``throughput.py``): telemetry,
    added to by every process, bounded by pruning."""

    def add(self, counts: Mapping[datetime, tuple[int, int, int]]) -> None:
        """Add (claims, completions, failures) to each whole minute's counters, atomically against
        other processes adding to the same minute."""

    def read(self, since: datetime) -> dict[datetime, tuple[int, int, int]]:
        """The counters of every stored minute at or after ``since``."""

    def prune(self, before: datetime) -> int:
        """Forget minutes before ``before`` (a backend may keep a few more: it prunes whole files);
        returns how many units were removed."""


@dataclass
class UploadState:
    """A tus upload as the blob store keeps it (next to its bytes): how long it will be, how much
    is durably stored, and once complete the sha256 of the whole file."""

    id: str
    length: int
    offset: int
    created_at: datetime
    expires_at: datetime
    metadata: dict[str, str] = field(default_factory=dict)
    owner: str | None = None              # the API key's name that created it
    declared_sha256: str | None = None    # from Upload-Metadata ``sha256`` (hex)
    sha256: str | None = None             # set when the upload is complete and verified
    completed_at: datetime | None = None

    @property
    def complete(self) -> bool:
        return self.sha256 is not None


@dataclass(frozen=True)
class StoredArtifact:
    """One file a worker uploaded for an attempt: ``file`` is its path inside the blob store."""

    name: str
    size: int
    sha256: str
    file: str


class UploadBusy(Exception):
    """Another request holds the upload (a concurrent PATCH)."""


class BlobStore(Protocol):
    """The bytes that live outside the job records: unfinished uploads (with their state), the
    content-addressed sources finished uploads become, and result artifacts staged per attempt.

    Not a backend's: one ``BLOB_DIR`` may be shared by every API host of either backend, so the
    filesystem implementation (``morag_remote/blobs.py``) serves both. Every write is a temp file,
    fsync and rename (or an append fsynced before it is acknowledged), so a crash leaves at most
    temp files, which :meth:`fsck` removes."""

    sources_dir: str

    def free_bytes(self) -> int:
        """Bytes free for unprivileged writers on the blob store's file system."""

    # -- uploads
    def create_upload(self, state: UploadState) -> None: ...

    def read_upload(self, upload_id: str) -> UploadState | None:
        """The upload's state, or None when there is none (never made, deleted or expired and removed)."""

    def write_upload(self, state: UploadState) -> None:
        """Replace the upload's state durably."""

    def upload_lock(self, upload_id: str) -> AbstractContextManager:
        """Hold the upload exclusively across processes and hosts; UploadBusy when another holds it."""

    def append(self, upload_id: str, offset: int, chunks: Iterable[bytes],
               commit: Callable[[int], bool]) -> int:
        """Write ``chunks`` at ``offset`` (anything past it from an earlier cut is dropped first),
        then ask ``commit(bytes_written)`` whether to keep them: kept bytes are fsynced, and the
        new end is returned; refused bytes (or any exception) truncate back to ``offset``."""

    def read_data(self, upload_id: str) -> Iterator[bytes]:
        """The upload's bytes so far, in pieces."""

    def finalize(self, upload_id: str, sha256: str) -> str:
        """Move the upload's bytes to the content-addressed source (kept once per sha256); the path.
        Idempotent: a finished upload whose bytes were moved already just answers the path."""

    def delete_upload(self, upload_id: str) -> None: ...

    def upload_ids(self) -> list[str]: ...

    def source_path(self, sha256: str) -> str: ...

    # -- artifacts
    def stage_artifact(self, job_id: str, attempt: str, name: str, chunks: Iterable[bytes],
                       max_bytes: int, expect_sha256: bytes | None = None) -> StoredArtifact:
        """Store one artifact of an attempt (it replaces one of the same name, but never the bytes a
        committed result points at); PayloadTooLarge past ``max_bytes``, DigestMismatch when the
        bytes' sha256 is not ``expect_sha256``, nothing left behind either way."""

    def staged_artifacts(self, job_id: str, attempt: str) -> list[StoredArtifact]: ...

    def open_blob(self, path: str) -> tuple[BinaryIO, os.stat_result]:
        """A stored file (relative path) opened for reading; FileNotFoundError when gone."""

    def remove_artifacts(self, job_id: str, keep: Collection[str] = ()) -> int:
        """Remove the job's attempt folders except those named in ``keep``; how many were removed."""

    def artifact_job_ids(self) -> list[str]: ...

    def fsck(self, referenced: Callable[[], tuple[set[str], dict[str, set[str]]] | None],
             repair: bool) -> list[Finding]:
        """Temp files, unfinished leftovers, orphans: ``referenced()`` gives the sources jobs use and
        each job's attempt folders to keep (None: unknown, so nothing counts as an orphan)."""


@dataclass
class Finding:
    """One thing ``fsck`` found: its kind, where, and whether it was repaired."""

    kind: str
    path: str
    job_id: str | None
    detail: str
    repaired: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


class SchemaMigrations(Protocol):
    """A backend whose schema is versioned (PostgreSQL): ``flask db upgrade`` / ``db current``."""

    def upgrade(self) -> tuple[list, int]:
        """Apply the pending migrations; the ones applied and the version reached."""

    def current(self) -> tuple[int, int]:
        """The version the store is at, and the latest this code knows."""


@dataclass
class Backend:
    """One implementation of every storage interface, opened together from the settings."""

    name: str
    jobs: JobRepository
    keys: KeyRepository
    idempotency: IdempotencyRecords
    outbox: EventOutbox
    workers: WorkerRegistry
    throughput: ThroughputSeries
    fsck: Callable[[bool], list[Finding]]
    migrations: SchemaMigrations | None = None
