"""A real gunicorn with a key per role, and ``morag-remote-worker`` as a real subprocess (the
console script of this virtualenv), for the client and worker tests."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from support.gunicorn import Gunicorn, make_keys, wait_for
from morag_remote.client import Client

WORKER_BIN = Path(sys.executable).parent / "morag-remote-worker"
# short leases and retry delays, so that lapses and retries happen within a test
FAST_ENV = {"MORAG_REMOTE_LEASE_SECONDS": '{"audio": 2, "video": 2, "document": 30, "default": 30}',
            "MORAG_REMOTE_RETRY_BACKOFF_SECONDS": "0.2", "MORAG_REMOTE_RETRY_BACKOFF_MAX_SECONDS": "0.5",
            "MORAG_REMOTE_POLL_MAX_WAIT_SECONDS": "5"}


@dataclass
class Served:
    server: Gunicorn
    keys: dict[str, str]
    sources: Path

    @property
    def url(self) -> str:
        return self.server.base_url

    def client(self, role: str = "producer", **kwargs: Any) -> Client:
        return Client(self.url, self.keys[role], **kwargs)

    def source(self, name: str, data: bytes) -> str:
        path = self.sources / name
        path.write_bytes(data)
        return str(path)


@contextmanager
def served(tmp_path: Path, env: dict[str, str] | None = None, workers: int = 2) -> Iterator[Served]:
    instance = tmp_path / "instance"
    (instance / "sources").mkdir(parents=True)
    keys = make_keys(instance)
    server = Gunicorn(instance, workers=workers, env={**FAST_ENV, **(env or {})})
    server.start()
    try:
        yield Served(server, keys, instance / "sources")
    finally:
        server.stop()


class WorkerProcess:
    """``morag-remote-worker`` with its JSON log lines (stderr) in a file."""

    def __init__(self, url: str, key: str, folder: Path, *args: str, content_types: str = "audio",
                 env: dict[str, str] | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.args = [str(WORKER_BIN), "--url", url, "--content-types", content_types,
                     "--state-dir", str(folder / "state"), *args]
        self.env = {**os.environ, "MORAG_REMOTE_WORKER_KEY": key, **(env or {})}
        self.stderr_path = folder / "worker.stderr"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        with open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(self.args, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        return self

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.stderr().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def named(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event
                and all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, event: str, timeout: float = 60, **match: Any) -> dict[str, Any]:
        def seen() -> dict[str, Any] | None:
            found = self.named(event, **match)
            if not found and self.proc.poll() is not None:
                raise AssertionError(f"the worker exited ({self.proc.returncode}) before {event}:\n{self.stderr()}")
            return found[0] if found else None
        return wait_for(seen, timeout, f"the worker's {event} {match or ''}")

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 90) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL of its whole group if it does not go (test teardown)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # handlers it left behind, if any
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(10)


def handler_script(folder: Path, body: str) -> str:
    """A Python handler script at ``folder/handler.py``; the --exec template that runs it with
    ``INPUT OUTPUT_DIR JOB_ID``."""
    path = folder / "handler.py"
    path.write_text("import json, os, sys, time\ninput_path, output_dir, job_id = sys.argv[1:4]\n" + body)
    return f"{sys.executable} {path} {{input}} {{output_dir}} {{job_id}}"


def job_states(client: Client, job_ids: list[str]) -> dict[str, str]:
    return {job_id: client.status(job_id).status for job_id in job_ids}


def all_terminal(client: Client, job_ids: list[str]) -> bool:
    return all(s in ("completed", "failed", "timeout", "cancelled") for s in job_states(client, job_ids).values())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def now() -> float:
    return time.monotonic()
