"""Claim cost of the PostgreSQL backend at 100 and at 50,000 pending jobs (target: ratio <= 1.5).

    MORAG_REMOTE_BENCH_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python -m benchmarks.pg_claims [--claims 300] [--json]

Works in a schema of its own, created and dropped here. For each size N it loads N + claims pending
jobs (COPY, spread over three content types and a few priorities, some still in retry backoff),
then times ``claims`` single claims, each through the service (``poll``: lapsed-lease check, claim,
mutator, UPDATE, commit), so the queue shrinks from N + claims to N while it is measured. Claims
alternate between the two queues, so that both see the same load from the rest of the machine.
Reported: the median and p95 per claim, and the ratio of the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from morag_remote.config import Settings
from morag_remote.models import RemoteJob, new_job_id
from morag_remote.service import JobService
from morag_remote.store import migrate
from morag_remote.store.pgdb import Database
from morag_remote.store.postgres import PostgresJobStore, _params

SIZES = (100, 50_000)
TYPES = ("audio", "video", "document")


def _load(conn: psycopg.Connection, n: int) -> None:
    now = datetime.now(timezone.utc)
    columns = ["id", "status", "content_type", "priority", "created_at", "available_at", "timeout_at",
               "completed_at", "finished_at", "seen_at", "worker_id", "ingestion_task_id", "version", "doc"]
    with conn.cursor().copy(sql.SQL("COPY remote_jobs ({}) FROM STDIN").format(
            sql.SQL(", ").join(map(sql.Identifier, columns)))) as copy:
        for i in range(n):
            created = now - timedelta(seconds=n - i)
            job = RemoteJob(id=new_job_id(), ingestion_task_id=f"bench-{i}", source_file_path="/data/x.mp3",
                            content_type=TYPES[i % 3], task_options={}, created_at=created, updated_at=created,
                            priority=i % 4, version=1,
                            available_at=created if i % 10 else now + timedelta(hours=1))  # 10% in backoff
            params = _params(job)
            copy.write_row([params[c].obj if isinstance(params[c], Jsonb) else params[c] for c in columns[:-1]]
                           + [Jsonb(params["doc"].obj)])
    conn.execute("ANALYZE remote_jobs")


class Queue:
    """A schema of its own holding ``pending`` claimable jobs (plus what the measurement consumes)."""

    def __init__(self, base_url: str, pending: int, claims: int) -> None:
        self.base_url = base_url
        self.pending = pending
        self.schema = f"mrbench_{secrets.token_hex(4)}"
        self.db = Database(f"{base_url}{'&' if '?' in base_url else '?'}schema={self.schema}", pool_size=2)
        with self.db.connect(autocommit=True) as conn:
            migrate.upgrade(conn, self.schema)
        with self.db.connect() as conn:
            _load(conn, pending + claims * 10 // 9 + 3)  # 10% of them wait in backoff
            conn.commit()
        self.service = JobService(PostgresJobStore(self.db), Settings(content_types=TYPES))
        self.service.poll("warm-up", list(TYPES), 1)
        self.timings: list[float] = []

    def claim(self) -> None:
        started = time.perf_counter()
        got = self.service.poll("bench", list(TYPES), 1)
        self.timings.append(time.perf_counter() - started)
        assert got, "the queue ran dry"

    def summary(self) -> dict:
        timings = sorted(self.timings)
        return {"pending": self.pending, "claims": len(timings),
                "median_ms": round(statistics.median(timings) * 1000, 3),
                "p95_ms": round(timings[int(len(timings) * 0.95) - 1] * 1000, 3)}

    def drop(self) -> None:
        self.db.close()
        with psycopg.connect(self.base_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))


def measure(base_url: str, claims: int) -> list[dict]:
    """Claims alternate between the queues, so both see the same load from the rest of the machine."""
    queues: list[Queue] = []
    try:
        for n in SIZES:
            queues.append(Queue(base_url, n, claims))
        for _ in range(claims):
            for q in queues:
                q.claim()
        return [q.summary() for q in queues]
    finally:
        for q in queues:
            q.drop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=300)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    url = os.environ.get("MORAG_REMOTE_BENCH_DATABASE_URL") or os.environ.get("MORAG_REMOTE_TEST_DATABASE_URL")
    if not url:
        print("set MORAG_REMOTE_BENCH_DATABASE_URL=postgresql://... (a database this may create schemas in)",
              file=sys.stderr)
        return 2
    rows = measure(url, args.claims)
    ratio = round(rows[1]["median_ms"] / rows[0]["median_ms"], 3)
    if args.json:
        print(json.dumps({"postgres_claims": rows, "ratio": ratio}))
    else:
        for r in rows:
            print(f"postgres claim at {r['pending']:>6} pending: median {r['median_ms']:.3f} ms, "
                  f"p95 {r['p95_ms']:.3f} ms ({r['claims']} claims)")
        print(f"ratio of medians (50,000 / 100): {ratio} (target <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
