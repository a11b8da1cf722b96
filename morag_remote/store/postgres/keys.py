"""API keys in PostgreSQL: ``store.base.KeyRepository``, for the database backend,
so that a key made or revoked on one host is known to every host at its next request.

Only the SHA-256 of a key is stored. A key is looked up by its digest through the unique index: with
256-bit random keys there is no prefix an attacker could time, so no constant-time scan is needed.
"""
from __future__ import annotations

import secrets
import time

import psycopg
import structlog

from ...auth import KEY_PREFIX, LAST_USED_RESOLUTION, ApiKey, KeyRequestInvalid, hash_key, validate_key_request
from ...models import to_iso, utcnow
from .db import Database

log = structlog.get_logger(__name__)

_COLUMNS = "name, role, key_hash, worker_id, created_at, last_used_at"


class PostgresKeyStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._used: dict[str, float] = {}

    def create(self, name: str, role: str, worker_id: str | None = None) -> tuple[ApiKey, str]:
        validate_key_request(name, role, worker_id)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(name=name, role=role, key_hash=hash_key(secret), worker_id=worker_id,
                     created_at=to_iso(utcnow()))
        try:
            with self.db.transaction() as conn:
                conn.execute(f"INSERT INTO api_keys ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)",
                             (key.name, key.role, key.key_hash, key.worker_id, key.created_at, None))
        except psycopg.errors.UniqueViolation:
            raise KeyRequestInvalid(f"a key named {name!r} exists; revoke it first") from None
        log.info("key.created", name=name, role=role, worker_id=worker_id)
        return key, secret

    def list(self) -> list[ApiKey]:
        with self.db.transaction() as conn:
            rows = conn.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY name").fetchall()
        return [ApiKey(*row) for row in rows]

    def revoke(self, name: str) -> None:
        with self.db.transaction() as conn:
            if not conn.execute("DELETE FROM api_keys WHERE name = %s", (name,)).rowcount:
                raise KeyRequestInvalid(f"no key named {name!r}")
        log.info("key.revoked", name=name)

    def has_keys(self) -> bool:
        with self.db.transaction() as conn:
            return conn.execute("SELECT EXISTS (SELECT 1 FROM api_keys)").fetchone()[0]

    def authenticate(self, secret: str) -> ApiKey | None:
        with self.db.transaction() as conn:
            row = conn.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = %s",
                               (hash_key(secret),)).fetchone()
        if row is None:
            return None
        key = ApiKey(*row)
        self._touch(key.name)
        return key

    def _touch(self, name: str) -> None:
        """Record the key's last use, at most once a minute per key and process."""
        now = time.monotonic()
        if now - self._used.get(name, -LAST_USED_RESOLUTION) < LAST_USED_RESOLUTION:
            return
        self._used[name] = now
        with self.db.transaction() as conn:
            conn.execute("UPDATE api_keys SET last_used_at = %s WHERE name = %s", (to_iso(utcnow()), name))
