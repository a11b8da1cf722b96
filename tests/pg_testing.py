"""PostgreSQL for the tests: a schema of its own per test run, created at the start, dropped at the end.

``MORAG_REMOTE_TEST_DATABASE_URL`` names the server (``.ci/run`` sets it); without it, or when the
server does not answer, every PostgreSQL test is skipped with one message saying how to run them.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import psycopg
from psycopg import sql

from morag_remote.store import migrate

ENV = "MORAG_REMOTE_TEST_DATABASE_URL"
HOW = (f"start PostgreSQL and set {ENV}=postgresql://postgres@127.0.0.1:5432/test to run them "
       "(README: 'The PostgreSQL backend')")

#: modules that only the PostgreSQL tests exercise: left out of the coverage total when those skip
PG_MODULES = ["*/morag_remote/store/postgres.py", "*/morag_remote/store/pgdb.py",
              "*/morag_remote/store/pg_keys.py", "*/morag_remote/store/migrate.py"]


@dataclass
class TestDatabase:
    base_url: str
    schema: str

    @property
    def url(self) -> str:
        sep = "&" if "?" in self.base_url else "?"
        return f"{self.base_url}{sep}schema={self.schema}"

    def connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.base_url, autocommit=True, connect_timeout=3)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn

    def create(self) -> None:
        with self.connect() as conn:
            migrate.upgrade(conn, self.schema)

    def truncate(self) -> None:
        with self.connect() as conn:
            conn.execute("TRUNCATE remote_jobs, api_keys")

    def drop(self) -> None:
        with psycopg.connect(self.base_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))


def probe() -> tuple[TestDatabase | None, str]:
    """A new per-run test database, or None and why not."""
    base = os.environ.get(ENV)
    if not base:
        return None, f"{ENV} is not set"
    try:
        psycopg.connect(base, connect_timeout=3).close()
    except psycopg.Error as exc:
        first = (str(exc).strip().splitlines() or ["unreachable"])[0]
        return None, f"no PostgreSQL at {ENV} ({first})"
    return TestDatabase(base, f"mrtest_{os.getpid()}_{secrets.token_hex(4)}"), ""
