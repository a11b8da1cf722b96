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
from ..exceptions import (InvalidRequest, InvalidTransition, JobNotFound, LeaseConflict, ServiceError, SourceChanged,
                          SourceForbidden)
from ..models import Action, Clock, RemoteJob, Status, from_iso, new_job_id, next_status, to_iso, utcnow
from ..routing import FAIL, HOLD, ON_LAPSE, Capabilities, Requirements, RoutingError
from ..sources import SourceDigests, confine, describe, open_source, sha256_file, stat_key
from ..store.base import ClaimRoute, JobFilter, JobRepository, NoChange, StoreStats, TypeControl, pure
from .estimates import Estimates
from .hooks import Hooks
from .polling import Claimed, ClientCheck, LongPolls

log = structlog.get_logger(__name__)

@dataclass(frozen=True)
class Caller:
    """Who acts on a job: the lease id it sent, and the worker id its key is bound to (if any)."""

    lease_id: str | None = None
    bound_worker_id: str | None = None


# The action a result or a lapse took, read off the status it led to.
_RESULT_ACTIONS = {Status.COMPLETED.value: Action.COMPLETE, Status.FAILED.value: Action.FAIL,
                   Status.PENDING.value: Action.FAIL_RETRY}
_LAPSE_ACTIONS = {Status.PENDING.value: Action.LAPSE_RETRY, Status.TIMEOUT.value: Action.LAPSE,
                  Status.HELD.value: Action.LAPSE_HOLD}
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
        self.polls = LongPolls(store, settings.poll_max_waiters, clock=lambda: self.clock(),
                               route=lambda: ClaimRoute(None, self.settings.max_processing))
        self.estimates = Estimates(store, settings, clock=lambda: self.clock())
        # a finished upload's id -> what a job made from it records (``uploads.Uploads.source_of``)
        self.upload_sources: Callable[[str], dict[str, Any]] | None = None
        self.digests = SourceDigests()  # path sources this process has hashed whole

    # -- producers -------------------------------------------------------------------------------

    def create(self, *, source_file_path: str | None = None, content_type: str, ingestion_task_id: str,
               task_options: dict[str, Any] | None = None, priority: int = 0,
               max_retries: int | None = None, job_id: str | None = None,
               source_upload_id: str | None = None, source_sha256: str | None = None,
               requires: dict[str, Any] | None = None, available_at: Any = None, expires_at: Any = None,
               on_lapse: str | None = None) -> RemoteJob:
        """A new pending job from a path or a finished upload. ``requires`` (routing.Requirements),
        ``available_at`` (not claimed before; a time in the past is now), ``expires_at`` (a job still
        pending then times out instead of being claimed) and ``on_lapse`` (requeue, fail or hold;
        None: the type's ON_LAPSE) are refused with a 422 naming the field."""
        source = self._source(source_file_path, source_upload_id, source_sha256)
        source_file_path = source.pop("source_file_path", source_file_path)
        now = self.clock()
        routing = self._routing_fields(now, requires, available_at, expires_at, on_lapse)
        job = RemoteJob(
            id=job_id or new_job_id(),
            ingestion_task_id=ingestion_task_id,
            source_file_path=source_file_path,
            content_type=content_type,
            task_options=task_options or {},
            created_at=now,
            updated_at=now,
            priority=priority,
            max_retries=self.settings.max_retries if max_retries is None else max_retries,
            **source,
            **{"available_at": now, **routing},
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
        return describe(path, self.settings.source_roots, sha256, self.digests)

    def check_source(self, job: RemoteJob, fh: BinaryIO, st: os.stat_result) -> str | None:
        """The sha256 of the source bytes about to be served (None while it is not known), or
        SourceChanged (409) when they are not the bytes the job was created with: the file's inode,
        size or mtime moved and either no sha256 was known or the bytes hash to another one."""
        if job.source_stat is None:  # a job from before sizes were recorded
            return job.source_sha256
        now = stat_key(st)
        if now == job.source_stat:
            return job.source_sha256 or self.digests.get(st)
        if job.source_sha256 is None or st.st_size != job.source_size:
            raise SourceChanged(f"the source file of job {job.id} changed since the job was created "
                                f"(size {job.source_size} -> {st.st_size}, or modified): its bytes are not served; "
                                "create a new job for the new file", job_status=job.status)
        digest = self.digests.get(st) or sha256_file(fh)[0]
        if digest != job.source_sha256:
            raise SourceChanged(f"the source file of job {job.id} changed since the job was created "
                                f"(sha256 {job.source_sha256} -> {digest}): its bytes are not served",
                                job_status=job.status)
        self.record_source_digest(job.id, digest, st)
        return digest

    def record_source_digest(self, job_id: str, sha256: str, st: os.stat_result) -> None:
        """Cache the sha256 of a job's source (taken by a full download or a re-check) with the stat
        it was taken at, in this process (for the next jobs of the same file) and on the job; a job
        whose source is known to be other bytes is left alone."""
        self.digests.put(st, sha256)
        stat = stat_key(st)

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

    @staticmethod
    def _routing_fields(now, requires: Any, available_at: Any, expires_at: Any,
                        on_lapse: str | None) -> dict[str, Any]:
        def refuse(name: str, message: str) -> InvalidRequest:
            return InvalidRequest(f"{name}: {message}", {name: [message]})

        try:
            rule = Requirements.parse(requires)
        except RoutingError as exc:
            raise refuse(exc.field, exc.message) from None
        times = {}
        for name, value in (("available_at", available_at), ("expires_at", expires_at)):
            try:
                times[name] = from_iso(value) if isinstance(value, str) else value
            except ValueError:
                raise refuse(name, "must be an ISO 8601 timestamp with an offset") from None
        start, end = times["available_at"], times["expires_at"]
        if start is not None and start < now:
            start = None  # "not before" a moment that has passed: now
        if end is not None:
            if end <= now:
                raise refuse("expires_at", f"is in the past ({to_iso(end)}; now is {to_iso(now)})")
            if start is not None and end <= start:
                raise refuse("expires_at", "must be later than available_at")
        if on_lapse is not None and on_lapse not in ON_LAPSE:
            raise refuse("on_lapse", f"must be one of: {', '.join(ON_LAPSE)}")
        out: dict[str, Any] = {"requires": rule.to_dict() if rule else None, "expires_at": end,
                               "on_lapse": on_lapse}
        if start is not None:
            out["available_at"] = start
        return out

    def get(self, job_id: str) -> RemoteJob:
        return self.store.get(job_id)

    def list(self, filters: JobFilter, after: str | None, limit: int) -> tuple[list[RemoteJob], str | None]:
        return self.store.list(filters, after, limit)

    def cancel(self, job_id: str) -> RemoteJob:
        def mutate(job: RemoteJob) -> RemoteJob:
            now = self.clock()
            cancelled = next_status(job.status, Action.CANCEL)
            self.hooks.leaving_terminal(job)  # a held job's event first (inside the critical section)
            job.status = cancelled.value
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
        """Re-open a failed, timed-out, cancelled or held job: it gets one more attempt at least."""

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
             wait: float = 0.0, client_gone: ClientCheck | None = None,
             capabilities: Capabilities | None = None) -> Claimed:
        """Claim up to ``max_jobs`` jobs; with ``wait``, block until one can be claimed or time is up.

        Lapsed leases are handled first (a bounded number per poll), so no cron job is needed for
        a dead worker's job to come back. With ``client_gone`` (is the caller still connected?) a
        long poll whose caller hung up stops waiting, and jobs claimed for a caller that is gone by
        the time they are claimed are handed back at once (:meth:`release`, no attempt counted).
        ``capabilities``: what the worker offers (routing.py); without them it takes only jobs
        that require nothing. ``host_full`` on the answer: nothing claimed, and the poll could not
        wait because the process has its most waiters (polling.py).
        """
        types = list(dict.fromkeys(content_types))
        marker = self.polls.marker()
        jobs = Claimed(self._claim(worker_id, types, max_jobs, capabilities))
        if not jobs and wait > 0:
            jobs = self.polls.wait_for(lambda: self._claim(worker_id, types, max_jobs, capabilities), types,
                                       wait, worker_id, client_gone, capabilities, max_jobs, marker)
        if jobs and client_gone is not None and client_gone():
            log.warning("poll.undeliverable", worker_id=worker_id, jobs=len(jobs),
                        detail="the caller hung up before the answer: the jobs are handed back")
            for job in jobs:
                try:
                    self.release(job.id, Caller(lease_id=job.lease_id))
                except ServiceError as exc:  # the others still go back; this one at its lease's end
                    log.warning("poll.release_failed", job_id=job.id, error=exc.detail)
            return Claimed()
        return jobs

    def _claim(self, worker_id: str, types: list[str], max_jobs: int,
               capabilities: Capabilities | None = None) -> list[RemoteJob]:
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

        route = ClaimRoute(capabilities, self.settings.max_processing)
        jobs = self.store.claim(types, max_jobs, now, mutate, route)
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
        for job_id in self.store.expired_pending(now, limit):
            count += self._apply_if(job_id, self._expire_at, _EXPIRE_ACTIONS)
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
        policy = job.on_lapse or self.settings.on_lapse_for(job.content_type)
        if policy == HOLD:
            job.status = next_status(job.status, Action.LAPSE_HOLD).value
            job.error_message = (f"lease expired while worker {lost_worker} held the job (attempt "
                                 f"{job.attempt}); on_lapse is hold: retry or cancel it")
        elif policy == FAIL:
            job.status = next_status(job.status, Action.LAPSE).value
            job.completed_at = now
            job.error_message = (f"lease expired while worker {lost_worker} held the job; on_lapse is "
                                 "fail: not retried")
        elif job.retry_count < job.max_retries:
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
                    retry_count=job.retry_count, on_lapse=policy)
        return job

    def _expire_at(self, job: RemoteJob) -> RemoteJob:
        """Time out a pending job whose ``expires_at`` has come: it is never handed to a worker."""
        now = self.clock()
        if job.status != Status.PENDING.value or job.expires_at is None or job.expires_at > now:
            raise NoChange(job)
        job.status = next_status(job.status, Action.EXPIRE).value
        job.completed_at = job.updated_at = now
        job.error_message = f"expired at {to_iso(job.expires_at)} before a worker took it"
        log.warning("job.expired", job_id=job.id, expires_at=to_iso(job.expires_at))
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

    # -- operators: pause, resume, limits per content type ----------------------------------------

    def _known_type(self, content_type: str) -> None:
        if content_type not in self.settings.content_types:
            message = f"must be one of: {', '.join(self.settings.content_types)}"
            raise InvalidRequest(f"unknown content type {content_type!r}", {"content_type": [message]})

    def pause(self, content_type: str) -> TypeControl:
        """Stop claims of the type on every process and host (running jobs go on; creates are taken)."""
        self._known_type(content_type)
        control = self.store.set_control(content_type, lambda c: TypeControl(content_type, True, c.max_processing),
                                         self.clock())
        log.warning("type.paused", content_type=content_type)
        return control

    def resume(self, content_type: str) -> TypeControl:
        self._known_type(content_type)
        control = self.store.set_control(content_type, lambda c: TypeControl(content_type, False, c.max_processing),
                                         self.clock())
        log.warning("type.resumed", content_type=content_type)
        return control

    def set_limit(self, content_type: str, max_processing: int | None) -> TypeControl:
        """The most jobs of the type processing at once across the fleet; None: back to MAX_PROCESSING."""
        self._known_type(content_type)
        if max_processing is not None and (isinstance(max_processing, bool) or not isinstance(max_processing, int)
                                           or max_processing < 0):
            raise InvalidRequest("max_processing must be a whole number, 0 or more",
                                 {"max_processing": ["must be a whole number, 0 or more, or null"]})
        control = self.store.set_control(content_type, lambda c: TypeControl(content_type, c.paused, max_processing),
                                         self.clock())
        log.warning("type.limit_set", content_type=content_type, max_processing=max_processing)
        return control

    def type_states(self) -> dict[str, dict[str, Any]]:
        return self.estimates.type_states()

    def type_state(self, control: TypeControl) -> dict[str, Any]:
        return self.type_states()[control.content_type]

    # -- reading ---------------------------------------------------------------------------------

    def stats(self) -> StoreStats:
        return self.store.stats()

    def warm_up(self) -> None:
        """Do before the first request what it would otherwise wait for: the store's index built
        (the file store reads every job once) and its pending jobs ready to be claimed; asking what
        is available does both."""
        self.store.availability(self.settings.content_types, self.clock())


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
