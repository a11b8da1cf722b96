"""A completion event: what the ingestion side is told when a job reaches a terminal state, or
``held`` (``job.held``: its worker vanished and its ``on_lapse`` is hold, so someone must decide).

The event id is derived from the job id, the terminal status and the moment the job entered it, so
every process (the request that finished the job, a later reconciliation, a retry of the job) names
the same event the same way: recording it twice stores it once, and a receiver can dedup by it.
A job that is retried and finishes again gets a new ``completed_at`` and so a new event.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import datetime
from typing import Any

from ..models import RemoteJob, Status, record_values, times_to_iso, to_iso

EVENT_NAMESPACE = uuid.UUID("5b0f6f1e-3d6c-4c39-9a43-2f7c6a1d0e11")
JOB_URL = "/api/v1/remote-jobs/{job_id}"

PENDING = "pending"        # recorded, not yet accepted by the receiver
DELIVERED = "delivered"    # the receiver answered 2xx


def event_type(status: str) -> str:
    return f"job.{status}"


def occurred_at(job: RemoteJob) -> datetime | None:
    return job.completed_at or job.updated_at


def event_id_for(job: RemoteJob) -> str:
    """The stable id of the event for the terminal state ``job`` is in."""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{job.id}:{job.status}:{to_iso(occurred_at(job))}"))


def event_body(job: RemoteJob) -> str:
    """The exact JSON text that is POSTed (and signed) on every attempt for this event."""
    payload = {
        "event_id": event_id_for(job),
        "type": event_type(job.status),
        "occurred_at": to_iso(occurred_at(job)),
        "job_id": job.id,
        "ingestion_task_id": job.ingestion_task_id,
        "content_type": job.content_type,
        "status": job.status,
        "error": job.error_message if job.status != Status.COMPLETED.value else None,
        "job_url": JOB_URL.format(job_id=job.id),
    }
    return json.dumps(payload, separators=(",", ":"), sort_keys=True)


@dataclasses.dataclass
class Event:
    """One event and its delivery state, as the outbox keeps it.

    ``webhook_url`` is the job's own ``task_options.webhook_url`` when it was allowed, else None
    (the configured ``CALLBACK_URL``, looked up at each attempt so a changed setting applies to
    events still waiting). ``next_attempt_at`` is the backoff schedule; ``claimed_until`` marks an
    attempt in flight, so two processes do not send the same event at the same time.
    """

    id: str
    type: str
    job_id: str
    body: str
    created_at: datetime
    webhook_url: str | None = None
    state: str = PENDING
    attempts: int = 0
    next_attempt_at: datetime | None = None
    claimed_until: datetime | None = None
    last_attempt_at: datetime | None = None
    last_error: str | None = None
    delivered_at: datetime | None = None

    _TIMES = ("created_at", "next_attempt_at", "claimed_until", "last_attempt_at", "delivered_at")

    @classmethod
    def for_job(cls, job: RemoteJob, webhook_url: str | None, now: datetime) -> "Event":
        return cls(id=event_id_for(job), type=event_type(job.status), job_id=job.id,
                   body=event_body(job), created_at=now, webhook_url=webhook_url, next_attempt_at=now)

    def to_dict(self) -> dict[str, Any]:
        return times_to_iso(dataclasses.asdict(self), self._TIMES)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Event":
        return cls(**record_values(cls, data, cls._TIMES))

    @property
    def delivered(self) -> bool:
        return self.state == DELIVERED

    def public_state(self) -> dict[str, Any]:
        """The delivery state a job shows (``event_delivery`` in GET /<id> and /status)."""
        if self.delivered:
            state = "delivered"
        else:
            state = "retrying" if self.last_error else "pending"
        return {"event_id": self.id, "state": state, "attempts": self.attempts,
                "last_error": self.last_error, "delivered_at": self.delivered_at,
                "next_attempt_at": None if self.delivered else self.next_attempt_at}
