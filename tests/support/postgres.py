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

from morag_remote.store.postgres import migrate
from morag_remote.store.postgres.db import url_from_env

ENV = "MORAG_REMOTE_TEST_DATABASE_URL"
HOW = (f"start PostgreSQL and set {ENV}=postgresql://postgres@127.0.0.1:5432/test to run them "
       "(README: 'The PostgreSQL backend')")

#: modules that only the PostgreSQL tests exercise: left out of the coverage total when those skip
PG_MODULES = ["*/morag_remote/store/postgres/*"]


@dataclass
class TestDatabase:
    base_url: str
    schema: str

    @property
    def url(self) -> str:
        """The URL the app under test gets: this run's schema; commits not waiting for the disk
        (a test database need not survive a power cut, and the machine's fsyncs are slow)."""
        sep = "&" if "?" in self.base_url else "?"
        return f"{self.base_url}{sep}schema={self.schema}&options=-csynchronous_commit%3Doff"

    def connect(self) -> psycopg.Connection:
        conn = psycopg.connect(self.base_url, autocommit=True, connect_timeout=3)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        return conn

    def create(self) -> None:
        with self.connect() as conn:
            migrate.upgrade(conn, self.schema)

    def truncate(self) -> None:
        with self.connect() as conn:
            conn.execute("TRUNCATE remote_jobs, api_keys, idempotency_keys, event_outbox, event_checkpoint, workers, "
                         "throughput, remote_job_requirements, remote_job_types")

    def drop(self) -> None:
        with psycopg.connect(self.base_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))


def probe() -> tuple[TestDatabase | None, str]:
    """A new per-run test database, or None and why not."""
    base, why = url_from_env(ENV)
    if base is None:
        return None, why
    return TestDatabase(base, f"mrtest_{os.getpid()}_{secrets.token_hex(4)}"), ""


# -- real processes: claimers and gunicorn hosts sharing the test database -------------------------

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def claim_until_empty(url: str, worker_id: str, start, out) -> None:
    """A claiming process (multiprocessing target): poll through the service until nothing is left."""
    import random

    from morag_remote.config import Settings
    from morag_remote.service import JobService
    from morag_remote.store.postgres.db import database
    from morag_remote.store.postgres.jobs import PostgresJobStore

    service = JobService(PostgresJobStore(database(url, pool_size=2)), Settings())
    start.wait(60)
    claimed: list[str] = []
    empty = 0
    for _ in range(5000):  # bounded: 1,000 jobs need at most 1,000 polls in all
        jobs = service.poll(worker_id, ["audio"], max_jobs=random.randint(1, 4))
        claimed.extend(j.id for j in jobs)
        empty = 0 if jobs else empty + 1
        if empty == 3:
            break
    out.put((worker_id, claimed))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Host:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` on a free loopback port, as ``make run`` starts it."""

    def __init__(self, name: str, database_url: str, instance: str, sources: str, secret: str,
                 workers: int = 2, env: dict[str, str] | None = None) -> None:
        import subprocess
        import sys

        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(instance, f"{name}.log")
        os.makedirs(instance, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_REMOTE_")}
        self.env.update(HOST="127.0.0.1", PORT=str(self.port), WEB_CONCURRENCY=str(workers), GUNICORN_THREADS="24",
                        MORAG_REMOTE_DATABASE_URL=database_url, MORAG_REMOTE_INSTANCE_PATH=instance,
                        MORAG_REMOTE_SOURCE_ROOTS=f'["{sources}"]', MORAG_REMOTE_SECRET_KEY=secret,
                        MORAG_REMOTE_DATABASE_POOL_SIZE="4", MORAG_REMOTE_POLL_MAX_WAIT_SECONDS="20",
                        **(env or {}))
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                     cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> None:
        import time

        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited: {open(self.log_path).read()[-2000:]}")
            try:
                if requests.get(self.base + "/health", timeout=10).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or still building its app
                pass
            time.sleep(0.1)  # polling a process that gives no other signal of readiness
        raise RuntimeError(f"gunicorn did not answer /health in {timeout} s")

    def cli(self, *args: str, timeout: float = 120):
        """``flask --app morag_remote <args>`` with this host's configuration (a cron job on it)."""
        import subprocess
        import sys

        return subprocess.run([sys.executable, "-m", "flask", "--app", "morag_remote", *args], cwd=REPO,
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
