"""The per-minute throughput series as files: ``<data>/throughput/<YYYYMMDDHH>.json``, one per UTC
hour, holding ``{"MM": [claims, completions, failures]}``. A flush reads, adds to and atomically
replaces the files of the hours it touches (usually one) under the folder's lock; pruning removes
whole hours. Telemetry, like the worker registry: the folder is not fsynced after each write."""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Mapping

import structlog

from ...fileio import read_json, unlink_quietly, write_atomic
from .locks import bounded_lock

log = structlog.get_logger(__name__)
_HOUR = "%Y%m%d%H"


def _hour_name(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime(_HOUR) + ".json"


def _hour_of(name: str) -> datetime | None:
    try:
        return datetime.strptime(name.removesuffix(".json"), _HOUR).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


class FileThroughputSeries:
    def __init__(self, directory: str | os.PathLike, lock_timeout: float | None = None) -> None:
        self.root = Path(directory)
        self.root.mkdir(parents=True, exist_ok=True)
        self.lock = bounded_lock(self.root / ".lock", lock_timeout)

    def _read(self, path: Path) -> dict[str, list[int]]:
        try:
            data = read_json(path)
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            log.warning("throughput.corrupt_file", file=path.name, reason=str(exc))
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: [int(n) for n in v[:3]] for k, v in data.items()
                if isinstance(v, list) and len(v) >= 3 and all(isinstance(n, int) for n in v[:3])}

    def _hours(self) -> list[tuple[datetime, str]]:
        with os.scandir(self.root) as it:
            names = [e.name for e in it if e.name.endswith(".json")]
        return sorted((hour, name) for name in names if (hour := _hour_of(name)) is not None)

    def add(self, counts: Mapping[datetime, tuple[int, int, int]]) -> None:
        by_hour: dict[str, dict[str, tuple[int, int, int]]] = {}
        for minute, values in counts.items():
            by_hour.setdefault(_hour_name(minute), {})[f"{minute.astimezone(timezone.utc).minute:02d}"] = values
        with self.lock.hold():
            for name, minutes in sorted(by_hour.items()):
                path = self.root / name
                data = self._read(path)
                for key, values in minutes.items():
                    old = data.get(key, [0, 0, 0])
                    data[key] = [a + b for a, b in zip(old, values)]
                write_atomic(path, json.dumps(data, separators=(",", ":"), sort_keys=True).encode(), sync_dir=False)

    def read(self, since: datetime) -> dict[datetime, tuple[int, int, int]]:
        first_hour = since.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
        out: dict[datetime, tuple[int, int, int]] = {}
        for hour, name in self._hours():
            if hour < first_hour:
                continue
            for key, values in self._read(self.root / name).items():
                if not key.isdigit() or not 0 <= int(key) < 60:
                    continue
                minute = hour + timedelta(minutes=int(key))
                if minute >= since:
                    out[minute] = (values[0], values[1], values[2])
        return out

    def prune(self, before: datetime) -> int:
        """Remove the hours that end at or before ``before`` (a minute within the retention is kept)."""
        count = 0
        with self.lock.hold():
            for hour, name in self._hours():
                if hour + timedelta(hours=1) <= before:
                    count += unlink_quietly(self.root / name)
        return count
