"""What the service answers, as small typed records. Each keeps the whole JSON object in ``raw``,
so a field the service adds later is readable before this module names it."""
from __future__ import annotations

import email.utils
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

TERMINAL_STATUSES = frozenset({"completed", "failed", "timeout", "cancelled"})


def parse_http_date(value: str | None) -> datetime | None:
    """An HTTP ``Date`` header (whole seconds, UTC), or None."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 timestamp with its offset (the service always sends one), or None."""
    if not value or not isinstance(value, str):
        return None
    return datetime.fromisoformat(value)


@dataclass(frozen=True)
class CreatedJob:
    job_id: str
    status: str
    created_at: datetime | None
    location: str | None
    created: bool  # False: an earlier create with the same Idempotency-Key answered (200)


@dataclass(frozen=True)
class ClaimedJob:
    """One job a poll handed to this worker, with the lease that fences everything it sends."""

    job_id: str
    source_file_url: str
    content_type: str
    task_options: dict[str, Any]
    lease_id: str | None
    timeout_at: datetime | None
    retry_count: int
    raw: dict[str, Any] = field(repr=False, default_factory=dict)
    server_date: datetime | None = None  # the poll answer's Date: the lease is timeout_at minus it
    source_size: int | None = None     # what the server knows of the source (a server with files)
    source_sha256: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any], server_date: datetime | None = None) -> "ClaimedJob":
        return cls(job_id=data["job_id"], source_file_url=data["source_file_url"],
                   content_type=data["content_type"], task_options=data.get("task_options") or {},
                   lease_id=data.get("lease_id"), timeout_at=parse_time(data.get("timeout_at")),
                   retry_count=int(data.get("retry_count") or 0), raw=data, server_date=server_date,
                   source_size=data.get("source_size"), source_sha256=data.get("source_sha256"))



class ClaimedJobs(list):
    """A poll's jobs (a list of :class:`ClaimedJob`). ``host_full``: none, and the poll could not wait
    because the server process that took it already had its most waiting polls (the answer's
    ``X-Poll-Host-Full: true``): back off before polling again instead of polling at once."""

    host_full: bool = False

@dataclass(frozen=True)
class Job:
    """A job as ``GET /<id>`` (with ``result_data``), the list, cancel and retry describe it."""

    job_id: str
    status: str
    content_type: str | None
    ingestion_task_id: str | None
    source_file_path: str | None
    task_options: dict[str, Any]
    worker_id: str | None
    retry_count: int
    max_retries: int | None
    created_at: datetime | None
    completed_at: datetime | None
    error_message: str | None
    progress: float | None
    result_data: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Job":
        return cls(job_id=data.get("job_id") or data["id"], status=data["status"],
                   content_type=data.get("content_type"), ingestion_task_id=data.get("ingestion_task_id"),
                   source_file_path=data.get("source_file_path"), task_options=data.get("task_options") or {},
                   worker_id=data.get("worker_id"), retry_count=int(data.get("retry_count") or 0),
                   max_retries=data.get("max_retries"), created_at=parse_time(data.get("created_at")),
                   completed_at=parse_time(data.get("completed_at")), error_message=data.get("error_message"),
                   progress=data.get("progress"), result_data=data.get("result_data"), raw=data)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def content(self) -> str | None:
        """The converted text of a completed job (``result_data.content``)."""
        return (self.result_data or {}).get("content")


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    status: str
    content_type: str | None
    worker_id: str | None
    retry_count: int
    progress: float | None
    progress_message: str | None
    error_message: str | None
    timeout_at: datetime | None
    estimated_completion: datetime | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "JobStatus":
        return cls(job_id=data["job_id"], status=data["status"], content_type=data.get("content_type"),
                   worker_id=data.get("worker_id"), retry_count=int(data.get("retry_count") or 0),
                   progress=data.get("progress"), progress_message=data.get("progress_message"),
                   error_message=data.get("error_message"), timeout_at=parse_time(data.get("timeout_at")),
                   estimated_completion=parse_time(data.get("estimated_completion")), raw=data)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None


@dataclass(frozen=True)
class Heartbeat:
    job_id: str
    status: str
    timeout_at: datetime | None
    progress: float | None
    server_date: datetime | None = None  # the answer's Date header


@dataclass(frozen=True)
class ResultAnswer:
    status: str
    ingestion_continued: bool


@dataclass(frozen=True)
class Download:
    path: str
    size: int
    sha256: str            # hex, of the bytes written
    digest_checked: bool   # the server sent Repr-Digest sha-256 and it matched
    resumed: int           # how many times a broken stream was resumed with Range
    filename: str | None   # the name Content-Disposition gave
