"""The rules of the queue: claim, lease, heartbeat, result, retry with backoff, cancel, fencing.

Every status change is a mutator passed to the repository, which applies it atomically; each mutator
asks :func:`~.models.next_status` first, so the transition table in ``models.py`` is the one place
that says what may happen. Time comes from ``clock``, so tests move it without sleeping.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import statistics
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, BinaryIO, Callable, Iterable, Protocol

import structlog

from .config import Settings
from .exceptions import InvalidTransition, JobNotFound, LeaseConflict, SourceForbidden
from .models import STATUSES, Action, Clock, RemoteJob, Status, new_job_id, next_status, utcnow
from .sources import confine, open_source
from .store.base import JobFilter, JobRepository, StoreStats, pure

log = structlog.get_logger(__name__)

# The seed's guesses, used by ``estimated_completion`` until a content type has history.
DEFAULT_DURATIONS = {"audio": 300.0, "video": 900.0}
DEFAULT_DURATION = 600.0
DURATION_SAMPLE = 200
DURATION_CACHE_SECONDS = 60.0


@dataclass(frozen=True)
class Caller:
    """Who acts on a job: the lease id it sent, and the worker id its key is bound to (if any)."""

    lease_id: str | None = None
    bound_worker_id: str | None = None


class TerminalListener(Protocol):
    """Told about terminal transitions. A listener may also define ``job_leaving_terminal(job)``,
    called before a terminal job is re-opened (inside the store's critical section) or deleted, and
    ``job_accepted(job) -> bool``: whether the ingestion side has accepted the job's terminal state
    (asked when a worker sends the same result again)."""

    def job_finished(self, job: RemoteJob) -> bool:
        """Called once per terminal transition; True when the ingestion side accepted it now."""


class JobObserver(Protocol):
    def job_changed(self, action: Action, job: RemoteJob) -> None:
        """Told after each committed transition, with the job as stored (metrics count these)."""


# The action a result or a lapse took, read off the status it led to.
_RESULT_ACTIONS = {Status.COMPLETED.value: Action.COMPLETE, Status.FAILED.value: Action.FAIL,
                   Status.PENDING.value: Action.FAIL_RETRY}
_LAPSE_ACTIONS = {Status.PENDING.value: Action.LAPSE_RETRY, Status.TIMEOUT.value: Action.LAPSE}
_EXPIRE_ACTIONS = {Status.TIMEOUT.value: Action.EXPIRE}


class _NoChange(Exception):
    """Raised inside a mutator to leave the job as it is (the repository writes nothing)."""

    def __init__(self, job: RemoteJob) -> None:
        self.job = job


@dataclass
class ResultOutcome:
    job: RemoteJob
    ingestion_continued: bool
    repeated: bool = False


class JobService:
    def __init__(self, store: JobRepository, settings: Settings, clock: Clock = utcnow,
                 rng: Callable[[], float] = random.random) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.rng = rng
        self.listeners: list[TerminalListener] = []
        self.observers: list[JobObserver] = []
        self._waiters = threading.BoundedSemaphore(max(settings.poll_max_waiters, 1))
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        self._durations: dict[str, tuple[float, float | None]] = {}
        self.duration_sample = DURATION_SAMPLE

    # -- producers -------------------------------------------------------------------------------

    def create(self, *, source_file_path: str, content_type: str, ingestion_task_id: str,
               task_options: dict[str, Any] | None = None, priority: int = 0,
               max_retries: int | None = None, job_id: str | None = None) -> RemoteJob:
        confine(source_file_path, self.settings.source_roots)
        now = self.clock()
        job = RemoteJob(
            id=job_id or new_job_id(),
            ingestion_task_id=ingestion_task_id,
            source_file_path=source_file_path,
            content_type=content_type,
            task_options=task_options or {},
            created_at=now,
            updated_at=now,
            available_at=now,
            priority=priority,
            max_retries=self.settings.max_retries if max_retries is None else max_retries,
        )
        self.store.create(job)
        log.info("job.created", job_id=job.id, content_type=content_type, priority=priority,
                 ingestion_task_id=ingestion_task_id)
        return job

    def get(self, job_id: str) -> RemoteJob:
        return self.store.get(job_id)

    def list(self, filters: JobFilter, after: str | None, limit: int) -> tuple[list[RemoteJob], str | None]:
        return self.store.list(filters, after, limit)

    def cancel(self, job_id: str) -> RemoteJob:
        def mutate(job: RemoteJob) -> RemoteJob:
            now = self.clock()
            job.status = next_status(job.status, Action.CANCEL).value
            job.completed_at = now
            job.lease_id = None
            job.timeout_at = None
            job.result_digest = None  # a failure resent after the cancel is a late result (409), not a repeat
            job.updated_at = now
            return job

        job = self.store.update(job_id, mutate)
        log.info("job.cancelled", job_id=job_id)
        self._observe(Action.CANCEL, job)
        self._finished(job)
        return job

    def retry(self, job_id: str) -> RemoteJob:
        """Re-open a failed, timed-out or cancelled job: it gets one more attempt at least."""

        def mutate(job: RemoteJob) -> RemoteJob:
            now = self.clock()
            reopened = next_status(job.status, Action.RETRY)
            self._leaving_terminal(job)  # inside the store's critical section, before the write
            job.status = reopened.value
            job.max_retries = max(job.max_retries, job.retry_count + 1)
            job.worker_id = job.lease_id = None
            job.started_at = job.completed_at = job.timeout_at = None
            job.error_message = None
            job.result_data = job.result_digest = None
            job.progress = job.progress_message = None
            job.available_at = job.updated_at = now
            return job

        job = self.store.update(job_id, mutate)
        log.info("job.retried", job_id=job_id)
        self._observe(Action.RETRY, job)
        return job

    def delete(self, job_id: str) -> None:
        def leaving(job: RemoteJob) -> bool:
            self._leaving_terminal(job)  # inside the store's critical section, before the delete
            return True

        self.store.delete(job_id, only_if=leaving)
        log.info("job.deleted", job_id=job_id)

    # -- workers ---------------------------------------------------------------------------------

    def poll(self, worker_id: str, content_types: Iterable[str], max_jobs: int = 1,
             wait: float = 0.0) -> list[RemoteJob]:
        """Claim up to ``max_jobs`` jobs; with ``wait``, block until one can be claimed or time is up.

        Lapsed leases are handled first (a bounded number per poll), so no cron job is needed for
        a dead worker's job to come back.
        """
        types = list(dict.fromkeys(content_types))
        marker = self._change_marker()
        jobs = self._claim(worker_id, types, max_jobs)
        if jobs or wait <= 0:
            return jobs
        if not self._waiters.acquire(blocking=False):
            log.warning("poll.waiters_full", worker_id=worker_id)
            return jobs
        self._count_waiting(+1)
        try:
            deadline = time.monotonic() + wait
            while not jobs:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                timeout = min(remaining, self._next_wake(types))
                if marker is None:
                    self.store.wait_for_change(timeout)
                else:
                    self.store.wait_for_change(timeout, since=marker)
                marker = self._change_marker()
                if self.store.has_available(types, self.clock()) or self.store.lapsed(self.clock(), 1):
                    jobs = self._claim(worker_id, types, max_jobs)
        finally:
            self._count_waiting(-1)
            self._waiters.release()
        return jobs

    @property
    def waiting(self) -> int:
        """How many long polls of this process are waiting right now."""
        return self._waiting

    def _count_waiting(self, delta: int) -> None:
        with self._waiting_lock:
            self._waiting += delta

    def _change_marker(self) -> int | None:
        """The store's change counter, taken before looking for work, so that a job created
        between the look and the wait wakes the waiter (None: a store without one)."""
        marker = getattr(self.store, "change_marker", None)
        return marker() if marker is not None else None

    def _next_wake(self, types: list[str]) -> float:
        """How long a long poll may sleep before a delayed job or a lease could need it (<= 2 s)."""
        wake = 2.0
        next_at = self.store.next_available_at(types)
        if next_at is not None:
            wake = min(wake, max((next_at - self.clock()).total_seconds(), 0.01))
        return wake

    def _claim(self, worker_id: str, types: list[str], max_jobs: int) -> list[RemoteJob]:
        self.expire_due(self.settings.lapsed_per_poll)
        now = self.clock()

        def mutate(job: RemoteJob) -> RemoteJob:
            job.status = next_status(job.status, Action.CLAIM).value
            lease = self.settings.lease_for(job.content_type)
            job.worker_id = worker_id
            job.started_at = job.heartbeat_at = job.updated_at = now
            job.timeout_at = now + timedelta(seconds=lease)
            job.attempt += 1
            job.lease_id = uuid.uuid4().hex
            job.progress = job.progress_message = None
            job.result_digest = None
            return job

        jobs = self.store.claim(types, max_jobs, now, mutate)
        for job in jobs:
            log.info("job.claimed", job_id=job.id, worker_id=worker_id, attempt=job.attempt,
                     lease_s=self.settings.lease_for(job.content_type))
            self._observe(Action.CLAIM, job)
        return jobs

    def holder_check(self, job: RemoteJob, caller: Caller, action: Action | None = None) -> None:
        """Refuse unless ``caller`` may act for the job's current attempt.

        With an ``action``, the job's status is checked against the transition table first
        (InvalidTransition: a cancelled or re-queued job cannot be completed); then the lease
        (LeaseConflict: the job is processing, but for another attempt or another worker). Both
        are 409 and change nothing.
        """
        if action is not None:
            next_status(job.status, action)
        elif job.status != Status.PROCESSING.value:
            raise LeaseConflict(f"job {job.id} is {job.status}: no lease is held on it",
                                job_status=job.status)
        if caller.lease_id is not None and caller.lease_id != job.lease_id:
            raise LeaseConflict(f"lease {caller.lease_id} is not the current lease of job {job.id}",
                                job_status=job.status)
        if caller.bound_worker_id is not None and caller.bound_worker_id != job.worker_id:
            raise LeaseConflict(f"job {job.id} is not held by worker {caller.bound_worker_id}",
                                job_status=job.status)

    def open_source(self, job_id: str, caller: Caller, privileged: bool = False) -> tuple[RemoteJob, BinaryIO, os.stat_result]:
        """The job and its source opened for reading, for the worker holding the current attempt.

        A worker proves the attempt with the poll response's download token (or ``X-Lease-Id``),
        or by a key bound to the worker that holds the job; ``privileged`` (admin) skips that.
        """
        job = self.store.get(job_id)
        if not privileged:
            if caller.lease_id is None and caller.bound_worker_id is None:
                raise SourceForbidden("use the source_file_url from the poll response, or send X-Lease-Id")
            self.holder_check(job, caller)
        fh, st = open_source(job.source_file_path, self.settings.source_roots)
        return job, fh, st

    def heartbeat(self, job_id: str, caller: Caller, progress: float | None = None,
                  message: str | None = None) -> RemoteJob:
        @pure
        def mutate(job: RemoteJob) -> RemoteJob:
            if job.status == Status.CANCELLED.value:
                raise InvalidTransition(f"job {job_id} was cancelled; stop working on it",
                                        job_status=job.status, action=Action.HEARTBEAT.value)
            self.holder_check(job, caller, Action.HEARTBEAT)
            now = self.clock()
            job.status = next_status(job.status, Action.HEARTBEAT).value
            job.timeout_at = now + timedelta(seconds=self.settings.lease_for(job.content_type))
            job.heartbeat_at = job.updated_at = now
            if progress is not None:
                job.progress = progress
            if message is not None:
                job.progress_message = message
            return job

        job = self.store.update(job_id, mutate)
        self._observe(Action.HEARTBEAT, job)
        return job

    def submit_result(self, job_id: str, caller: Caller, *, success: bool, content: str | None = None,
                      metadata: dict[str, Any] | None = None, error_message: str | None = None,
                      processing_time: float | None = None, retryable: bool | None = None) -> ResultOutcome:
        """Record a worker's result for the job's current attempt.

        Fencing: a caller that sends a lease id must hold the current one, and a key bound to a
        worker id must belong to the current holder; otherwise 409 and nothing changes. The seed's
        worker sends neither, so it cannot be told apart from the current holder: its result is
        accepted while the job is processing, which makes the first result for the current attempt
        win, and the other worker's result then gets 409 (its download token was already fenced).
        The same result sent again (same body, same or no lease id, and a key with the same worker
        binding or none) answers with the same status, without a second completion, and
        ``ingestion_continued`` true when the receiver has accepted the job's event by now. The binding is
        part of the digest rather than compared with ``job.worker_id``: a failure that re-queued the
        job cleared its worker id, and the worker's retried request must still get its first answer.
        """
        digest = _digest(success, content, metadata, error_message, processing_time, retryable,
                         caller.bound_worker_id)

        @pure
        def mutate(job: RemoteJob) -> RemoteJob:
            if job.result_digest == digest and (caller.lease_id is None or caller.lease_id == job.lease_id):
                raise _NoChange(job)  # the same result again (a retried request): answer as before
            self.holder_check(job, caller, Action.COMPLETE if success else Action.FAIL)
            now = self.clock()
            job.updated_at = now
            job.result_digest = digest
            if success:
                job.status = next_status(job.status, Action.COMPLETE).value
                job.completed_at = now
                job.progress = 1.0
                job.result_data = {"content": content or "", "metadata": metadata or {},
                                   "processing_time": processing_time or 0.0}
                job.error_message = None
                return job
            job.error_message = error_message or "the worker reported a failure"
            if retryable is not False and job.retry_count < job.max_retries:
                job.status = next_status(job.status, Action.FAIL_RETRY).value
                job.retry_count += 1
                job.available_at = now + timedelta(seconds=self.backoff(job.retry_count))
                job.worker_id = job.timeout_at = None
            else:
                job.status = next_status(job.status, Action.FAIL).value
                job.completed_at = now
            return job

        try:
            job = self.store.update(job_id, mutate)
        except _NoChange as same:
            log.info("job.result_repeated", job_id=job_id, status=same.job.status)
            return ResultOutcome(same.job, ingestion_continued=self._accepted(same.job), repeated=True)
        log.info("job.result", job_id=job_id, success=success, job_status=job.status,
                 retry_count=job.retry_count, processing_time=processing_time)
        self._observe(_RESULT_ACTIONS[job.status], job)
        if job.status == Status.COMPLETED.value:
            self._durations.pop(job.content_type, None)  # a new observation: estimate afresh
        return ResultOutcome(job, ingestion_continued=self._finished(job))

    def backoff(self, n: int) -> float:
        """Delay before the n-th retry: doubling from the base, capped, plus up to 10% jitter."""
        base = min(self.settings.retry_backoff_seconds * 2 ** (n - 1), self.settings.retry_backoff_max_seconds)
        return base * (1 + 0.1 * self.rng())

    # -- time-driven transitions -----------------------------------------------------------------

    def expire_due(self, limit: int | None = None) -> int:
        """Re-queue or time out lapsed leases, and time out pending jobs past the optional TTL."""
        now = self.clock()
        limit = limit or 1_000_000
        count = 0
        for job_id in self.store.lapsed(now, limit):
            count += self._apply_if(job_id, self._lapse, _LAPSE_ACTIONS)
        ttl = self.settings.pending_ttl_seconds
        if ttl:
            cutoff = now - timedelta(seconds=ttl)
            for job_id in self.store.pending_available_before(cutoff, limit):
                count += self._apply_if(job_id, self._expire_pending, _EXPIRE_ACTIONS)
        return count

    def _apply_if(self, job_id: str, mutate: Callable[[RemoteJob], RemoteJob],
                  actions: dict[str, Action]) -> int:
        try:
            job = self.store.update(job_id, mutate)
        except (_NoChange, JobNotFound):
            return 0
        self._observe(actions[job.status], job)
        self._finished(job)
        return 1

    def _lapse(self, job: RemoteJob) -> RemoteJob:
        now = self.clock()
        if job.status != Status.PROCESSING.value or job.timeout_at is None or job.timeout_at > now:
            raise _NoChange(job)
        lost_worker = job.worker_id
        if job.retry_count < job.max_retries:
            job.status = next_status(job.status, Action.LAPSE_RETRY).value
            job.retry_count += 1
            job.available_at = now
            job.worker_id = None
        else:
            job.status = next_status(job.status, Action.LAPSE).value
            job.completed_at = now
            job.error_message = f"lease expired {job.attempt} times; no retry left"
        job.lease_id = job.timeout_at = None
        job.updated_at = now
        log.warning("job.lease_expired", job_id=job.id, worker_id=lost_worker, job_status=job.status,
                    retry_count=job.retry_count)
        return job

    def _expire_pending(self, job: RemoteJob) -> RemoteJob:
        """Time out a job that stayed claimable for the whole TTL: counted from ``available_at``
        (creation, re-queue or explicit retry, or the end of a backoff), not from creation."""
        now = self.clock()
        ttl = self.settings.pending_ttl_seconds or 0
        waiting_since = job.available_at or job.created_at
        if job.status != Status.PENDING.value or waiting_since > now - timedelta(seconds=ttl):
            raise _NoChange(job)
        job.status = next_status(job.status, Action.EXPIRE).value
        job.completed_at = job.updated_at = now
        job.error_message = f"no worker took the job within {ttl:g} s"
        log.warning("job.pending_expired", job_id=job.id)
        return job

    def cleanup_old(self, days: float) -> int:
        cutoff = self.clock() - timedelta(days=days)
        count = 0

        def still_old(job: RemoteJob) -> bool:
            """Checked under the store's lock: the job may have been re-opened since it was listed."""
            if not Status(job.status).is_terminal or (job.completed_at or job.updated_at) >= cutoff:
                log.info("job.cleanup_skipped", job_id=job.id, job_status=job.status)
                return False
            self._leaving_terminal(job)
            return True

        for job_id in self.store.finished_before(cutoff, 1_000_000):
            try:
                if self.store.delete(job_id, only_if=still_old):
                    count += 1
            except JobNotFound:
                continue
        log.info("jobs.cleaned", count=count, days=days)
        return count

    # -- reading ---------------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        return self.store.stats()

    def queue_summary(self) -> dict[str, Any]:
        """What ``/stats``, ``remote-jobs stats`` and the metrics gauges report: counts by status and
        content type, totals, the age of the oldest pending job, and the workers seen within the
        longest lease period."""
        stats = self.store.stats()
        now = self.clock()
        counts: dict[str, dict[str, int]] = {status: {} for status in STATUSES}
        for (status, content_type), n in stats.counts.items():
            counts.setdefault(status, {})[content_type] = n
        oldest = stats.oldest_pending_created_at
        window = timedelta(seconds=max(self.settings.lease_seconds.values(), default=3600))
        active = sorted(w for w, seen in stats.worker_last_seen.items() if seen and now - seen <= window)
        return {
            "counts": counts,
            "totals": {status: sum(per.values()) for status, per in counts.items()},
            "oldest_pending_age_seconds": round((now - oldest).total_seconds(), 3) if oldest else None,
            "active_workers": active,
        }

    def estimated_completion(self, job: RemoteJob) -> datetime | None:
        if job.status != Status.PROCESSING.value or job.started_at is None:
            return None
        return job.started_at + timedelta(seconds=self.typical_duration(job.content_type))

    def typical_duration(self, content_type: str) -> float:
        """Median duration (claim to result) of the most recently completed jobs of this type.

        Cached a minute per process; a completion seen by this process drops the cached value.
        """
        now = time.monotonic()
        cached = self._durations.get(content_type)
        if cached is None or now - cached[0] > DURATION_CACHE_SECONDS:
            done = self.store.recently_completed(content_type, self.duration_sample)
            durations = [(j.completed_at - j.started_at).total_seconds()
                         for j in done if j.completed_at and j.started_at]
            cached = (now, statistics.median(durations) if durations else None)
            self._durations[content_type] = cached
        if cached[1] is not None:
            return cached[1]
        return DEFAULT_DURATIONS.get(content_type, DEFAULT_DURATION)

    def _observe(self, action: Action, job: RemoteJob) -> None:
        """Tell every observer; one that fails is logged, never allowed to fail the transition."""
        for observer in self.observers:
            try:
                observer.job_changed(action, job)
            except Exception:
                log.exception("job.observer_failed", observer=type(observer).__name__, action=action.value,
                              job_id=job.id)

    def _finished(self, job: RemoteJob) -> bool:
        if not Status(job.status).is_terminal:
            return False
        accepted = False
        for listener in self.listeners:  # the change is committed: a listener's failure must not fail it
            try:
                accepted = listener.job_finished(job) or accepted
            except Exception:
                log.exception("job.listener_failed", listener=type(listener).__name__, job_id=job.id)
        return accepted

    def _accepted(self, job: RemoteJob) -> bool:
        """For a repeated result: whether the ingestion side has accepted the job's terminal state
        by now (the first answer said whether it did during that request; a retried request whose
        first answer was lost learns the same, or better: a later delivery counts)."""
        if not Status(job.status).is_terminal:
            return False
        try:
            return any(getattr(listener, "job_accepted", lambda _job: False)(job) for listener in self.listeners)
        except Exception:  # the outbox cannot be read now: the repeat is still answered
            log.exception("job.listener_failed", job_id=job.id)
            return False

    def _leaving_terminal(self, job: RemoteJob) -> None:
        """Tell listeners a job is about to leave a terminal state or be deleted (they may need to
        record what that state meant first, e.g. a completion event not yet recorded)."""
        if not Status(job.status).is_terminal:
            return
        for listener in self.listeners:
            hook = getattr(listener, "job_leaving_terminal", None)
            if hook is not None:
                hook(job)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


__all__ = ["Caller", "JobService", "ResultOutcome", "InvalidTransition"]
