"""(5) The HTTP floor: the full cycle's four requests against :mod:`.floor_app` (trivial views) under
gunicorn with the service's worker class, processes, threads and CPU placement, with the same
clients as the full cycles. Its cycles/s is what this machine's web stack allows before the service does any work of
its own, so the full cycles' figure can be read as a share of it, on any machine."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from .client import Api
from .server import REPO, START_TIMEOUT, child_pids, free_port, process_cpu
from .scenarios import busy_percent, machine_busy, run_clients


def _floor_client(port: int, index: int, seconds: float, ready: Any, go: Any, start_at: Any, out: Any) -> None:
    cycles = errors = 0
    body = {"source_file_path": "/data/in.wav", "content_type": "audio", "ingestion_task_id": "bench"}
    result = {"success": True, "content": "converted", "metadata": {"bench": True}, "processing_time": 0.01}
    try:
        with Api(port, "floor") as producer, Api(port, "floor") as worker:
            ready.put(index)
            go.wait(60)
            deadline = start_at.value + seconds
            while time.monotonic() < deadline:
                try:
                    producer.json("POST", "/jobs", body, expect=201)
                    url = worker.json("GET", "/poll?worker_id=w&content_types=audio&max_jobs=1")["source_file_url"]
                    if len(worker.download(url)) != 1024:
                        raise ValueError("short body")
                    worker.json("PUT", "/result", result)
                    cycles += 1
                except Exception:  # counted, never the end of the client: its report must come
                    errors += 1
    finally:
        out.put({"cycles": cycles, "errors": errors, "finished": time.monotonic()})


def http_floor(server: dict[str, Any], clients: int = 16, seconds: float = 20.0) -> dict[str, Any]:
    """``server``: the worker class, processes and threads that gunicorn.conf.py chooses."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "benchmarks/floor_gunicorn.py",
         "-k", str(server["worker_class"]), "-w", str(server["workers"]),
         "--threads", str(server["threads"]), "--keep-alive", "5", "-b", f"127.0.0.1:{port}",
         "benchmarks.floor_app:app"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_ready(proc, port, int(server["workers"]))

        def probe() -> tuple[float, tuple[float, float]]:
            return _server_cpu(proc.pid), machine_busy()

        reports, started, (cpu_before, machine_before), (cpu_after, machine_after) = run_clients(
            _floor_client, (port,), clients, seconds, probe)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    elapsed = max(r["finished"] for r in reports) - started
    cycles = sum(r["cycles"] for r in reports)
    return {"clients": clients, "seconds": round(elapsed, 2), "cycles": cycles,
            "cycles_per_s": round(cycles / elapsed, 1), "errors": sum(r["errors"] for r in reports),
            "server_cpu_ms_per_cycle": round((cpu_after - cpu_before) / max(cycles, 1) * 1000, 2),
            "machine_busy_percent": busy_percent(machine_before, machine_after)}


def _wait_ready(proc: subprocess.Popen, port: int, workers: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the floor's gunicorn exited with {proc.returncode}")
        try:
            with Api(port, "floor", timeout=5) as api:
                status, _ = api.request("GET", "/poll?worker_id=ready")
            if status == 200 and len(child_pids(proc.pid)) >= workers:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the floor's gunicorn did not become ready")


def _server_cpu(pid: int) -> float:
    return sum(sum(process_cpu(p)) for p in [pid, *child_pids(pid)])
