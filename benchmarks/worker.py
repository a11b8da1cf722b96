"""The worker scenario: ``morag-remote-worker --exec true --concurrency 8`` against a real gunicorn.

Two figures: jobs per second while the worker drains a backlog (from its first claim to its last
result, read off its own log lines), and the time from a job's creation (the server's
``created_at``) to its handler's start (the worker's ``handler.started`` line) while the worker is
idle in its long poll: the pick-up latency a producer sees. Both clocks are this machine's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from morag_remote.client import Client

from .scenarios import summary_ms
from .server import Instance, Server

WORKER = Path(sys.executable).parent / "morag-remote-worker"


class _Worker:
    """The worker process, its stderr (JSON lines) read as it comes."""

    def __init__(self, port: int, key: str, state: Path, concurrency: int) -> None:
        command = [str(WORKER)] if WORKER.exists() else [sys.executable, "-m", "morag_remote.worker"]
        self.proc = subprocess.Popen(
            [*command, "--url", f"http://127.0.0.1:{port}", "--content-types", "document", "--exec", "true",
             "--concurrency", str(concurrency), "--state-dir", str(state), "--log-level", "info"],
            env=dict(os.environ, MORAG_REMOTE_WORKER_KEY=key), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self.lock:
                self.events.append(event)

    def named(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            return [e for e in self.events if e.get("event") == name]

    def wait_for(self, name: str, count: int, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.named(name)
            if len(found) >= count or self.proc.poll() is not None:
                return found
            time.sleep(0.01)
        return self.named(name)

    def stop(self) -> int | None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            return None


def _stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def worker_scenario(instance: Instance, jobs: int = 200, pickups: int = 30, concurrency: int = 8,
                    gap: float = 0.1) -> dict[str, Any]:
    data_dir = instance.data_dir("worker")
    source = str(instance.source)
    with Server(instance, data_dir) as server:
        producer = Client(f"http://127.0.0.1:{server.port}", instance.keys["producer"])
        backlog = [producer.create(source, "document", "bench-worker").job_id for _ in range(jobs)]
        worker = _Worker(server.port, instance.keys["worker"], instance.path / "worker-state", concurrency)
        try:
            sent = worker.wait_for("result.sent", jobs, timeout=60 + jobs)
            claims = worker.named("job.claimed")
            drained = len(sent)
            seconds = (_stamp(sent[-1]) - _stamp(claims[0])) if drained and claims else None
            samples: list[float] = []
            missed = 0
            for i in range(pickups):
                time.sleep(gap)  # the worker is back in its long poll
                created = producer.create(source, "document", "bench-worker")
                started = _handler_started(worker, created.job_id, timeout=20)
                if started is None:
                    missed += 1
                    continue
                samples.append(started - created.created_at.timestamp())
        finally:
            exit_code = worker.stop()
        completed = sum(1 for job_id in backlog if producer.status(job_id).status == "completed")
        producer.close()
    return {"jobs": jobs, "concurrency": concurrency, "completed": completed,
            "seconds": round(seconds, 3) if seconds else None,
            "jobs_per_s": round(drained / seconds, 1) if seconds else None,
            "create_to_handler_start": summary_ms(samples), "missed": missed,
            "errors": (jobs - completed) + missed + (0 if exit_code == 0 else 1), "worker_exit": exit_code}


def _handler_started(worker: _Worker, job_id: str, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in worker.named("handler.started"):
            if event.get("job_id") == job_id:
                return _stamp(event)
        time.sleep(0.005)
    return None
