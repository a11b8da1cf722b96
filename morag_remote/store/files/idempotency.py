"""Idempotency-Key records as files: ``<data>/idempotency/<sha256>.json``, one per key, locked with
one of 256 stripe files (``<data>/idempotency/.lock-<xx>``)."""
from __future__ import annotations

import json
import os
import threading
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path

import structlog

from ...idempotency import RESERVED, IdempotencyRecord
from ...fileio import FileLock, fsync_dir, read_json, unlink_quietly, write_atomic
from .locks import bounded_lock

log = structlog.get_logger(__name__)


class FileIdempotencyRecords:
    """``<data>/idempotency/<sha256>.json``; lock stripes ``<data>/idempotency/.lock-<xx>``."""

    def __init__(self, directory: str | os.PathLike, lock_timeout: float | None = None) -> None:
        self.root = Path(directory)
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, FileLock] = {}
        self._lock_timeout = lock_timeout
        self._mutex = threading.Lock()

    def _path(self, key_id: str) -> Path:
        return self.root / f"{key_id}.json"

    def locked(self, key_id: str) -> AbstractContextManager:
        stripe = key_id[:2]
        with self._mutex:
            lock = self._locks.get(stripe)
            if lock is None:
                lock = self._locks[stripe] = bounded_lock(self.root / f".lock-{stripe}", self._lock_timeout)
        return lock.hold()

    def get(self, key_id: str) -> IdempotencyRecord | None:
        try:
            return IdempotencyRecord.from_dict(read_json(self._path(key_id)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("idempotency.corrupt_record", key_id=key_id, reason=str(exc))
            return None

    def put(self, record: IdempotencyRecord) -> None:
        # Marking a record done need not wait for the directory's fsync: if a crash undoes it, the
        # record reads as reserved, and the recovery path finds the job and completes it again.
        data = json.dumps(record.to_dict(), separators=(",", ":"), sort_keys=True).encode()
        write_atomic(self._path(record.key_id), data, sync_dir=record.state == RESERVED)

    def delete(self, key_id: str) -> None:
        if unlink_quietly(self._path(key_id)):
            fsync_dir(self.root)

    def purge(self, before: datetime, limit: int) -> int:
        cutoff = before.timestamp()
        with os.scandir(self.root) as it:
            old = [e.name[:-5] for e in it if e.name.endswith(".json") and e.stat().st_mtime < cutoff]
        count = 0
        for key_id in old[:limit]:
            with self.locked(key_id):
                record = self.get(key_id)
                if record is None or record.created_at < before:
                    count += unlink_quietly(self._path(key_id))
        return count
