"""The workers heard from, in PostgreSQL: one row per worker id, upserted, seen by every host."""
from __future__ import annotations

from datetime import datetime

from psycopg.types.json import Jsonb

from ...workers import WorkerRecord
from .db import Database

_SEEN = """
INSERT INTO workers (worker_id, last_seen, content_types, metadata)
VALUES (%(worker_id)s, %(when)s, coalesce(%(types)s, '[]'::jsonb), coalesce(%(metadata)s, '{}'::jsonb))
ON CONFLICT (worker_id) DO UPDATE SET
    last_seen = greatest(workers.last_seen, excluded.last_seen),
    content_types = coalesce(%(types)s, workers.content_types),
    metadata = coalesce(%(metadata)s, workers.metadata)
"""


class PostgresWorkerRegistry:
    def __init__(self, db: Database) -> None:
        self.db = db

    def seen(self, worker_id: str, when: datetime, content_types: list[str] | None,
             metadata: dict | None) -> None:
        with self.db.transaction() as conn:
            conn.execute(_SEEN, {"worker_id": worker_id, "when": when,
                                 "types": Jsonb(content_types) if content_types is not None else None,
                                 "metadata": Jsonb(metadata) if metadata is not None else None})

    def list(self, since: datetime) -> list[WorkerRecord]:
        with self.db.transaction() as conn:
            rows = conn.execute("SELECT worker_id, last_seen, content_types, metadata FROM workers "
                                "WHERE last_seen >= %s", (since,)).fetchall()
        return [WorkerRecord(worker_id, last_seen, list(types), dict(metadata))
                for worker_id, last_seen, types, metadata in rows]

    def forget_before(self, cutoff: datetime) -> int:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM workers WHERE last_seen < %s", (cutoff,)).rowcount
