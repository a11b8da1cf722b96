"""API keys in ``<instance>/api_keys.json``: written atomically under a lock, so the CLI can add or
revoke keys while gunicorn serves; every process re-reads the file when it changes (one ``stat`` per
request while it does not). Every write holds the lock: a process killed mid-write (a request
writing a key's last use back, the CLI creating one) leaves a temp file that fsck removes."""
from __future__ import annotations

import hmac
import json
import os
import secrets
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import structlog

from ...auth import (KEY_PREFIX, LAST_USED_RESOLUTION, ApiKey, KeyFileUnreadable, KeyRequestInvalid, hash_key,
                     validate_key_request)
from ...models import to_iso, utcnow
from ...fileio import FileLock, write_json_atomic

log = structlog.get_logger(__name__)


class FileKeyStore:
    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.lock = FileLock(self.path.with_name(self.path.name + ".lock"))
        self.clock = clock  # monotonic seconds: only paces the last-used write-back
        self._keys: dict[str, ApiKey] = {}
        self._stamp: tuple[int, ...] | None = None
        self._used: dict[str, float] = {}

    def _load(self) -> dict[str, ApiKey]:
        """The keys, re-read only when the file changed (another process created or revoked one).

        Every request asks; the common answer (unchanged) costs one ``stat`` of the path. When it
        changed, the stamp kept is that of the file actually read.
        """
        try:
            if self._stamp is not None and _stamp(os.stat(self.path)) == self._stamp:
                return self._keys
            fh = open(self.path, "rb")
        except FileNotFoundError:
            self._keys, self._stamp = {}, None
            return self._keys
        except OSError as exc:  # a directory in its place, no permission: fail closed, as for bad JSON
            log.error("keys.file_unreadable", file=self.path.name, error=exc.strerror)
            raise KeyFileUnreadable(f"the API key file {self.path.name} is not readable ({exc.strerror}); "
                                    "fix or remove it, then create keys again") from None
        with fh:
            stamp = _stamp(os.fstat(fh.fileno()))
            if stamp != self._stamp:
                try:
                    keys = {k["name"]: ApiKey(**k) for k in json.loads(fh.read())["keys"]}
                except (ValueError, TypeError, KeyError, AttributeError):
                    log.error("keys.file_unreadable", file=self.path.name)
                    raise KeyFileUnreadable(f"the API key file {self.path.name} is not readable; "
                                            "fix or remove it, then create keys again") from None
                self._keys, self._stamp = keys, stamp
        return self._keys

    def _save(self, keys: dict[str, ApiKey]) -> None:
        write_json_atomic(self.path, {"keys": [asdict(k) for k in keys.values()]})
        self._stamp = None

    def create(self, name: str, role: str, worker_id: str | None = None) -> tuple[ApiKey, str]:
        validate_key_request(name, role, worker_id)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.lock.hold():
            keys = dict(self._load())
            if name in keys:
                raise KeyRequestInvalid(f"a key named {name!r} exists; revoke it first")
            key = ApiKey(name=name, role=role, key_hash=hash_key(secret), worker_id=worker_id,
                         created_at=to_iso(utcnow()))
            keys[name] = key
            self._save(keys)
        log.info("key.created", name=name, role=role, worker_id=worker_id)
        return key, secret

    def list(self) -> list[ApiKey]:
        with self.lock.hold(exclusive=False):
            return sorted(self._load().values(), key=lambda k: k.name)

    def revoke(self, name: str) -> None:
        with self.lock.hold():
            keys = dict(self._load())
            if name not in keys:
                raise KeyRequestInvalid(f"no key named {name!r}")
            del keys[name]
            self._save(keys)
        log.info("key.revoked", name=name)

    def has_keys(self) -> bool:
        return bool(self._load())

    def authenticate(self, secret: str) -> ApiKey | None:
        digest = hash_key(secret)
        found = None
        for key in self._load().values():  # every comparison runs: no early exit to time
            if hmac.compare_digest(key.key_hash, digest):
                found = key
        if found is not None:
            self._touch(found.name)
        return found

    def _touch(self, name: str) -> None:
        """Write the key's last use back, at most once per ``LAST_USED_RESOLUTION`` per process.

        Best effort: a full disk or a read-only instance folder must not turn a good key into a 500.
        """
        now = self.clock()
        last = self._used.get(name)
        if last is not None and now - last < LAST_USED_RESOLUTION:
            return
        self._used[name] = now
        try:
            with self.lock.hold():
                keys = dict(self._load())
                if name in keys:
                    keys[name].last_used_at = to_iso(utcnow())
                    self._save(keys)
        except OSError as exc:
            log.warning("key.last_used_unsaved", name=name, error=exc.strerror)


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever the key file is rewritten (it is replaced by a rename: a new inode)."""
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size)
