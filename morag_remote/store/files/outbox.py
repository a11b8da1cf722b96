"""The completion-events outbox as files beside the job store:

    <data>/events/pending/<event id>.json     recorded, not yet accepted by the receiver
    <data>/events/delivered/<event id>.json   accepted (kept ``CALLBACK_RETENTION_DAYS``)
    <data>/events/checkpoint.json             how far reconciliation has looked (see events/delivery.py)
    <data>/events/.lock

Every write is ``write_atomic`` (temp file, fsync, rename) under one ``flock``, held only for the
file operations, never during an HTTP attempt. Delivery moves a file from ``pending/`` to
``delivered/`` by writing the new copy first and then unlinking the old one, so a crash leaves it in
both at worst, and ``delivered/`` wins.
"""
from __future__ import annotations

import os
import threading
from datetime import datetime
from pathlib import Path
from typing import Collection

import structlog

from ...events.model import DELIVERED, Event
from ...events.outbox import Checkpoint, claimable, schedule, start_attempt, valid_event_id
from ...models import from_iso, to_iso
from ...fileio import fsync_dir, read_json, unlink_quietly, write_json_atomic
from .locks import bounded_lock

log = structlog.get_logger(__name__)


class FileOutbox:
    def __init__(self, directory: str | os.PathLike, lock_timeout: float | None = None) -> None:
        self.root = Path(directory)
        self.pending_dir = self.root / "pending"
        self.delivered_dir = self.root / "delivered"
        for folder in (self.pending_dir, self.delivered_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.lock = bounded_lock(self.root / ".lock", lock_timeout)
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
