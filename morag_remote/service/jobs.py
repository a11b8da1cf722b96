"""The rules of the queue: claim, lease, heartbeat, result, retry with backoff, cancel, fencing.

Long polls (``polling.py``), estimates and the queue summary (``estimates.py``) and the listeners
and observers told of each change (``hooks.py``) are the service's helpers, in modules of their own.
Every status change is a mutator passed to the repository, which applies it atomically; each mutator
asks :func:`~.models.next_status` first, so the transition table in ``models.py`` is the one place
that says what may happen. Time comes from ``clock``, so tests move it without sleeping.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, BinaryIO, Callable, Iterable

import structlog

from ..config import Settings
from ..exceptions import (InvalidRequest, InvalidTransition, JobNotFound, LeaseConflict, SourceChanged,
                          SourceForbidden)
from ..models import Action, Clock, RemoteJob, Status, new_job_id, next_status, utcnow
from ..sources import confine, describe, open_source, sha256_file, stat_key
from ..store.base import JobFilter, JobRepository, NoChange, StoreStats, pure
from .estimates import Estimates
from .hooks import Hooks
from .polling import LongPolls

log = structlog.get_logger(__name__)

@dataclass(frozen=True)
class Caller:
    """Who acts on a job: the lease id it sent, and the worker id its key is bound to (if any)."""

    lease_id: str | None = None
    bound_worker_id: str | None = None


# The action a result or a lapse took, read off the status it led to.
_RESULT_ACTIONS = {Status.COMPLETED.value: Action.COMPLETE, Status.FAILED.value: Action.FAIL,
                   Status.PENDING.value: Action.FAIL_RETRY}
_LAPSE_ACTIONS = {Status.PENDING.value: Action.LAPSE_RETRY, Status.TIMEOUT.value: Action.LAPSE}
_EXPIRE_ACTIONS = {Status.TIMEOUT.value: Action.EXPIRE}


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
        self.hooks = Hooks()
        self.polls = LongPolls(store, settings.poll_max_waiters, clock=lambda: self.clock())
        self.estimates = Estimates(store, settings, clock=lambda: self.clock())
        # a finished upload's id -> what a job made from it records (``uploads.Uploads.source_of``)
        self.upload_sources: Callable[[str], dict[str, Any]] | None = None

    # -- producers -------------------------------------------------------------------------------

    def create(self, *, source_file_path: str | None = None, content_type: str, ingestion_task_id: str,
               task_options: dict[str, Any] | None = None, priority: int = 0,
               max_retries: int | None = None, job_id: str | None = None,
               source_upload_id: str | None = None, source_sha256: str | None = None) -> RemoteJob:
        source = self._source(source_file_path, source_upload_id, source_sha256)
        source_file_path = source.pop("source_file_path", source_file_path)
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
            **source,
        )
        self.store.create(job)
        log.info("job.created", job_id=job.id, content_type=content_type, priority=priority,
                 ingestion_task_id=ingestion_task_id)
        return job

    def _source(self, path: str | None, upload_id: str | None, sha256: str | None) -> dict[str, Any]:
        """What the job records of its source: a finished upload's (``upload_sources``, set by the
        factory) or a path's, confined to the roots, with its size and stat, and its sha256 verified
        when the producer sent one."""
        if upload_id is not None:
            if self.upload_sources is None:
                raise InvalidRequest("uploads are not enabled", {"source_upload_id": ["not enabled"]})
            source = self.upload_sources(upload_id)
            if sha256 is not None and sha256.lower() != source["source_sha256"]:
                raise InvalidRequest("source_sha256 does not match the upload's sha256",
                                     {"source_sha256": ["does not match the upload"]})
            fh, st = open_source(source["source_file_path"], self.settings.source_roots)
            fh.close()
            return {**source, "source_stat": stat_key(st)}
        if path is None:
            raise InvalidRequest("name the source: source_file_path or source_upload_id",
                                 {"source_file_path": ["give source_file_path or source_upload_id"]})
        confine(path, self.settings.source_roots)
        return describe(path, self.settings.source_roots, sha256)

    def check_source(self, job: RemoteJob, fh: BinaryIO, st: os.stat_result) -> str | None:
        """The sha256 of the source bytes about to be served (None while it is not known), or
        SourceChanged (409) when they are not the bytes the job was created with: the file's inode,
        size or mtime moved and either no sha256 was known or the bytes hash to another one."""
        if job.source_stat is None:  # a job from before sizes were recorded
            return job.source_sha256
        now = stat_key(st)
        if now == job.source_stat:
            return job.source_sha256
        if job.source_sha256 is None or st.st_size != job.source_size:
            raise SourceChanged(f"the source file of job {job.id} changed since the job was created "
                                f"(size {job.source_size} -> {st.st_size}, or modified): its bytes are not served; "
                                "create a new job for the new file", job_status=job.status)
        digest, _ = sha256_file(fh)
        if digest != job.source_sha256:
            raise SourceChanged(f"the source file of job {job.id} changed since the job was created "
                                f"(sha256 {job.source_sha256} -> {digest}): its bytes are not served",
                                job_status=job.status)
        self.record_source_digest(job.id, digest, now)
        return digest

    def record_source_digest(self, job_id: str, sha256: str, stat: dict[str, int]) -> None:
        """Cache the sha256 of a job's source (taken by a full download or a re-check) with the stat
        it was taken at; a job whose source is known to be other bytes is left alone."""
        @pure
        def mutate(job: RemoteJob) -> RemoteJob:
            if job.source_sha256 not in (None, sha256) or job.source_size not in (None, stat["size"]):
                raise NoChange(job)
            job.source_sha256, job.source_size, job.source_stat = sha256, stat["size"], stat
            return job

        try:
            self.store.update(job_id, mutate)
        except (NoChange, JobNotFound):
            return
        log.info("job.source_digest", job_id=job_id, sha256=sha256)

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
        self.hooks.changed(Action.CANCEL, job)
        self.hooks.finished(job)
        return job

    def retry(self, job_id: str) -> RemoteJob:
        """Re-open a failed, timed-out or cancelled job: it gets one more attempt at least."""

        def mutate(job: RemoteJob) -> RemoteJob:
            now = self.clock()
            reopened = next_status(job.status, Action.RETRY)
            self.hooks.leaving_terminal(job)  # inside the store's critical section, before the write
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
        self.hooks.changed(Action.RETRY, job)
        return job

    def delete(self, job_id: str) -> None:
        def leaving(job: RemoteJob) -> bool:
            self.hooks.leaving_terminal(job)  # inside the store's critical section, before the delete
            return True

        self.store.delete(job_id, only_if=leaving)
        log.info("job.deleted", job_id=job_id)

    # -- workers ---------------------------------------------------------------------------------

    def poll(self, worker_id: str, content_types: Iterable[str], max_jobs: int = 1,
             wait: float = 0.0, client_gone: Callable[[], bool] | None = None) -> list[RemoteJob]:
        """Claim up to ``max_jobs`` jobs; with ``wait``, block until one can be claimed or time is up.

        Lapsed leases are handled first (a bounded number per poll), so no cron job is needed for
        a dead worker's job to come back. With ``client_gone`` (is the caller still connected?) a
        long poll whose caller hung up stops waiting, and jobs claimed for a caller that is gone by
        the time they are claimed are handed back at once (:meth:`release`, no attempt counted).
        """
        types = list(dict.fromkeys(content_types))
        marker = self.polls.marker()
        jobs = self._claim(worker_id, types, max_jobs)
        if not jobs and wait > 0:
            jobs = self.polls.wait_for(lambda: self._claim(worker_id, types, max_jobs), types, wait, marker,
                                       worker_id, client_gone)
        if jobs and client_gone is not None and client_gone():
            log.warning("poll.undeliverable", worker_id=worker_id, jobs=len(jobs),
                        detail="the caller hung up before the answer: the jobs are handed back")
            for job in jobs:
                self.release(job.id, Caller(lease_id=job.lease_id))
            return []
        return jobs

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
            self.hooks.changed(Action.CLAIM, job)
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
        self.hooks.changed(Action.HEARTBEAT, job)
        return job

    def release(self, job_id: str, caller: Caller) -> RemoteJob:
        """The holder hands the job back: pending and claimable at once, no failed attempt counted
        (``retry_count`` unchanged; ``releases`` counts how often, so a worker that keeps releasing
        one job shows up). Fenced like a heartbeat: only the current holder may release."""

        @pure
        def mutate(job: RemoteJob) -> RemoteJob:
            self.holder_check(job, caller, Action.RELEASE)
            now = self.clock()
            job.status = next_status(job.status, Action.RELEASE).value
            job.releases += 1
            job.worker_id = job.lease_id = job.timeout_at = None
            job.progress = job.progress_message = None
            job.result_digest = None
            job.available_at = job.updated_at = now
            return job

        job = self.store.update(job_id, mutate)
        log.info("job.released", job_id=job_id, releases=job.releases)
        self.hooks.changed(Action.RELEASE, job)
        return job

    def submit_result(self, job_id: str, caller: Caller, *, success: bool, content: str | None = None,
                      metadata: dict[str, Any] | None = None, error_message: str | None = None,
                      processing_time: float | None = None, retryable: bool | None = None,
                      artifacts: list[dict[str, Any]] | None = None,
                      artifacts_attempt: str | None = None) -> ResultOutcome:
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
                         caller.bound_worker_id, *([artifacts] if artifacts else []))

        @pure
        def mutate(job: RemoteJob) -> RemoteJob:
            if job.result_digest == digest and (caller.lease_id is None or caller.lease_id == job.lease_id):
                raise NoChange(job)  # the same result again (a retried request): answer as before
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
                if artifacts:  # staged for this very attempt: they become the job's with its result
                    if job.lease_id != artifacts_attempt:
                        raise LeaseConflict(f"the artifacts were staged for another attempt of job {job.id}",
                                            job_status=job.status)
                    job.artifacts = artifacts
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
        except NoChange as same:
            log.info("job.result_repeated", job_id=job_id, status=same.job.status)
            return ResultOutcome(same.job, ingestion_continued=self.hooks.accepted(same.job), repeated=True)
        log.info("job.result", job_id=job_id, success=success, job_status=job.status,
                 retry_count=job.retry_count, processing_time=processing_time)
        self.hooks.changed(_RESULT_ACTIONS[job.status], job)
        if job.status == Status.COMPLETED.value:
            self.estimates.completed(job.content_type)
        return ResultOutcome(job, ingestion_continued=self.hooks.finished(job))

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
        except (NoChange, JobNotFound):
            return 0
        self.hooks.changed(actions[job.status], job)
        self.hooks.finished(job)
        return 1

    def _lapse(self, job: RemoteJob) -> RemoteJob:
        now = self.clock()
        if job.status != Status.PROCESSING.value or job.timeout_at is None or job.timeout_at > now:
            raise NoChange(job)
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
            raise NoChange(job)
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
            self.hooks.leaving_terminal(job)
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


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
