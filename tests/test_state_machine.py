"""Property-based test of the queue: random sequences of create, claim (by several workers, through
two store instances on one directory, as two gunicorn processes would), heartbeat, result, lease
lapse, release, cancel, retry and delete, checked after every step against a simple model. Jobs
may require GPU memory that a poll may offer (routing), and carry an ``on_lapse`` policy
(requeue, fail, hold: a held job waits for a retry or a cancel).

After every step: no job is lost or invented, each job is in exactly one status directory on disk,
its stored status, retry count, worker and lease agree with the model, and both "processes" see the
same counts. Each claim takes only jobs that were pending and available, best first; a heartbeat or
result from anyone but the current attempt is refused (LeaseConflict while the job is processing for
another attempt, InvalidTransition once it is not processing: both 409) and leaves the job's file
untouched.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, multiple, precondition, rule

from support.actions import FakeClock
from morag_remote.config import Settings
from morag_remote.exceptions import InvalidTransition, JobNotFound, LeaseConflict
from morag_remote.models import STATUSES
from morag_remote.routing import Capabilities
from morag_remote.service import Caller, JobService
from morag_remote.store.files.jobs import FileJobStore

pytestmark = pytest.mark.slow

WORKERS = ("w1", "w2", "w3")
TYPES = ("audio", "video")
LEASES = {"audio": 60, "video": 120, "default": 60}
BACKOFF, BACKOFF_MAX, JITTER = 10.0, 40.0, 0.5
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


@dataclass
class Model:
    """What the contract says a job is now (``lease_id`` mirrors the record's field, which a
    re-queue by failure keeps and a lapse, cancel or retry clears)."""

    status: str
    content_type: str
    priority: int
    created_at: datetime
    max_retries: int
    available_at: datetime
    retry_count: int = 0
    worker_id: str | None = None
    lease_id: str | None = None
    timeout_at: datetime | None = None
    result: tuple | None = None  # the last accepted result body (for idempotent re-submission)
    leases: list[str] = field(default_factory=list)  # every lease ever granted, oldest first
    needs_gb: int | None = None   # requires: {"min": {"gpu_memory_gb": needs_gb}}
    on_lapse: str | None = None   # None: requeue (the configured default)


def backoff(n: int) -> timedelta:
    return timedelta(seconds=min(BACKOFF * 2 ** (n - 1), BACKOFF_MAX) * (1 + 0.1 * JITTER))


class QueueMachine(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="morag-queue-"))
        sources = self.dir / "sources"
        sources.mkdir()
        self.source = sources / "input.bin"
        self.source.write_bytes(b"data")
        self.clock = FakeClock(START)
        config = Settings(content_types=TYPES, lease_seconds=LEASES, max_retries=1,
                          retry_backoff_seconds=BACKOFF, retry_backoff_max_seconds=BACKOFF_MAX,
                          lapsed_per_poll=10_000, source_roots=(str(sources),))
        self.stores = [FileJobStore(self.dir / "data"), FileJobStore(self.dir / "data")]
        self.services = [JobService(s, config, clock=self.clock, rng=lambda: JITTER) for s in self.stores]
        self.model: dict[str, Model] = {}
        self.serial = 0

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------------

    def _files(self, job_id: str) -> list[Path]:
        return [p for s in STATUSES if (p := self.dir / "data" / s / f"{job_id}.json").exists()]

    def _bytes(self, job_id: str) -> bytes | None:
        files = self._files(job_id)
        return files[0].read_bytes() if files else None

    def _lapse_due(self) -> None:
        """What expire_due (run by every poll, and by the CLI) must do to the model."""
        now = self.clock()
        for m in self.model.values():
            if m.status == "processing" and m.timeout_at <= now:
                if m.on_lapse == "hold":
                    m.status = "held"
                elif m.on_lapse == "fail":
                    m.status = "timeout"
                elif m.retry_count < m.max_retries:
                    m.status, m.retry_count, m.available_at, m.worker_id = "pending", m.retry_count + 1, now, None
                else:
                    m.status = "timeout"
                m.lease_id = m.timeout_at = None

    def _caller(self, m: Model | None, kind: str) -> Caller:
        if kind == "current":
            return Caller(lease_id=m.leases[-1] if m and m.leases else "never-granted")
        if kind == "anonymous":
            return Caller()
        return Caller(bound_worker_id=kind)  # a key bound to this worker id

    @staticmethod
    def _refusal(m: Model, caller: Caller) -> type[Exception] | None:
        """Why ``caller`` may not heartbeat or submit a result for the job now (None: it may).

        A job that is not processing refuses the action itself (InvalidTransition); a processing
        job refuses a caller of another attempt or another worker (LeaseConflict). Both are 409."""
        if m.status != "processing":
            return InvalidTransition
        if (caller.lease_id is not None and caller.lease_id != m.lease_id) or \
                (caller.bound_worker_id is not None and caller.bound_worker_id != m.worker_id):
            return LeaseConflict
        return None

    def _refused(self, job_id: str, call, error: type[Exception]) -> None:
        event(f"refused: {error.__name__}")
        before = self._bytes(job_id)
        with pytest.raises(error):
            call()
        assert self._bytes(job_id) == before, f"a refused call changed job {job_id}"

    # -- producers -------------------------------------------------------------------------------

    JOB = st.tuples(st.sampled_from(TYPES), st.integers(-1, 1), st.integers(0, 2), st.integers(0, 1),
                    st.sampled_from((None, None, 24, 80)), st.sampled_from((None, None, "fail", "hold")))

    @initialize(target=jobs, specs=st.lists(JOB, min_size=1, max_size=4))
    def queue(self, specs):
        """Start with a few jobs, so most runs spend their steps on claims and results."""
        return multiple(*(self._create(*spec) for spec in specs))

    @rule(target=jobs, spec=JOB)
    def create(self, spec):
        return self._create(*spec)

    def _create(self, content_type: str, priority: int, max_retries: int, via: int, needs_gb: int | None = None,
                on_lapse: str | None = None) -> str:
        requires = None if needs_gb is None else {"min": {"gpu_memory_gb": needs_gb}}
        job = self.services[via].create(source_file_path=str(self.source), content_type=content_type,
                                        ingestion_task_id="ingest", priority=priority, max_retries=max_retries,
                                        requires=requires, on_lapse=on_lapse)
        now = self.clock()
        self.model[job.id] = Model("pending", content_type, priority, now, max_retries, available_at=now,
                                   needs_gb=needs_gb, on_lapse=on_lapse)
        return job.id

    @rule(job_id=jobs, via=st.integers(0, 1))
    def cancel(self, job_id, via):
        m = self.model.get(job_id)
        if m is None:
            return self._refused(job_id, lambda: self.services[via].cancel(job_id), JobNotFound)
        if m.status not in ("pending", "processing", "held"):
            return self._refused(job_id, lambda: self.services[via].cancel(job_id), InvalidTransition)
        assert self.services[via].cancel(job_id).status == "cancelled"
        m.status, m.lease_id, m.timeout_at = "cancelled", None, None

    @rule(job_id=jobs, via=st.integers(0, 1))
    def retry(self, job_id, via):
        m = self.model.get(job_id)
        if m is None:
            return self._refused(job_id, lambda: self.services[via].retry(job_id), JobNotFound)
        if m.status not in ("failed", "timeout", "cancelled", "held"):
            return self._refused(job_id, lambda: self.services[via].retry(job_id), InvalidTransition)
        assert self.services[via].retry(job_id).status == "pending"
        m.status, m.available_at = "pending", self.clock()
        m.max_retries = max(m.max_retries, m.retry_count + 1)
        m.worker_id = m.lease_id = m.timeout_at = m.result = None

    @rule(job_id=jobs, via=st.integers(0, 1))
    def delete(self, job_id, via):
        if job_id not in self.model:
            return self._refused(job_id, lambda: self.services[via].delete(job_id), JobNotFound)
        self.services[via].delete(job_id)
        del self.model[job_id]

    # -- workers ---------------------------------------------------------------------------------

    @rule(worker=st.sampled_from(WORKERS), types=st.sampled_from([("audio",), ("video",), TYPES]),
          max_jobs=st.integers(1, 3), via=st.integers(0, 1), gb=st.sampled_from((None, 24, 80)))
    def poll(self, worker, types, max_jobs, via, gb):
        self._lapse_due()
        now = self.clock()
        available = sorted(
            (job_id for job_id, m in self.model.items()
             if m.status == "pending" and m.content_type in types and m.available_at <= now
             and (m.needs_gb is None or (gb is not None and gb >= m.needs_gb))),
            key=lambda j: (-self.model[j].priority, self.model[j].created_at, j))
        caps = None if gb is None else Capabilities(resources={"gpu_memory_gb": gb})
        claimed = self.services[via].poll(worker, list(types), max_jobs, capabilities=caps)
        assert [j.id for j in claimed] == available[:max_jobs], "claimed other jobs than the best available"
        event(f"poll claimed {len(claimed)}")
        for job in claimed:
            m = self.model[job.id]
            assert m.status == "pending", f"claimed job {job.id} that was {m.status}"
            assert job.lease_id and job.lease_id not in m.leases
            m.status, m.worker_id, m.lease_id = "processing", worker, job.lease_id
            m.timeout_at = now + timedelta(seconds=LEASES[m.content_type])
            m.result = None
            m.leases.append(job.lease_id)

    @rule(job_id=jobs, kind=st.sampled_from(("current", "anonymous", *WORKERS)), via=st.integers(0, 1))
    def heartbeat(self, job_id, kind, via):
        m = self.model.get(job_id)
        caller = self._caller(m, kind)
        call = lambda: self.services[via].heartbeat(job_id, caller, progress=0.5)  # noqa: E731
        if m is None:
            return self._refused(job_id, call, JobNotFound)
        if refusal := self._refusal(m, caller):
            return self._refused(job_id, call, refusal)
        job = call()
        event("heartbeat accepted")
        m.timeout_at = self.clock() + timedelta(seconds=LEASES[m.content_type])
        assert job.timeout_at == m.timeout_at

    def _held(self) -> list[str]:
        return sorted(job_id for job_id, m in self.model.items() if m.status == "processing")

    @precondition(lambda self: self._held())
    @rule(data=st.data(), kind=st.sampled_from(("current", "anonymous", *WORKERS)), via=st.integers(0, 1))
    def heartbeat_on_held_job(self, data, kind, via):
        self.heartbeat(data.draw(st.sampled_from(self._held()), label="job"), kind, via)

    @precondition(lambda self: self._held())
    @rule(data=st.data(), kind=st.sampled_from(("current", "anonymous", *WORKERS)), success=st.booleans(),
          retryable=st.sampled_from((None, True, False)), via=st.integers(0, 1))
    def result_on_held_job(self, data, kind, success, retryable, via):
        self.result(data.draw(st.sampled_from(self._held()), label="job"), kind, success, retryable, via)

    @precondition(lambda self: self._held())
    @rule(data=st.data(), kind=st.sampled_from(("current", "anonymous", *WORKERS)), via=st.integers(0, 1))
    def release_held_job(self, data, kind, via):
        job_id = data.draw(st.sampled_from(self._held()), label="job")
        m = self.model[job_id]
        caller = self._caller(m, kind)
        call = lambda: self.services[via].release(job_id, caller)  # noqa: E731
        if refusal := self._refusal(m, caller):
            return self._refused(job_id, call, refusal)
        job = call()
        event("release accepted")
        m.status, m.worker_id, m.lease_id, m.timeout_at, m.result = "pending", None, None, None, None
        m.available_at = self.clock()
        assert job.status == "pending" and job.retry_count == m.retry_count

    @precondition(lambda self: self._held())
    @rule(data=st.data(), late=st.sampled_from((0, 1)), via=st.integers(0, 1))
    def lease_runs_out(self, data, late, via):
        """Time moves to a held job's deadline (exactly, or a second past it) and the reaper runs."""
        deadline = self.model[data.draw(st.sampled_from(self._held()), label="job")].timeout_at
        self.clock.now = deadline + timedelta(seconds=late)
        self.expire_due(via)

    def _held_again(self) -> list[str]:
        return [job_id for job_id in self._held() if len(self.model[job_id].leases) > 1]

    @precondition(lambda self: self._held_again())
    @rule(data=st.data(), via=st.integers(0, 1))
    def earlier_worker_is_fenced(self, data, via):
        """A job re-queued and claimed again: the worker of an earlier attempt is refused."""
        self.stale_lease_is_fenced(data.draw(st.sampled_from(self._held_again()), label="job"), data, via)

    @rule(job_id=jobs, data=st.data(), via=st.integers(0, 1))
    def stale_lease_is_fenced(self, job_id, data, via):
        """A lease of an attempt that is over: heartbeat and result are refused and change nothing."""
        m = self.model.get(job_id)
        stale = [lease for lease in (m.leases if m else []) if lease != m.lease_id or m.status != "processing"]
        if not stale:
            return
        caller = Caller(lease_id=data.draw(st.sampled_from(stale), label="stale lease"))
        event("stale lease tried" + (" on a held job" if m.status == "processing" else ""))
        refusal = self._refusal(m, caller)
        self._refused(job_id, lambda: self.services[via].heartbeat(job_id, caller), refusal)
        self._refused(job_id, lambda: self.services[via].submit_result(
            job_id, caller, success=True, content=f"late-{self._next()}"), refusal)

    def _next(self) -> int:
        self.serial += 1
        return self.serial

    @rule(job_id=jobs, kind=st.sampled_from(("current", "anonymous", *WORKERS)), success=st.booleans(),
          retryable=st.sampled_from((None, True, False)), via=st.integers(0, 1))
    def result(self, job_id, kind, success, retryable, via):
        m = self.model.get(job_id)
        caller = self._caller(m, kind)
        body = {"success": success, "retryable": retryable,
                **({"content": f"text-{self._next()}"} if success else {"error_message": f"err-{self._next()}"})}
        self._submit(job_id, m, caller, body, via)

    @rule(job_id=jobs, via=st.integers(0, 1))
    def result_again(self, job_id, via):
        """The last accepted result, sent again by the same caller (a retried request)."""
        m = self.model.get(job_id)
        if m is None or m.result is None:
            return
        lease_id, bound, body = m.result
        self._submit(job_id, m, Caller(lease_id=lease_id, bound_worker_id=bound), dict(body), via)

    def _submit(self, job_id: str, m: Model | None, caller: Caller, body: dict, via: int) -> None:
        call = lambda: self.services[via].submit_result(job_id, caller, **body)  # noqa: E731
        if m is None:
            return self._refused(job_id, call, JobNotFound)
        same = m.result is not None and m.result[2] == body
        if same and (caller.lease_id is None or caller.lease_id == m.lease_id):
            before = self._bytes(job_id)
            assert call().repeated
            event("result repeated")
            assert self._bytes(job_id) == before
            return
        if refusal := self._refusal(m, caller):
            return self._refused(job_id, call, refusal)
        outcome = call()
        now = self.clock()
        m.result = (caller.lease_id, caller.bound_worker_id, body)
        if body["success"]:
            m.status = "completed"
        elif body["retryable"] is not False and m.retry_count < m.max_retries:
            m.status, m.retry_count = "pending", m.retry_count + 1
            m.available_at = now + backoff(m.retry_count)
            m.worker_id = m.timeout_at = None
        else:
            m.status = "failed"
        assert outcome.job.status == m.status and not outcome.repeated
        event(f"result -> {m.status}")

    # -- time ------------------------------------------------------------------------------------

    @rule(seconds=st.sampled_from((1, 11, 30, 61, 121, 250)))
    def time_passes(self, seconds):
        self.clock.advance(seconds)

    @rule(via=st.integers(0, 1))
    def expire_due(self, via):
        due = sum(1 for m in self.model.values() if m.status == "processing" and m.timeout_at <= self.clock())
        assert self.services[via].expire_due() == due
        event(f"expired {min(due, 2)}+")
        self._lapse_due()

    # -- after every step ------------------------------------------------------------------------

    @invariant()
    def every_job_is_on_disk_once_and_as_modelled(self):
        on_disk: dict[str, list[str]] = {}
        for status in STATUSES:
            for p in (self.dir / "data" / status).glob("*.json"):
                on_disk.setdefault(p.stem, []).append(status)
        assert {j: s for j, s in on_disk.items() if len(s) > 1} == {}, "a job is in two states"
        assert set(on_disk) == set(self.model), "a job was lost or invented"
        for job_id, m in self.model.items():
            assert on_disk[job_id] == [m.status]
            job = self.stores[0].get(job_id)
            assert (job.status, job.retry_count, job.max_retries) == (m.status, m.retry_count, m.max_retries)
            if m.status == "processing":
                assert (job.worker_id, job.lease_id, job.timeout_at) == (m.worker_id, m.lease_id, m.timeout_at)
            if m.status == "pending":
                assert job.available_at == m.available_at

    @invariant()
    def both_processes_count_the_same(self):
        expected: dict[tuple[str, str], int] = {}
        for m in self.model.values():
            expected[(m.status, m.content_type)] = expected.get((m.status, m.content_type), 0) + 1
        for store in self.stores:
            assert store.stats().counts == expected


QueueMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestQueueStateMachine = QueueMachine.TestCase

