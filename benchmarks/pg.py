"""The PostgreSQL column of ``make bench``: a schema of its own on the server that
``MORAG_REMOTE_BENCH_DATABASE_URL`` names, migrated at the start and dropped at the end.

The servers under test get ``MORAG_REMOTE_DATABASE_URL=<that URL>?schema=<it>``, exactly what a
deployment sets: the server's own settings (``synchronous_commit``, ``fsync``) are left as they
are, so every answered request has waited for its commit to reach the disk, as the file store's
requests wait for their fsyncs. The instance's API keys are copied into the schema, so one set of
keys works against either backend.
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from morag_remote.store.files.keys import FileKeyStore
from morag_remote.store.postgres import migrate
from morag_remote.store.postgres.db import url_from_env

from .seed import copy_pending
from .server import Instance

ENV = "MORAG_REMOTE_BENCH_DATABASE_URL"
HOW = (f"start PostgreSQL and set {ENV}=postgresql://USER@HOST:PORT/DB, a database the benchmark may "
       "create a schema in (make bench defaults to postgresql://postgres@127.0.0.1:5432/test)")


def probe() -> tuple[str | None, str]:
    """The server's base URL, or None and why not."""
    return url_from_env(ENV)


class BenchSchema:
    """One benchmark run's schema: tables, the instance's keys, seeded jobs, and the checks after."""

    def __init__(self, base_url: str, instance: Instance) -> None:
        self.base_url = base_url
        self.instance = instance
        self.schema = f"mrbench_{os.getpid()}_{secrets.token_hex(4)}"
        # the server's connections carry this name, so that their backends' CPU can be told apart
        self.application_name = self.schema.replace("_", "-")

    @property
    def url(self) -> str:
        sep = "&" if "?" in self.base_url else "?"
        return f"{self.base_url}{sep}schema={self.schema}&application_name={self.application_name}"

    def server_env(self) -> dict[str, str]:
        return {"MORAG_REMOTE_DATABASE_URL": self.url}

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.base_url, autocommit=True, connect_timeout=3)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn

    def create(self) -> None:
        """The schema at the latest migration, holding the instance's API keys."""
        keys = FileKeyStore(self.instance.path / "api_keys.json").list()
        with self._connect() as conn:
            migrate.upgrade(conn, self.schema)  # the tables go where the search path points
            with conn.transaction():
                for key in keys:
                    conn.execute("INSERT INTO api_keys (name, role, key_hash, worker_id, created_at, "
                                 "last_used_at) VALUES (%s, %s, %s, %s, %s, %s)",
                                 (key.name, key.role, key.key_hash, key.worker_id, key.created_at,
                                  key.last_used_at))

    def seed(self, source: Path, counts: dict[str, int]) -> int:
        """An empty job table, then ``counts[content_type]`` pending jobs of each type (COPY)."""
        with self._connect() as conn:
            conn.execute("TRUNCATE remote_jobs")
            with conn.transaction():
                written = copy_pending(conn, source, counts)
            conn.execute("ANALYZE remote_jobs")
        return written

    def settings(self) -> dict[str, Any]:
        """The server settings that decide what a commit costs, as the app's connections see them."""
        with self._connect() as conn:
            shown = {name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]
                     for name in ("server_version", "synchronous_commit", "fsync", "wal_sync_method",
                                  "shared_buffers")}
        return {**shown, "schema": self.schema}

    def backend_pids(self) -> list[int]:
        """The server processes serving the app's connections (empty when PostgreSQL runs elsewhere)."""
        with self._connect() as conn:
            pids = [row[0] for row in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (self.application_name,))]
        return [pid for pid in pids if _is_local_postgres(pid)]

    def verify(self) -> dict[str, Any]:
        """Read the table the server left: jobs by status, claimed more than once, and rows whose
        columns disagree with their document (the database's counterpart of the file store's fsck)."""
        with self._connect() as conn:
            rows = conn.execute("SELECT status, count(*), count(*) FILTER (WHERE (doc->>'attempt')::int > 1) "
                                "FROM remote_jobs GROUP BY status").fetchall()
            findings = conn.execute(
                "SELECT count(*) FROM remote_jobs WHERE status <> doc->>'status' "
                "OR content_type <> doc->>'content_type' OR worker_id IS DISTINCT FROM doc->>'worker_id' "
                "OR version < 1").fetchone()[0]
        return {"jobs": sum(n for _, n, _ in rows), "by_status": {s: n for s, n, _ in rows},
                "claimed_more_than_once": sum(m for _, _, m in rows), "findings": findings,
                "checked_with": "row columns against their document"}

    def drop(self) -> None:
        with psycopg.connect(self.base_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))


def _is_local_postgres(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip() == "postgres"
    except OSError:
        return False
