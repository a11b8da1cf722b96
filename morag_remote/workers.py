"""The workers the service has heard from: who polled, for what, from which host, holding which jobs.

A poll (and a heartbeat) may carry ``worker`` metadata (``hostname``, ``version``, ``concurrency``,
``labels``); the registry keeps, per worker id, when it was last seen, what it polls for and that
metadata, in the backend beside the jobs (``store.base.WorkerRegistry``), so every process and host
lists the same workers. The jobs a worker holds are read from the job store when listing.

Recording is cheap and best effort: a worker is written again only when what it says changed or
``SEEN_RESOLUTION`` seconds passed since this process last wrote it, and a write that fails (a full
disk) is logged, never allowed to fail the poll that carried it. A worker not seen for
``FORGET_AFTER`` is no longer listed and is purged.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Iterable

import structlog

from .exceptions import ServiceError
from .models import Clock, Status, from_iso, to_iso
from .store.base import JobFilter

if TYPE_CHECKING:
    from .store.base import JobRepository, WorkerRegistry

log = structlog.get_logger(__name__)

# seconds: how often one process writes the same worker's last-seen time; longer than a long poll
# (POLL_MAX_WAIT_SECONDS, 20 by default), so a worker polling back to back costs a write a minute,
# not one per poll (with 1,000 waiting workers that was 50 writes a second on an idle host)
SEEN_RESOLUTION = 60.0
FORGET_AFTER = timedelta(days=1)
PURGE_INTERVAL_SECONDS = 600.0
HELD_JOBS_LIMIT = 10_000  # processing jobs read when listing (a page of 500 at a time)


@dataclasses.dataclass
class WorkerRecord:
    worker_id: str
    last_seen: datetime
    content_types: list[str] = dataclasses.field(default_factory=list)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), last_seen=to_iso(self.last_seen))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "WorkerRecord":
        last_seen = from_iso(data["last_seen"])
        if not isinstance(data["worker_id"], str) or last_seen is None:
            raise ValueError("not a worker record")
        return cls(worker_id=data["worker_id"], last_seen=last_seen,
                   content_types=list(data.get("content_types") or []), metadata=dict(data.get("metadata") or {}))


class Workers:
    def __init__(self, registry: WorkerRegistry, jobs: JobRepository, clock: Clock) -> None:
        self.registry = registry
        self.jobs = jobs
        self.clock = clock
        self._written: dict[str, tuple[float, tuple]] = {}
        self._mutex = threading.Lock()
        self._next_purge = 0.0

    def seen(self, worker_id: str, content_types: Iterable[str] | None = None,
             metadata: dict[str, Any] | None = None) -> None:
        """Note that ``worker_id`` called now; what it polls for and its metadata when it says.

        A heartbeat says neither: what the last poll said is kept."""
        now_mono = time.monotonic()
        types = sorted(set(content_types)) if content_types is not None else None
        said = (tuple(types) if types is not None else None, repr(sorted(metadata.items())) if metadata else None)
        with self._mutex:
            last = self._written.get(worker_id)
            if last is not None and now_mono - last[0] < SEEN_RESOLUTION and (said == last[1] or said == (None, None)):
                return
            self._written[worker_id] = (now_mono, said)
        try:
            self.registry.seen(worker_id, self.clock(), types, metadata)
        except (OSError, ServiceError) as exc:
            log.warning("workers.not_recorded", worker_id=worker_id, error=getattr(exc, "strerror", None) or str(exc))
            with self._mutex:
                self._written.pop(worker_id, None)
        self._maybe_purge()

    def list(self) -> list[dict[str, Any]]:
        """Every worker seen within ``FORGET_AFTER``, most recently seen first, with the jobs it holds."""
        since = self.clock() - FORGET_AFTER
        held: dict[str, list[dict[str, Any]]] = {}
        after, read = None, 0
        while read < HELD_JOBS_LIMIT:
            page, after = self.jobs.list(JobFilter(status=Status.PROCESSING.value), after, 500)
            read += len(page)
            for job in page:
                if job.worker_id is not None:
                    held.setdefault(job.worker_id, []).append({
                        "job_id": job.id, "content_type": job.content_type, "started_at": job.started_at,
                        "timeout_at": job.timeout_at, "progress": job.progress,
                        "progress_message": job.progress_message, "attempt": job.attempt})
            if after is None:
                break
        records = {r.worker_id: r for r in self.registry.list(since)}
        out = []
        for worker_id in set(records) | set(held):
            record = records.get(worker_id)
            meta = record.metadata if record else {}
            out.append({
                "worker_id": worker_id,
                "last_seen": record.last_seen if record else None,
                "content_types": record.content_types if record else [],
                "hostname": meta.get("hostname"), "version": meta.get("version"),
                "concurrency": meta.get("concurrency"), "labels": meta.get("labels", {}),
                "jobs": held.get(worker_id, []),
            })
        out.sort(key=lambda w: (w["last_seen"] is None, -(w["last_seen"].timestamp() if w["last_seen"] else 0),
                                w["worker_id"]))
        return out

    def purge(self) -> int:
        """Forget workers not seen within ``FORGET_AFTER``; returns how many."""
        count = self.registry.forget_before(self.clock() - FORGET_AFTER)
        if count:
            log.info("workers.forgotten", count=count)
        return count

    def _maybe_purge(self) -> None:
        if time.monotonic() < self._next_purge:
            return
        self._next_purge = time.monotonic() + PURGE_INTERVAL_SECONDS
        try:
            self.purge()
        except (OSError, ServiceError) as exc:
            log.warning("workers.purge_failed", error=getattr(exc, "strerror", None) or str(exc))
