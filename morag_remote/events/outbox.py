"""The events outbox: every completion event is stored here before anyone tries to send it.

:class:`EventOutbox` is the interface; :class:`FileOutbox` is the JSON-file backend next to the job
store, and ``store.pg_outbox.PostgresOutbox`` the one beside the PostgreSQL job store (one table,
``SELECT ... FOR UPDATE SKIP LOCKED`` for ``claim``); ``store.factory.build_outbox`` picks the one
that matches the job store. The file layout:

    <data>/events/pending/<event id>.json     recorded, not yet accepted by the receiver
    <data>/events/delivered/<event id>.json   accepted (kept ``CALLBACK_RETENTION_DAYS``)
    <data>/events/checkpoint.json             how far reconciliation has looked (see delivery.py)
    <data>/events/.lock

Every write is ``write_atomic`` (temp file, fsync, rename) under one ``flock``, held only for the
file operations, never during an HTTP attempt. Delivery moves a file from ``pending/`` to
``delivered/`` by writing the new copy first and then unlinking the old one, so a crash leaves it in
both at worst, and ``delivered/`` wins.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Collection, Protocol

import structlog

from ..models import from_iso, to_iso
from ..store.atomic import FileLock, fsync_dir, read_json, unlink_quietly, write_json_atomic
from .model import DELIVERED, Event

log = structlog.get_logger(__name__)

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


class EventOutbox(Protocol):
    def record(self, event: Event, now: datetime, claim_seconds: float | None) -> tuple[Event, bool]:
        """Store ``event`` unless one with its id exists; return the stored event and whether the
        caller now holds a claim on it. With ``claim_seconds`` the caller wants to attempt it at once:
        a new event is claimed by its recorder, an existing one only when it is pending, due and not
        claimed. With None nothing is claimed (the event waits for the next delivery run)."""

    def get(self, event_id: str) -> Event | None:
        """The event, delivered or not; None when there is none with this id."""

    def claim(self, now: datetime, limit: int, claim_seconds: float, *, due_only: bool = True,
              exclude_webhooks: Collection[str | None] = ()) -> list[Event]:
        """Take up to ``limit`` pending events that no one holds (and, with ``due_only``, that are
        due: see :func:`claimable`), oldest :func:`schedule` first, skipping those bound for
        ``exclude_webhooks``; each is marked as an attempt in flight until ``now + claim_seconds``."""

    def mark_delivered(self, event_id: str, now: datetime) -> None:
        """The receiver accepted the event (no-op when it is gone or delivered already)."""

    def mark_failed(self, event_id: str, error: str, next_attempt_at: datetime) -> None:
        """The attempt failed: release the claim, schedule the next attempt."""

    def checkpoint(self) -> Checkpoint | None:
        """How far reconciliation got: every terminal job before it in (finish time, id) order."""

    def set_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Move the reconciliation checkpoint (never backwards)."""

    def purge_delivered(self, before: datetime, limit: int) -> int:
        """Forget delivered events older than ``before``; returns how many."""

    def counts(self) -> dict[str, int]:
        """How many events are pending and delivered."""


class FileOutbox:
    def __init__(self, directory: str | os.PathLike) -> None:
        self.root = Path(directory)
        self.pending_dir = self.root / "pending"
        self.delivered_dir = self.root / "delivered"
        for folder in (self.pending_dir, self.delivered_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock = FileLock(self.root / ".lock")
        self._cache: dict[str, tuple[tuple[int, int, int], Event]] = {}
        self._cache_mutex = threading.Lock()

    # -- files -----------------------------------------------------------------------------------

    def _pending_path(self, event_id: str) -> Path:
        return self.pending_dir / f"{valid_event_id(event_id)}.json"

    def _delivered_path(self, event_id: str) -> Path:
        return self.delivered_dir / f"{valid_event_id(event_id)}.json"

    def _load(self, path: Path) -> Event | None:
        try:
            return Event.from_dict(read_json(path))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("events.corrupt_file", file=path.name, reason=str(exc))
            return None

    def _save(self, path: Path, event: Event) -> None:
        write_json_atomic(path, event.to_dict())

    # -- the interface ---------------------------------------------------------------------------

    def record(self, event: Event, now: datetime, claim_seconds: float | None) -> tuple[Event, bool]:
        with self.lock.hold():
            existing = self.get(event.id)
            if existing is not None:
                if (claim_seconds is None or existing.delivered
                        or not claimable(existing, now, due_only=True)):
                    return existing, False
                start_attempt(existing, now, claim_seconds)
                self._save(self._pending_path(existing.id), existing)
                return existing, True
            if claim_seconds is not None:
                start_attempt(event, now, claim_seconds)
            self._save(self._pending_path(event.id), event)
            log.info("event.recorded", event_id=event.id, job_id=event.job_id, event_type=event.type)
            return event, claim_seconds is not None

    def get(self, event_id: str) -> Event | None:
        delivered = self._load(self._delivered_path(event_id))
        if delivered is not None:
            return delivered
        return self._load(self._pending_path(event_id))

    def claim(self, now: datetime, limit: int, claim_seconds: float, *, due_only: bool = True,
              exclude_webhooks: Collection[str | None] = ()) -> list[Event]:
        claimed: list[Event] = []
        with self.lock.hold():
            candidates = [e for e in self._pending() if claimable(e, now, due_only)
                          and e.webhook_url not in exclude_webhooks]
            candidates.sort(key=lambda e: (schedule(e), e.created_at, e.id))
            for event in candidates[:limit]:
                if self._delivered_path(event.id).exists():  # a move cut short by a crash
                    unlink_quietly(self._pending_path(event.id))
                    continue
                start_attempt(event, now, claim_seconds)
                self._save(self._pending_path(event.id), event)
                claimed.append(event)
        return claimed

    def mark_delivered(self, event_id: str, now: datetime) -> None:
        with self.lock.hold():
            pending = self._pending_path(event_id)
            event = self._load(pending)
            if event is None:
                return
            event.state = DELIVERED
            event.delivered_at = now
            event.claimed_until = None
            event.last_error = None
            self._save(self._delivered_path(event_id), event)
            if unlink_quietly(pending):
                fsync_dir(pending.parent)

    def mark_failed(self, event_id: str, error: str, next_attempt_at: datetime) -> None:
        with self.lock.hold():
            path = self._pending_path(event_id)
            event = self._load(path)
            if event is None:
                return
            event.last_error = error
            event.next_attempt_at = next_attempt_at
            event.claimed_until = None
            self._save(path, event)

    def checkpoint(self) -> Checkpoint | None:
        try:
            data = read_json(self.root / "checkpoint.json")
            return Checkpoint(from_iso(data["reconciled_through"]), data.get("after_id"))
        except (FileNotFoundError, ValueError, AttributeError, KeyError, TypeError):
            return None

    def set_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self.lock.hold():
            current = self.checkpoint()
            if current is not None and current.key >= checkpoint.key:
                return
            write_json_atomic(self.root / "checkpoint.json", {"reconciled_through": to_iso(checkpoint.when),
                                                             "after_id": checkpoint.after_id})

    def purge_delivered(self, before: datetime, limit: int) -> int:
        cutoff = before.timestamp()
        count = 0
        with os.scandir(self.delivered_dir) as it:
            old = [e.name for e in it if e.name.endswith(".json") and e.stat().st_mtime < cutoff]
        with self.lock.hold():
            for name in old[:limit]:
                count += unlink_quietly(self.delivered_dir / name)
            if count:
                fsync_dir(self.delivered_dir)
        return count

    def counts(self) -> dict[str, int]:
        def n(folder: Path) -> int:
            with os.scandir(folder) as it:
                return sum(1 for e in it if e.name.endswith(".json"))

        return {"pending": n(self.pending_dir), "delivered": n(self.delivered_dir)}

    # -- the pending set, read through a per-process cache ----------------------------------------

    def _pending(self) -> list[Event]:
        """Every pending event (caller holds the lock); unchanged files are not parsed again."""
        events: list[Event] = []
        seen: set[str] = set()
        with os.scandir(self.pending_dir) as it:
            entries = [e for e in it if e.name.endswith(".json")]
        with self._cache_mutex:
            for entry in entries:
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                stamp = (entry.inode(), st.st_mtime_ns, st.st_size)
                cached = self._cache.get(entry.name)
                if cached is not None and cached[0] == stamp:
                    event = cached[1]
                else:
                    event = self._load(Path(entry.path))
                    if event is None:
                        continue
                    self._cache[entry.name] = (stamp, event)
                seen.add(entry.name)
                events.append(Event.from_dict(event.to_dict()))
            for name in set(self._cache) - seen:
                del self._cache[name]
        return events


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
