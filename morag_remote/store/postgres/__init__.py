"""The PostgreSQL backend (``MORAG_REMOTE_DATABASE_URL``), for more than one API host.

``db.py`` is the connection pool and the LISTEN thread; ``migrate.py`` applies ``migrations/*.sql``
on a connection; ``jobs.py``, ``keys.py``, ``idempotency.py``, ``outbox.py``, ``workers.py`` and
``throughput.py`` keep one table each (a few columns to filter on and the whole record as JSONB);
``fsck.py`` checks what can drift.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..base import Backend
from . import migrate
from .db import Database, database, database_version, upgrade_database
from .fsck import fsck
from .idempotency import PostgresIdempotencyRecords
from .jobs import PostgresJobStore
from .keys import PostgresKeyStore
from .outbox import PostgresOutbox
from .throughput import PostgresThroughputSeries
from .workers import PostgresWorkerRegistry


class PostgresMigrations:
    """``flask db upgrade`` / ``db current`` on the configured database."""

    def __init__(self, url: str) -> None:
        self.url = url

    def upgrade(self) -> tuple[list[migrate.Migration], int]:
        return upgrade_database(self.url)

    def current(self) -> tuple[int, int]:
        return database_version(self.url), migrate.latest_version()


def open_backend(config: Mapping[str, Any], instance_path: str) -> Backend:
    """Every record in the database at ``DATABASE_URL``: every host sees the same jobs and keys."""
    url = config["DATABASE_URL"]
    db: Database = database(url, int(config.get("DATABASE_POOL_SIZE") or 10),
                            float(config.get("DATABASE_TIMEOUT") or 5.0))
    jobs = PostgresJobStore(db)
    return Backend(
        name="postgres",
        jobs=jobs,
        keys=PostgresKeyStore(db),
        idempotency=PostgresIdempotencyRecords(db),
        outbox=PostgresOutbox(db),
        workers=PostgresWorkerRegistry(db),
        throughput=PostgresThroughputSeries(db),
        fsck=lambda repair: fsck(db, repair=repair),
        migrations=PostgresMigrations(url),
    )
