"""Jobs claimed, completed and failed per minute: the series the dashboard's throughput charts draw.

:class:`Throughput` is an observer on the service's hooks (``JobService.hooks.observers``, as
``metrics.JobMetrics`` is): the service says which transition it committed, and this module decides
what it counts. A claim counts as a claim; a success result as a completion; a failure result and a
lapsed lease (with or without a retry left) as a failure: an attempt that ended without a result.

Writes are cheap: counts are added up in memory per process and handed to the backend's series
(``store.base.ThroughputSeries``: a file per hour, or one row per minute added to atomically) at
most every ``FLUSH_SECONDS``, by a timer thread started with the first count since the last flush,
so a busy process writes once per interval and an idle one never. Reading flushes this process's
counts first. The series keeps ``RETENTION`` of minutes (25 hours, the 24-hour chart and a margin):
older minutes are pruned, at most every ``PRUNE_INTERVAL_SECONDS`` per process, so it is bounded
at about 1,500 minutes whatever the traffic. Telemetry, not acknowledged changes: a count is lost
when a process dies within a flush interval of it, or when the store refuses the write.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Mapping

import structlog

from .exceptions import ServiceError
from .models import Action, Clock, RemoteJob

if TYPE_CHECKING:
    from .store.base import ThroughputSeries

log = structlog.get_logger(__name__)

KINDS = ("claims", "completions", "failures")
FLUSH_SECONDS = 5.0
RETENTION = timedelta(hours=25)
PRUNE_INTERVAL_SECONDS = 600.0
_KIND_OF = {Action.CLAIM: 0, Action.COMPLETE: 1, Action.FAIL: 2, Action.FAIL_RETRY: 2,
            Action.LAPSE: 2, Action.LAPSE_RETRY: 2}

Counts = tuple[int, int, int]  # claims, completions, failures


def minute_of(when: datetime) -> datetime:
    """The whole UTC minute ``when`` falls in (the series' key)."""
    return when.astimezone(timezone.utc).replace(second=0, microsecond=0)


@dataclass(frozen=True)
class Bucket:
    """One point of a chart: ``minutes`` minutes from ``start``."""

    start: datetime
    claims: int = 0
    completions: int = 0
    failures: int = 0


class Throughput:
    def __init__(self, series: ThroughputSeries, clock: Clock, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.series = series
        self.clock = clock
        self.flush_seconds = flush_seconds
        self._pending: dict[datetime, list[int]] = {}
        self._mutex = threading.Lock()
        self._timer: threading.Timer | None = None
        self._pid = os.getpid()
        self._next_prune = 0.0

    def _forked(self) -> None:
        """In a child of the process that counted (mutex held): the counts and the timer are the
        parent's, which flushes them itself."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._pending = {}
            self._timer = None

    def job_changed(self, action: Action, job: RemoteJob) -> None:
        kind = _KIND_OF.get(action)
        if kind is None:
            return
        minute = minute_of(self.clock())
        with self._mutex:
            self._forked()
            self._pending.setdefault(minute, [0, 0, 0])[kind] += 1
            if self._timer is None:
                self._timer = threading.Timer(self.flush_seconds, self.flush)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Add this process's counts to the store's series (best effort: a refused write is logged
        and its counts are kept for the next flush, as long as they are within the retention)."""
        with self._mutex:
            self._forked()
            pending, self._pending = self._pending, {}
            if self._timer is not None and self._timer is not threading.current_thread():
                self._timer.cancel()
            self._timer = None
        if pending:
            try:
                self.series.add({minute: (c[0], c[1], c[2]) for minute, c in pending.items()})
            except (OSError, ServiceError) as exc:
                log.warning("throughput.not_recorded", minutes=len(pending),
                            error=getattr(exc, "strerror", None) or str(exc))
                cutoff = minute_of(self.clock()) - RETENTION
                with self._mutex:
                    for minute, counts in pending.items():
                        if minute >= cutoff:
                            kept = self._pending.setdefault(minute, [0, 0, 0])
                            for i, n in enumerate(counts):
                                kept[i] += n
                return
        self._maybe_prune()

    def _maybe_prune(self) -> None:
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + PRUNE_INTERVAL_SECONDS
        try:
            self.series.prune(minute_of(self.clock()) - RETENTION)
        except (OSError, ServiceError) as exc:
            log.warning("throughput.prune_failed", error=getattr(exc, "strerror", None) or str(exc))

    def buckets(self, minutes: int, step: int) -> list[Bucket]:
        """The last ``minutes`` minutes (the current one included) in buckets of ``step`` minutes,
        oldest first, every bucket present (zero where nothing happened)."""
        self.flush()
        now = minute_of(self.clock())
        first = now - timedelta(minutes=minutes - 1)
        stored: Mapping[datetime, Counts] = self.series.read(first)
        count = -(-minutes // step)
        totals = [[0, 0, 0] for _ in range(count)]
        for minute, counts in stored.items():
            index = int((minute - first).total_seconds() // 60) // step
            if 0 <= index < count:
                for i, n in enumerate(counts):
                    totals[index][i] += n
        return [Bucket(first + timedelta(minutes=i * step), *t) for i, t in enumerate(totals)]
