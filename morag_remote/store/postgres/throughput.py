"""The per-minute throughput series in PostgreSQL: a row per minute, each flush one upsert that adds
to the row (``claims = throughput.claims + excluded.claims``), so concurrent hosts never lose a count."""
from __future__ import annotations

from datetime import datetime
from typing import Mapping

from .db import Database

_ADD = """
INSERT INTO throughput (minute, claims, completions, failures) VALUES (%s, %s, %s, %s)
ON CONFLICT (minute) DO UPDATE SET
    claims = throughput.claims + excluded.claims,
    completions = throughput.completions + excluded.completions,
    failures = throughput.failures + excluded.failures
"""


class PostgresThroughputSeries:
    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, counts: Mapping[datetime, tuple[int, int, int]]) -> None:
        rows = [(minute, *values) for minute, values in sorted(counts.items())]  # sorted: no deadlock between hosts
        if not rows:
            return
        with self.db.transaction() as conn:
            with conn.cursor() as cur:
                cur.executemany(_ADD, rows)

    def read(self, since: datetime) -> dict[datetime, tuple[int, int, int]]:
        with self.db.transaction() as conn:
            rows = conn.execute("SELECT minute, claims, completions, failures FROM throughput "
                                "WHERE minute >= %s", (since,)).fetchall()
        return {minute: (int(c), int(d), int(f)) for minute, c, d, f in rows}

    def prune(self, before: datetime) -> int:
        with self.db.transaction() as conn:
            return conn.execute("DELETE FROM throughput WHERE minute < %s", (before,)).rowcount
