"""A throw-away instance (keys, a source file, a data directory) and a real gunicorn serving it on
a free loopback port, with the CPU time its processes have used read from ``/proc``."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from morag_remote.store.files.keys import FileKeyStore

from .client import Api

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 120.0  # seconds: a worker builds its catalog of every job before it serves


@dataclass
class Instance:
    """An instance folder on the same disk as the repository's temp dir, with one key per role."""

    path: Path
    keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls) -> "Instance":
        path = Path(tempfile.mkdtemp(prefix="morag-bench-"))
        (path / "sources").mkdir()
        store = FileKeyStore(path / "api_keys.json")
        keys = {role: store.create(f"bench-{role}", role)[1] for role in ("producer", "worker", "admin")}
        inst = cls(path, keys)
        inst.source.write_bytes(os.urandom(1024))
        return inst

    @property
    def source(self) -> Path:
        return self.path / "sources" / "small.bin"

    def data_dir(self, name: str) -> Path:
        return self.path / "data" / name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``gunicorn -c gunicorn.conf.py wsgi:app`` on 127.0.0.1:<free port> for one data directory, or
    for the database that ``env``'s ``MORAG_REMOTE_DATABASE_URL`` names."""

    def __init__(self, instance: Instance, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.instance = instance
        self.data_dir = data_dir
        self.port = free_port()
        self.tail: deque[bytes] = deque(maxlen=200)
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.ready_seconds: float | None = None
        self.catalogs_built = 0  # store.catalog_rebuilt lines logged so far (a worker booted)

    def __enter__(self) -> "Server":
        # the store is the one this benchmark chooses, never one the shell happens to configure
        inherited = {k: v for k, v in os.environ.items() if k != "MORAG_REMOTE_DATABASE_URL"}
        env = dict(inherited, HOST="127.0.0.1", PORT=str(self.port),
                   MORAG_REMOTE_INSTANCE_PATH=str(self.instance.path),
                   MORAG_REMOTE_JOBS_DATA_DIR=str(self.data_dir),
                   MORAG_REMOTE_SOURCE_ROOTS=f'["{self.instance.path / "sources"}"]',
                   **self.extra_env)
        started = time.monotonic()
        # stdout and stderr go to a pipe, as under systemd or docker (a log file on the disk under
        # test would make every log line wait behind the store's fsyncs); the tail is kept
        self.proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                     cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._drain = threading.Thread(target=self._drain_output, daemon=True)
        self._drain.start()
        self._wait_ready(started)
        return self

    def _drain_output(self) -> None:
        for line in self.proc.stdout:
            self.tail.append(line)
            if b'"store.catalog_rebuilt"' in line:
                self.catalogs_built += 1

    def log_tail(self) -> str:
        return b"".join(self.tail).decode(errors="replace")

    def _wait_ready(self, started: float) -> None:
        """Ready when every worker process has answered a request that reads the store."""
        deadline = started + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with Api(self.port, self.instance.keys["admin"], timeout=5) as api:
                    status, _ = api.request("GET", "/api/v1/remote-jobs/stats")
                if status == 200 and len(self.worker_pids()) >= self.workers:
                    self.ready_seconds = time.monotonic() - started
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not become ready within {START_TIMEOUT:g} s:\n{self.log_tail()}")

    @property
    def workers(self) -> int:
        return int(self.extra_env.get("WEB_CONCURRENCY", os.environ.get("WEB_CONCURRENCY", "2")))

    def worker_pids(self) -> list[int]:
        return child_pids(self.proc.pid)

    def cpu_seconds(self) -> float:
        """user + system CPU time of the master and every worker (all threads) so far."""
        return sum(self.cpu_split())

    def cpu_split(self) -> tuple[float, float]:
        """(user, system) CPU time of the master and every worker so far."""
        times = [process_cpu(pid) for pid in [self.proc.pid, *self.worker_pids()]]
        return sum(u for u, _ in times), sum(s for _, s in times)

    def __exit__(self, *exc) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._drain.join(timeout=10)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (gunicorn's workers, for its master)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(p) for p in fh.read().split()]
    except FileNotFoundError:  # kernels without CONFIG_PROC_CHILDREN: scan /proc
        return [int(e) for e in os.listdir("/proc") if e.isdigit() and _ppid(int(e)) == pid]


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as fh:
        raw = fh.read()
    return raw[raw.rindex(")") + 2:].split()  # fields after "(comm)", starting at field 3 (state)


def _ppid(pid: int) -> int | None:
    try:
        return int(_stat_fields(pid)[1])
    except (OSError, ValueError, IndexError):
        return None


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` (all its threads) so far; zero once it is gone."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def rss_kib(pids: list[int]) -> int:
    """The resident memory of these processes together, in KiB (a process gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                total += next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total
