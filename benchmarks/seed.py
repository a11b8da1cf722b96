"""Fill a store with pending jobs fast: for the file store, the job files written directly, without
fsync; for PostgreSQL, the rows loaded with one ``COPY``.

The files are the store's truth and each gunicorn worker builds its catalog from them when it
starts, so a seeded directory is exactly what a store that received these jobs one by one holds;
the rows are what ``PostgresJobStore.create`` would have inserted. Durability of the seed does not
matter (it is thrown away); what is measured afterwards is durable.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from morag_remote.models import RemoteJob, new_job_id, utcnow
from morag_remote.routing import Requirements
from morag_remote.store.files.jobs import FileJobStore, encode_job
from morag_remote.store.postgres.jobs import WRITE_COLUMNS, row_params

# Seed keys that stand for jobs with requirements: key -> (content type, requires). Any other key
# is a content type whose jobs require nothing.
ROUTED = {"audio needing 80 GB": ("audio", {"min": {"gpu_memory_gb": 80}})}


def kind(key: str) -> tuple[str, dict | None]:
    return ROUTED.get(key, (key, None))


def _pending_jobs(source: Path, counts: dict[str, int]) -> Iterator[RemoteJob]:
    """``counts[key]`` new pending jobs of each key (a content type, or one of ``ROUTED``),
    claimable now, in creation order."""
    now = utcnow()
    for key, n in counts.items():
        content_type, requires = kind(key)
        for _ in range(n):
            yield RemoteJob(id=new_job_id(), ingestion_task_id="bench-seed", source_file_path=str(source),
                            content_type=content_type, task_options={}, created_at=now, updated_at=now,
                            available_at=now, version=1, requires=requires)


def seed_pending(data_dir: Path, source: Path, counts: dict[str, int]) -> int:
    """Write the jobs of ``counts`` as files of the store in ``data_dir``; returns how many."""
    store = FileJobStore(data_dir)  # makes the layout
    folder = store.root / "pending"
    written = 0
    for job in _pending_jobs(source, counts):
        fd = os.open(folder / f"{job.id}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, encode_job(job))
        finally:
            os.close(fd)
        written += 1
    return written


def copy_pending(conn: psycopg.Connection, source: Path, counts: dict[str, int]) -> int:
    """Load the jobs of ``counts`` into ``remote_jobs`` (``conn``'s search path) with COPY; returns
    how many. The caller commits."""
    for key in counts:
        rule = Requirements.of(kind(key)[1])
        if rule is not None:  # what PostgresJobStore.create registers for a job with requirements
            conn.execute("INSERT INTO remote_job_requirements (key, labels, minimums) VALUES (%s, %s, %s) "
                         "ON CONFLICT (key) DO NOTHING", (rule.key, sorted(rule.labels), Jsonb(dict(rule.minimums))))
    columns = ("id", *WRITE_COLUMNS)
    statement = sql.SQL("COPY remote_jobs ({}) FROM STDIN").format(sql.SQL(", ").join(map(sql.Identifier, columns)))
    written = 0
    with conn.cursor().copy(statement) as copy:
        for job in _pending_jobs(source, counts):
            params = row_params(job)
            copy.write_row([params[c] for c in columns])
            written += 1
    return written
