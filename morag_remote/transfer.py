"""Export and import of jobs as JSON lines, to move a store between backends (files <-> PostgreSQL).

An export line is one job exactly as stored (``RemoteJob.to_dict``, version included). An import is
idempotent by id and never goes back in time:

- a job the target does not have is stored as it is (``created``);
- a job the target has with the same content is left alone (``unchanged``);
- a job the target has in an older version is replaced (``updated``): importing a newer export
  over an older one brings the jobs that changed since;
- a job the target has in the same or a newer version, with other content, is kept as it is
  (``kept``): the target changed it after the export was taken, and its state wins.

So an operator can export a live store, import, stop the old hosts, export again and import again:
the second pass brings exactly what changed in between. A line that is not a job is reported with
its number and skipped; nothing else is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO, Iterable

from .exceptions import JobNotFound
from .models import RemoteJob
from .store.base import JobRepository


def export_jobs(store: JobRepository, out: IO[str]) -> int:
    """Write every job as one JSON line; returns how many."""
    count = 0
    for job in store.iter_all():
        out.write(json.dumps(job.to_dict(), sort_keys=True, separators=(",", ":")) + "\n")
        count += 1
    return count


@dataclass
class ImportReport:
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    kept: int = 0
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"created": self.created, "updated": self.updated, "unchanged": self.unchanged,
                "kept": self.kept, "invalid": len(self.errors)}


class _Keep(Exception):
    """Raised inside the update mutator: the target's copy stays (counted by ``outcome``)."""

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome


def _same(a: RemoteJob, b: RemoteJob) -> bool:
    left, right = a.to_dict(), b.to_dict()
    left.pop("version")
    right.pop("version")
    return left == right


def parse_line(line: str) -> RemoteJob:
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    for name in ("id", "content_type", "ingestion_task_id", "source_file_path", "created_at"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise ValueError(f"{name} is missing")
    job_id = data["id"]
    if len(job_id) > 64 or not all(c.isalnum() or c in "-_" for c in job_id):
        raise ValueError("id must be 1-64 letters, digits, '-' or '_'")
    for name in ("priority", "retry_count", "max_retries", "attempt", "version"):
        if name in data and (not isinstance(data[name], int) or isinstance(data[name], bool)):
            raise ValueError(f"{name} must be an integer")
    for name in ("task_options", "extra"):
        if name in data and not isinstance(data[name], dict):
            raise ValueError(f"{name} must be an object")
    return RemoteJob.from_dict(data)


def import_jobs(store: JobRepository, lines: Iterable[str]) -> ImportReport:
    report = ImportReport()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            job = parse_line(line)
        except (ValueError, TypeError, KeyError) as exc:
            report.errors.append(f"line {number}: not a job ({exc})")
            continue
        outcome = _import_one(store, job)
        setattr(report, outcome, getattr(report, outcome) + 1)
    return report


def _import_one(store: JobRepository, job: RemoteJob) -> str:
    def mutate(current: RemoteJob) -> RemoteJob:
        if _same(current, job):
            raise _Keep("unchanged")
        if job.version <= current.version:
            raise _Keep("kept")
        return job.copy()

    try:
        store.update(job.id, mutate)
        return "updated"
    except _Keep as keep:
        return keep.outcome
    except JobNotFound:
        pass
    store.put(job.copy())  # kept at its exported version
    return "created"
