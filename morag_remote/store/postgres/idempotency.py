"""Idempotency-Key records in PostgreSQL: ``store.base.IdempotencyRecords`` for the
database backend, so that any API host can answer a retried create.

The semantics are the JSON files' (``idempotency.py``): every ``put`` is a transaction of its own,
committed when it returns, so a ``reserved`` row naming the job id is durable before the job is made.

``locked(key_id)`` takes a transaction-level advisory lock (``pg_advisory_xact_lock``) on a pooled
connection kept for the block. The lock ends with that transaction, which the pool commits when the
block ends and rolls back when it raises, so no connection goes back to the pool still holding it (and
a process that dies takes its locks with its sessions). The records are read and written on other
connections, so that the ``reserved`` row commits while the lock is held.

A waiting request should not hold a connection: the threads of one process that want the same key
first queue on a lock of the process, holding none, so a process has at most one connection waiting
on the database per key, however many of its threads retry that key. Both waits together are bounded
(``lock_wait_s``); past it the create answers 409 (:class:`~morag_remote.idempotency.IdempotencyKeyBusy`).
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from datetime import datetime
from typing import Iterator

import psycopg
from psycopg.types.json import Jsonb

from ...idempotency import HEADER, IdempotencyKeyBusy, IdempotencyRecord
from .db import Database
from .jobs import utf8_document

LOCK_WAIT_SECONDS = 30.0

_COLUMNS = "key_id, fingerprint, job_id, request, created_at, state"  # IdempotencyRecord's field order
_PUT = (f"INSERT INTO idempotency_keys ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (key_id) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, job_id = EXCLUDED.job_id, "
        "request = EXCLUDED.request, created_at = EXCLUDED.created_at, state = EXCLUDED.state")
# The outer condition is checked again on a row rewritten since the subquery's snapshot: a key that a
# create took anew (a fresh created_at) while the purge ran is kept.
_PURGE = """
DELETE FROM idempotency_keys
 WHERE key_id IN (SELECT key_id FROM idempotency_keys WHERE created_at < %(before)s
                   ORDER BY created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
   AND created_at < %(before)s
"""


class _KeyMutexes:
    """One ``threading.Lock`` per key some thread of this process holds or waits for."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}

    @contextlib.contextmanager
    def hold(self, key: str, timeout: float) -> Iterator[bool]:
        """Yields whether the key's lock was taken within ``timeout`` seconds."""
        with self._mutex:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        taken = lock.acquire(timeout=max(timeout, 0.0))
        try:
            yield taken
        finally:
            if taken:
                lock.release()
            with self._mutex:
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]


class PostgresIdempotencyRecords:
    def __init__(self, db: Database, lock_wait_s: float = LOCK_WAIT_SECONDS) -> None:
        self.db = db
        self.lock_wait_s = lock_wait_s
        self._mutexes = _KeyMutexes()

    def lock_id(self, key_id: str) -> int:
        """The key's advisory lock: a signed 64-bit number, distinct per schema (deployments or test
        runs sharing a database do not wait for each other)."""
        digest = hashlib.sha256(f"morag_remote.idempotency:{self.db.schema or ''}:{key_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)

    @contextlib.contextmanager
    def locked(self, key_id: str) -> Iterator[None]:
        deadline = time.monotonic() + self.lock_wait_s
        with self._mutexes.hold(key_id, self.lock_wait_s) as taken:
            if not taken:
                raise self._busy()
            with self.db.transaction() as conn:
                # lock_timeout 0 would mean no limit: wait at least a millisecond
                wait_ms = max(int((deadline - time.monotonic()) * 1000), 1)
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{wait_ms}ms",))
                try:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_id(key_id),))
                except psycopg.errors.LockNotAvailable:
                    raise self._busy() from None
                yield

    def _busy(self) -> IdempotencyKeyBusy:
        return IdempotencyKeyBusy(f"another request with this {HEADER} has been in progress for "
                                  f"{self.lock_wait_s:g} s; retry later",
                                  errors={HEADER: ["a request with this key is still in progress"]})

    def get(self, key_id: str) -> IdempotencyRecord | None:
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM idempotency_keys WHERE key_id = %s", (key_id,)).fetchone()
        return None if row is None else IdempotencyRecord(*row)

    def put(self, record: IdempotencyRecord) -> None:
        request = Jsonb(utf8_document(record.request))
        with self.db.transaction() as conn:
            conn.execute(_PUT, (record.key_id, record.fingerprint, record.job_id, request, record.created_at,
                                record.state))

    def delete(self, key_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM idempotency_keys WHERE key_id = %s", (key_id,))

    def purge(self, before: datetime, limit: int) -> int:
        """One batch: at most ``limit`` of the oldest expired rows, skipping any being written now."""
        with self.db.transaction() as conn:
            return conn.execute(_PURGE, {"before": before, "limit": limit}).rowcount
