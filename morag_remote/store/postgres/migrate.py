"""Schema migrations for the PostgreSQL backend: numbered SQL files applied in order, once each.

``migrations/NNNN_name.sql`` are the versions; ``schema_version`` records which ones a database
has. Each file runs in its own transaction together with its ``schema_version`` row (PostgreSQL's
DDL is transactional: a migration is applied whole or not at all). A transaction-level advisory
lock makes concurrent upgraders (two hosts running ``make run`` at once) take turns; the one that
comes second finds nothing left to do.

A dozen lines of SQL do not justify a migration framework (yoyo, alembic pull in their own
connection handling and, for alembic, SQLAlchemy); this file is the whole runner.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources

import psycopg
import structlog
from psycopg import sql

log = structlog.get_logger(__name__)

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available() -> list[Migration]:
    """The migrations shipped with the package, in version order."""
    found = []
    for entry in resources.files(__package__).joinpath("migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    return found


def latest_version() -> int:
    return available()[-1].version


def _lock_key(schema: str) -> int:
    """A stable signed 64-bit advisory lock key for this schema's migrations."""
    digest = hashlib.sha256(f"morag_remote.migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _schema_of(conn: psycopg.Connection, schema: str | None) -> str:
    if schema:
        return schema
    row = conn.execute("SELECT current_schema()").fetchone()
    if row is None or row[0] is None:
        raise RuntimeError("the connection has no current schema: set search_path or ?schema=")
    return row[0]


def current_version(conn: psycopg.Connection) -> int:
    """The newest version applied to the schema the connection uses (0: none, or no table yet)."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]


def _applied(conn: psycopg.Connection, version: int) -> bool:
    """Whether this version has its row: each is looked up on its own, not compared with the newest,
    so a migration merged after a higher-numbered one was applied is still applied, not skipped."""
    return conn.execute("SELECT EXISTS (SELECT 1 FROM schema_version WHERE version = %s)",
                        (version,)).fetchone()[0]


def upgrade(conn: psycopg.Connection, schema: str | None = None) -> list[Migration]:
    """Apply every pending migration; returns those this call applied (empty when up to date).

    ``conn`` must not be in a transaction. The tables go to the connection's current schema (the
    first of its search path); ``schema``, created when missing, must be that schema (the URL's
    ``?schema=`` sets both), and names it in the lock and the log.
    """
    applied: list[Migration] = []
    for migration in available():
        with conn.transaction():
            target = _schema_of(conn, schema)
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(target),))
            if schema:
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            conn.execute("""CREATE TABLE IF NOT EXISTS schema_version (
                                version    integer PRIMARY KEY,
                                name       text NOT NULL,
                                applied_at timestamptz NOT NULL DEFAULT now())""")
            if _applied(conn, migration.version):
                continue
            conn.execute(migration.sql)
            conn.execute("INSERT INTO schema_version (version, name) VALUES (%s, %s)",
                         (migration.version, migration.name))
        log.info("db.migrated", version=migration.version, name=migration.name, schema=target)
        applied.append(migration)
    return applied
