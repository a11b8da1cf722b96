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

from . import jsonrules, schemas
from .exceptions import InvalidRequest, JobNotFound
from .models import RemoteJob, valid_job_id
from .store.base import JobRepository

# What the API lets a job hold, so that every imported job fits either backend and its indexes.
MAX_LENGTHS = {"content_type": schemas.CONTENT_TYPE_LENGTH.max, "ingestion_task_id": schemas.ID_LENGTH.max,
               "worker_id": schemas.ID_LENGTH.max, "source_file_path": schemas.PATH_LENGTH.max}
INT_RANGE = range(-2**31, 2**31)  # PostgreSQL's integer columns


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
    """The job a line holds, checked as the API checks what it stores; ValueError when it is none."""
    try:
        data = jsonrules.loads(line)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if jsonrules.depth(data, jsonrules.MAX_DOCUMENT_DEPTH) > jsonrules.MAX_DOCUMENT_DEPTH:
        raise ValueError(f"nested deeper than {jsonrules.MAX_DOCUMENT_DEPTH} levels")
    try:
        jsonrules.refuse_nul(data)
    except InvalidRequest as exc:
        raise ValueError(exc.detail) from None
    for name in ("id", "content_type", "ingestion_task_id", "source_file_path", "created_at"):
        if not isinstance(data.get(name), str) or not data[name]:
            raise ValueError(f"{name} is missing")
    if not valid_job_id(data["id"]):
        raise ValueError("id must be 1-64 ASCII letters, digits, '-' or '_'")
    for name, limit in MAX_LENGTHS.items():
        if isinstance(data.get(name), str) and len(data[name]) > limit:
            raise ValueError(f"{name} is longer than {limit} characters")
    for name in ("priority", "retry_count", "max_retries", "attempt", "version"):
        if name in data and (not isinstance(data[name], int) or isinstance(data[name], bool)
                             or data[name] not in INT_RANGE):
            raise ValueError(f"{name} must be an integer of at most 32 bits")
    for name in ("task_options", "extra"):
        if name in data and not isinstance(data[name], dict):
            raise ValueError(f"{name} must be an object")
    result = data.get("result_data")
    if result is not None and not (isinstance(result, dict) and isinstance(result.get("content", ""), str)):
        raise ValueError("result_data must be an object whose content is text")
    job = RemoteJob.from_dict(data)
    json.dumps(job.to_dict(), allow_nan=False)  # every field writes back (a year 0 date does not)
    return job


def import_jobs(store: JobRepository, lines: Iterable[str | bytes]) -> ImportReport:
    """Import each line (bytes are decoded as UTF-8, line by line, so one bad line is one error)."""
    report = ImportReport()
    for number, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8") if isinstance(line, bytes) else line
        except UnicodeDecodeError:
            report.errors.append(f"line {number}: not UTF-8 text")
            continue
        if not text.strip():
            continue
        try:
            job = parse_line(text)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            report.errors.append(f"line {number}: not a job ({exc})")
            continue
        try:
            outcome = _import_one(store, job)
        except InvalidRequest as exc:  # the store cannot hold it (text that is not UTF-8 on PostgreSQL)
            report.errors.append(f"line {number}: not stored ({exc.detail})")
            continue
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
