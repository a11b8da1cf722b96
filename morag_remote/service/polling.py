"""Long polls: a poll that found nothing waits, in its request's thread, until a job it could take
may have appeared, then tries again; at most ``POLL_MAX_WAITERS`` wait per process at once."""
from __future__ import annotations

import threading
import time
from typing import Callable, Sequence

import structlog

from ..models import Clock, RemoteJob
from ..store.base import JobRepository

log = structlog.get_logger(__name__)

MAX_SLEEP_SECONDS = 2.0  # a waiter looks again at least this often (delayed jobs, lapsed leases)
CLIENT_CHECK_SECONDS = 1.0  # and asks whether its caller is still there at least this often


class LongPolls:
    def __init__(self, store: JobRepository, max_waiters: int, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self._waiters = threading.BoundedSemaphore(max(max_waiters, 1))
        self._waiting = 0
        self._waiting_lock = threading.Lock()

    @property
    def waiting(self) -> int:
        """How many long polls of this process are waiting right now."""
        return self._waiting

    def marker(self) -> int | None:
        """Taken before looking for work, so that a job created between the look and the wait wakes
        the waiter (see :meth:`JobRepository.change_marker`)."""
        return self.store.change_marker()

    def wait_for(self, claim: Callable[[], list[RemoteJob]], types: Sequence[str], wait: float,
                 marker: int | None, worker_id: str,
                 client_gone: Callable[[], bool] | None = None) -> list[RemoteJob]:
        """Call ``claim`` again whenever the store changed and a job of ``types`` may be there,
        until it returns jobs or ``wait`` seconds have passed. Turned away at once (no jobs) when
        the process already has its most waiters. With ``client_gone``, the wait ends (claiming
        nothing) as soon as it says the caller has hung up: checked before every claim and at
        least every ``CLIENT_CHECK_SECONDS``."""
        if not self._waiters.acquire(blocking=False):
            log.warning("poll.waiters_full", worker_id=worker_id)
            return []
        self._count(+1)
        jobs: list[RemoteJob] = []
        try:
            deadline = time.monotonic() + wait
            while not jobs:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                sleep = min(remaining, self._next_wake(types))
                if client_gone is not None:
                    sleep = min(sleep, CLIENT_CHECK_SECONDS)
                self.store.wait_for_change(sleep, since=marker)
                if client_gone is not None and client_gone():
                    log.info("poll.client_gone", worker_id=worker_id, detail="the caller hung up while waiting")
                    break
                marker = self.marker()
                now = self.clock()
                if self.store.has_available(types, now) or self.store.lapsed(now, 1):
                    jobs = claim()
        finally:
            self._count(-1)
            self._waiters.release()
        return jobs

    def _count(self, delta: int) -> None:
        with self._waiting_lock:
            self._waiting += delta

    def _next_wake(self, types: Sequence[str]) -> float:
        """How long a waiter may sleep before a delayed job or a lease could need it."""
        wake = MAX_SLEEP_SECONDS
        next_at = self.store.next_available_at(types)
        if next_at is not None:
            wake = min(wake, max((next_at - self.clock()).total_seconds(), 0.01))
        return wake
