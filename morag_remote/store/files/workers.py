"""The workers heard from, as files: ``<data>/workers/<sha256 of the worker id>.json``.

Last-seen times are telemetry: each write is atomic (a reader sees the old record or the new one)
but its directory is not fsynced, so a power cut may lose the latest sighting, never a job.
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import datetime
from pathlib import Path

import structlog

from ...fileio import read_json, unlink_quietly, write_atomic
from ...workers import WorkerRecord
from .locks import bounded_lock

log = structlog.get_logger(__name__)


class FileWorkerRegistry:
    def __init__(self, directory: str | os.PathLike, lock_timeout: float | None = None) -> None:
        self.root = Path(directory)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = bounded_lock(self.root / ".lock", lock_timeout)

    def _path(self, worker_id: str) -> Path:
        return self.root / f"{hashlib.sha256(worker_id.encode('utf-8', 'surrogatepass')).hexdigest()}.json"

    def _read(self, path: Path) -> WorkerRecord | None:
        try:
            return WorkerRecord.from_dict(read_json(path))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("workers.corrupt_record", file=path.name, reason=str(exc))
            return None

    def seen(self, worker_id: str, when: datetime, content_types: list[str] | None,
             metadata: dict | None) -> None:
        path = self._path(worker_id)
        with self.lock.hold():  # read-modify-write: a heartbeat keeps what the last poll said
            record = self._read(path) or WorkerRecord(worker_id, when)
            record.last_seen = max(record.last_seen, when)
            if content_types is not None:
                record.content_types = content_types
            if metadata is not None:
                record.metadata = metadata
            data = json.dumps(record.to_dict(), separators=(",", ":"), sort_keys=True,
                              ensure_ascii=True).encode()
            write_atomic(path, data, sync_dir=False)

    def list(self, since: datetime) -> list[WorkerRecord]:
        with os.scandir(self.root) as it:
            names = [e.name for e in it if e.name.endswith(".json")]
        records = (self._read(self.root / name) for name in names)
        return [r for r in records if r is not None and r.last_seen >= since]

    def forget_before(self, cutoff: datetime) -> int:
        count = 0
        with self.lock.hold():
            with os.scandir(self.root) as it:
                names = [e.name for e in it if e.name.endswith(".json")]
            for name in names:
                record = self._read(self.root / name)
                if record is not None and record.last_seen < cutoff:
                    count += unlink_quietly(self.root / name)
        return count
