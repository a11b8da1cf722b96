"""The worker against the PostgreSQL backend: the same command, the same outcome."""
from __future__ import annotations

import secrets
import signal

import pytest

from support import postgres as pg_testing
from support.gunicorn import wait_for
from morag_remote.client import Client
from morag_remote.store.postgres.keys import PostgresKeyStore
from morag_remote.store.postgres.db import database
from support.workers import WorkerProcess, all_terminal, handler_script

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_a_worker_completes_jobs_on_the_postgresql_backend(pg_database, tmp_path):
    pg_database.truncate()
    sources = tmp_path / "sources"
    sources.mkdir()
    keys = PostgresKeyStore(database(pg_database.url))
    producer_key, worker_key = keys.create("producer", "producer")[1], keys.create("worker", "worker")[1]
    host = pg_testing.Host("a", pg_database.url, str(tmp_path / "a"), str(sources), secrets.token_hex(32))
    worker = None
    try:
        host.wait_ready()
        producer = Client(host.base, producer_key)
        jobs = {}
        for i in range(5):
            path = sources / f"in-{i}.txt"
            path.write_text(f"text {i}")
            jobs[producer.create(str(path), "document", f"ingest-{i}").job_id] = i
        template = handler_script(tmp_path, "open(os.path.join(output_dir, 'content.txt'), 'w')"
                                            ".write(open(input_path).read().upper())\n")
        worker = WorkerProcess(host.base, worker_key, tmp_path / "w", "--exec", template, "--concurrency", "2",
                               content_types="document").start()
        wait_for(lambda: all_terminal(producer, list(jobs)), 90, "every job to finish")
        for job_id, i in jobs.items():
            job = producer.get(job_id)
            assert job.status == "completed" and job.content == f"TEXT {i}" and job.retry_count == 0
        worker.send(signal.SIGTERM)
        assert worker.wait(60) == 0
    finally:
        if worker is not None:
            worker.stop()
        host.stop()
