"""What the service reports about the queue rather than changes in it: ``estimated_completion``
from observed durations (cached per process) and the queue summary of ``/stats``, the CLI and the
metrics gauges."""
from __future__ import annotations

import statistics
import time
from datetime import datetime, timedelta
from typing import Any

from ..config import Settings
from ..models import STATUSES, Clock, RemoteJob, Status
from ..store.base import JobRepository

# The seed's guesses, used by ``estimated_completion`` until a content type has history.
DEFAULT_DURATIONS = {"audio": 300.0, "video": 900.0}
DEFAULT_DURATION = 600.0
DURATION_SAMPLE = 200
DURATION_CACHE_SECONDS = 60.0


class Estimates:
    def __init__(self, store: JobRepository, settings: Settings, clock: Clock) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.duration_sample = DURATION_SAMPLE
        self._durations: dict[str, tuple[float, float | None]] = {}

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

    def completed(self, content_type: str) -> None:
        """A job of this type completed in this process: estimate afresh."""
        self._durations.pop(content_type, None)

    def queue_summary(self) -> dict[str, Any]:
        """Counts by status and content type, totals, the age of the oldest pending job, and the
        workers seen within the longest lease period."""
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
