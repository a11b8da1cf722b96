"""A real gunicorn on a free loopback port, for the events and idempotency tests."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import requests

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gunicorn(instance_path: Path, env: dict[str, str] | None = None, workers: int = 2, threads: int = 4,
             worker_connections: int = 4) -> Iterator[str]:
    """Serve ``instance_path``; yields the base URL. ``worker_connections`` caps the connections one
    process takes, so concurrent requests reach every process instead of the fastest acceptor."""
    port = free_port()
    full_env = dict(os.environ, MORAG_REMOTE_INSTANCE_PATH=str(instance_path), HOST="127.0.0.1", PORT=str(port),
                    WEB_CONCURRENCY=str(workers), GUNICORN_THREADS=str(threads), MORAG_REMOTE_LOG_JSON="true",
                    **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--worker-connections",
                             str(worker_connections), "wsgi:app"], cwd=ROOT, env=full_env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if requests.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if proc.poll() is not None:
                raise RuntimeError("gunicorn exited")
            threading.Event().wait(0.1)
        else:
            raise RuntimeError("gunicorn did not come up")
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
