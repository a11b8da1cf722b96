"""A real gunicorn, started the way production starts it (``gunicorn -c gunicorn.conf.py wsgi:app``),
on a port the kernel picks on 127.0.0.1, for tests that need several OS processes: the ``Gunicorn``
class (start, look at its pids and stderr, stop), and the ``gunicorn(...)`` context manager that
yields the base URL of one serving JSON logs with a given number of threads."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import requests

from morag_remote.store.files.keys import FileKeyStore

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0
_LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")
_BOOTING = re.compile(r"Booting worker with pid: (\d+)")


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def make_keys(instance: Path) -> dict[str, str]:
    """A key per role, written where the server will read them."""
    store = FileKeyStore(instance / "api_keys.json")
    return {role: store.create(f"{role}-key", role)[1] for role in ("worker", "producer", "admin")}


class Gunicorn:
    def __init__(self, instance: Path, workers: int = 2, env: dict[str, str] | None = None,
                 worker_connections: int | None = None) -> None:
        self.instance = instance
        self.worker_connections = worker_connections
        self.stdout_path = instance / "gunicorn.stdout"
        self.stderr_path = instance / "gunicorn.stderr"
        self.env = {**os.environ, "MORAG_REMOTE_INSTANCE_PATH": str(instance), "HOST": "127.0.0.1",
                    "PORT": "0", "WEB_CONCURRENCY": str(workers), **(env or {})}
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # gunicorn.conf.py chooses it
        self.workers = workers
        self.proc: subprocess.Popen | None = None
        self.base_url = ""

    def start(self) -> "Gunicorn":
        self.instance.mkdir(parents=True, exist_ok=True)
        options = [] if self.worker_connections is None else ["--worker-connections", str(self.worker_connections)]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py"), "--no-control-socket",
                 *options, "wsgi:app"], cwd=ROOT, env=self.env, stdout=out, stderr=err, start_new_session=True)
        port = wait_for(self._port, START_TIMEOUT, "gunicorn to listen")
        self.base_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: len(self.booted_pids()) >= self.workers, START_TIMEOUT, "the workers to boot")
        wait_for(self._healthy, START_TIMEOUT, "GET /health to answer 200")
        return self

    def _port(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"gunicorn exited with {self.proc.returncode}:\n{self.stderr()}")
        match = _LISTENING.search(self.stderr())
        return int(match.group(1)) if match else None

    def _healthy(self) -> bool:
        try:
            return requests.get(self.url("/health"), timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    def url(self, path: str) -> str:
        return self.base_url + path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def booted_pids(self) -> list[int]:
        return [int(pid) for pid in _BOOTING.findall(self.stderr())]

    def stop(self) -> None:
        """SIGTERM (gunicorn's graceful stop), then SIGKILL of its process group if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


@contextmanager
def gunicorn(instance_path: Path, env: dict[str, str] | None = None, workers: int = 2, threads: int = 4,
             worker_connections: int = 4) -> Iterator[str]:
    """Serve ``instance_path`` with JSON logs; yields the base URL. ``worker_connections`` caps the
    connections one process takes, so concurrent requests reach every process instead of the fastest
    acceptor."""
    server = Gunicorn(instance_path, workers,
                      {"GUNICORN_THREADS": str(threads), "MORAG_REMOTE_LOG_JSON": "true", **(env or {})},
                      worker_connections=worker_connections)
    try:
        server.start()
        yield server.base_url
    finally:
        server.stop()
