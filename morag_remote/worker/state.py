"""The worker's state folder: results written before they are sent, and a lock so that one worker
process at a time uses the folder.

A result is a file ``results/<job id>.<lease id>.json`` (the job id, the lease id that fences it and
the exact body to send), written whole or not at all (temp file, fsync, rename, folder fsync) before
the first try to send it, and removed once the server answered. A worker restarted on the same
folder sends what is left: if the job moved on meanwhile, the lease id makes the server answer 409
and the file is dropped.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Iterator

from ..client.errors import ConfigError

_SAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class PendingResult:
    job_id: str
    lease_id: str | None
    body: dict[str, Any]
    path: str | None  # None: it could not be saved (sent from memory only)


class StateDir:
    def __init__(self, root: str) -> None:
        self.root = root
        self.results = os.path.join(root, "results")
        self.work = os.path.join(root, "work")
        self._lock_fd: int | None = None

    def open(self) -> "StateDir":
        """Create the folders and take the lock; ConfigError when another worker holds it."""
        try:
            for path in (self.root, self.results, self.work):
                os.makedirs(path, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"--state-dir {self.root} cannot be used: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"--state-dir {self.root} is in use by another worker process; "
                              "give each worker a folder of its own") from None
        self._lock_fd = fd
        self._clear_work()
        return self

    def _clear_work(self) -> None:
        """What a previous worker on this folder left (it was killed): its handlers still running
        are killed and its job folders removed; their jobs come back when their leases lapse."""
        from .handlers import kill_leftovers  # noqa: PLC0415 - state is imported by handlers' users first
        kill_leftovers(self.root)
        for name in os.listdir(self.work):
            path = os.path.join(self.work, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _name(self, job_id: str, lease_id: str | None) -> str:
        return os.path.join(self.results, f"{_SAFE.sub('_', job_id)}.{_SAFE.sub('_', lease_id or 'none')}.json")

    def save(self, job_id: str, lease_id: str | None, body: dict[str, Any]) -> PendingResult:
        path = self._name(job_id, lease_id)
        data = json.dumps({"job_id": job_id, "lease_id": lease_id, "body": body}, ensure_ascii=False).encode()
        fd, tmp = tempfile.mkstemp(dir=self.results, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        dir_fd = os.open(self.results, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return PendingResult(job_id, lease_id, body, path)

    def pending(self) -> Iterator[PendingResult]:
        """Every result not yet answered (a damaged file is skipped and renamed ``*.bad``)."""
        for name in sorted(os.listdir(self.results)):
            if not name.endswith(".json"):
                continue
            path = os.path.join(self.results, name)
            try:
                with open(path, "rb") as fh:
                    data = json.loads(fh.read())
                yield PendingResult(data["job_id"], data.get("lease_id"), data["body"], path)
            except (OSError, ValueError, KeyError, TypeError):
                os.replace(path, path + ".bad")

    @staticmethod
    def done(result: PendingResult) -> None:
        if result.path is None:
            return
        try:
            os.unlink(result.path)
        except FileNotFoundError:
            pass
