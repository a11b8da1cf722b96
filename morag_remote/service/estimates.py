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
            "types": self.type_states(stats.counts),
        }

    def type_states(self, counts: dict[tuple[str, str], int] | None = None) -> dict[str, dict[str, Any]]:
        """Every configured type's pause, the limit in force (and where it comes from: ``runtime``,
        set through the API or CLI, or ``config``, MAX_PROCESSING) and its jobs processing now."""
        controls = self.store.controls()
        if counts is None:
            counts = self.store.stats().counts
        out = {}
        for ct in sorted(set(self.settings.content_types) | set(controls)):
            control = controls.get(ct)
            override = control.max_processing if control else None
            configured = self.settings.max_processing.get(ct)
            source = "runtime" if override is not None else ("config" if configured is not None else None)
            out[ct] = {"content_type": ct, "paused": bool(control and control.paused),
                       "max_processing": override if override is not None else configured,
                       "limit_source": source,
                       "processing": counts.get((Status.PROCESSING.value, ct), 0),
                       "updated_at": control.updated_at if control else None}
        return out
