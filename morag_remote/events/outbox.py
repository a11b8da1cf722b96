"""The events outbox's rules: the reconciliation checkpoint and when an event may be attempted.

Every completion event is stored in an outbox before anyone tries to send it; the storage interface
is ``store.base.EventOutbox``, implemented by each backend (``store/files/outbox.py``,
``store/postgres/outbox.py``) with the rules below, so both claim in the same order.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from .model import Event


@dataclass(frozen=True)
class Checkpoint:
    """Reconciliation reached ``when``: every job that finished before it, and those that finished
    exactly then with an id up to ``after_id``, has its event."""

    when: datetime
    after_id: str | None = None

    @property
    def key(self) -> tuple[datetime, str]:
        return (self.when, self.after_id or "")

    def covers(self, finished: datetime, job_id: str) -> bool:
        return (finished, job_id) <= self.key if self.after_id else finished < self.when


def schedule(event: Event) -> datetime:
    """When the event is due: its next attempt, else when it was recorded (claims go in this order;
    ``due_at`` of the PostgreSQL table is the same)."""
    return event.next_attempt_at or event.created_at


def claimable(event: Event, now: datetime, due_only: bool) -> bool:
    """No attempt is in flight and, with ``due_only``, its :func:`schedule` has come."""
    if event.claimed_until is not None and event.claimed_until > now:
        return False
    return not due_only or schedule(event) <= now


def start_attempt(event: Event, now: datetime, claim_seconds: float) -> None:
    event.attempts += 1
    event.last_attempt_at = now
    event.claimed_until = now + timedelta(seconds=claim_seconds)


def valid_event_id(event_id: str) -> str:
    """Event ids name files (and rows: both outboxes refuse the same ids): the characters a UUID has."""
    if not event_id or len(event_id) > 64 or not all(c.isalnum() or c == "-" for c in event_id):
        raise ValueError(f"not an event id: {event_id!r}")
    return event_id
