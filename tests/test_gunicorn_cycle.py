"""A real gunicorn (the repository's gunicorn.conf.py and wsgi.py) with 3 worker processes on a
free loopback port: the seed worker's whole cycle over HTTP, and claims that stay exclusive when
requests land in different processes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from morag_remote.store.files.keys import FileKeyStore

REPO = Path(__file__).resolve().parent.parent
WORKERS = 3
API = "/api/v1/remote-jobs"

pytestmark = pytest.mark.slow


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    instance: Path
    log: Path
    producer: dict[str, str]
    worker: dict[str, str]

    def url(self, path: str) -> str:
        return self.base + path

    def log_lines(self) -> list[dict]:
        lines = []
        for raw in self.log.read_text().splitlines():
            if raw.startswith("{"):
                lines.append(json.loads(raw))
        return lines


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                found.append(int(entry.name))
    return found


def _wait_until(condition, what: str, proc: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    """Poll ``condition`` until it holds; fail when gunicorn exits or ``seconds`` pass (a loaded
    2-core machine may take a while to boot three workers)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"gunicorn exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"gunicorn: {what} did not happen:\n{log.read_text()[-3000:]}")


def _healthy(base: str) -> bool:
    try:
        return requests.get(base + "/health", timeout=5).status_code == 200
    except requests.RequestException:  # refused, or accepted by the kernel before a worker is up
        return False


@pytest.fixture
def server(tmp_path: Path):
    instance = tmp_path / "instance"
    (instance / "sources").mkdir(parents=True)
    keys = FileKeyStore(instance / "api_keys.json")
    producer_key = keys.create("producer", "producer")[1]
    worker_key = keys.create("gpu", "worker")[1]
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_REMOTE_")}
    env.update({"MORAG_REMOTE_INSTANCE_PATH": str(instance), "HOST": "127.0.0.1", "PORT": str(port),
                "WEB_CONCURRENCY": str(WORKERS), "GUNICORN_THREADS": "4"})
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until(lambda: _healthy(base), "GET /health answering 200", proc, log)
        _wait_until(lambda: len(_children(proc.pid)) == WORKERS, f"{WORKERS} worker processes", proc, log)
        yield Server(base, proc, instance, log, {"Authorization": f"Bearer {producer_key}"},
                     {"Authorization": f"Bearer {worker_key}"})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_full_cycle_create_poll_download_result_status_over_http(server):
    assert len(_children(server.proc.pid)) == WORKERS
    payload = os.urandom(200_000)
    source = server.instance / "sources" / "lecture.mp4"
    source.write_bytes(payload)

    created = requests.post(server.url(API), headers=server.producer, timeout=10, json={
        "source_file_path": str(source), "content_type": "video", "task_options": {"lang": "en"},
        "ingestion_task_id": "ingest-7"})
    assert created.status_code == 201, created.text
    job_id = created.json()["job_id"]
    assert created.headers["Location"] == f"{API}/{job_id}"

    polled = requests.get(server.url(f"{API}/poll?worker_id=w1&content_types=audio,video&max_jobs=1"),
                          headers=server.worker, timeout=10)
    assert polled.status_code == 200
    body = polled.json()
    assert (body["job_id"], body["content_type"], body["task_options"]) == (job_id, "video", {"lang": "en"})
    assert body["source_file_url"].startswith("/")

    downloaded = requests.get(server.url(body["source_file_url"]), headers=server.worker, timeout=30)
    assert downloaded.status_code == 200
    assert downloaded.content == payload
    assert downloaded.headers["Content-Length"] == str(len(payload))
    assert "lecture.mp4" in downloaded.headers["Content-Disposition"]

    resumed = requests.get(server.url(body["source_file_url"]), timeout=30,
                           headers={**server.worker, "Range": "bytes=150000-"})
    assert resumed.status_code == 206 and resumed.content == payload[150000:]

    result = requests.put(server.url(f"{API}/{job_id}/result"), headers=server.worker, timeout=10, json={
        "success": True, "content": "the transcript", "metadata": {"frames": 3}, "processing_time": 9.5})
    assert result.status_code == 200
    assert result.json() == {"status": "completed", "ingestion_continued": False}

    status = requests.get(server.url(f"{API}/{job_id}/status"), headers=server.producer, timeout=10).json()
    assert (status["job_id"], status["status"], status["worker_id"]) == (job_id, "completed", "w1")
    job = requests.get(server.url(f"{API}/{job_id}"), headers=server.producer, timeout=10).json()
    assert job["result_data"] == {"content": "the transcript", "metadata": {"frames": 3}, "processing_time": 9.5}


def test_a_source_whose_name_headers_cannot_carry_is_served_under_gunicorn(server):
    """Content-Disposition carries an ASCII filename and the exact name as filename* (RFC 6266)."""
    expected = {"\u65e5\u672c\u8a9e lecture.mp3": '"___ lecture.mp3"; filename*=UTF-8\'\'%E6%97%A5%E6%9C%AC%E8%AA%9E%20lecture.mp3',
                "line\nbreak.mp3": "line_break.mp3; filename*=UTF-8''line%0Abreak.mp3"}
    for name, names in expected.items():
        source = server.instance / "sources" / name
        source.write_bytes(name.encode())
        created = requests.post(server.url(API), headers=server.producer, timeout=10, json={
            "source_file_path": str(source), "content_type": "audio", "ingestion_task_id": "names"})
        assert created.status_code == 201, created.text
        polled = requests.get(server.url(f"{API}/poll?worker_id=w1&content_types=audio"), headers=server.worker,
                              timeout=10).json()
        downloaded = requests.get(server.url(polled["source_file_url"]), headers=server.worker, timeout=30)
        assert downloaded.status_code == 200 and downloaded.content == name.encode()
        assert downloaded.headers["Content-Disposition"] == f"attachment; filename={names}"


def test_nothing_pending_answers_the_seed_fields_all_null(server):
    body = requests.get(server.url(f"{API}/poll?worker_id=w1&content_types=audio,video&max_jobs=1"),
                        headers=server.worker, timeout=10).json()
    assert [body[k] for k in ("job_id", "source_file_url", "content_type", "task_options")] == [None] * 4


def test_concurrent_pollers_across_processes_claim_each_job_once(server):
    source = server.instance / "sources" / "a.wav"
    source.write_bytes(b"a")
    created = []
    for i in range(60):
        response = requests.post(server.url(API + "/"), headers=server.producer, timeout=10, json={
            "source_file_path": str(source), "content_type": "audio", "ingestion_task_id": f"t{i}"})
        assert response.status_code == 201
        created.append(response.json()["job_id"])

    claimed: list[str] = []
    lock = threading.Lock()
    failures: list[str] = []

    def poll_until_empty(name: str) -> None:
        for _ in range(len(created) + 1):  # bounded
            # a new connection per request, so requests spread over the worker processes
            response = requests.post(server.url(f"{API}/poll"), headers={**server.worker, "Connection": "close"},
                                     json={"worker_id": name, "content_types": ["audio"], "max_jobs": 2},
                                     timeout=30)
            if response.status_code != 200:
                failures.append(response.text)
                return
            jobs = [j["job_id"] for j in response.json()["jobs"]]
            if not jobs:
                return
            with lock:
                claimed.extend(jobs)

    threads = [threading.Thread(target=poll_until_empty, args=(f"w{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert failures == []
    counts = Counter(claimed)
    assert sorted(counts) == sorted(created) and max(counts.values()) == 1


def test_each_request_is_one_json_log_line_with_the_request_id(server):
    response = requests.get(server.url("/health"), headers={"X-Request-ID": "gunicorn-check-1"}, timeout=10)
    assert response.headers["X-Request-ID"] == "gunicorn-check-1"
    missing = requests.get(server.url("/missing"), timeout=10)
    assert missing.status_code == 404 and missing.headers["Content-Type"] == "application/problem+json"

    def logged() -> list[dict]:
        return [line for line in server.log_lines() if line.get("event") == "http.access"
                and line.get("request_id") in ("gunicorn-check-1", missing.headers["X-Request-ID"])]

    _wait_until(lambda: len(logged()) == 2, "two request log lines", server.proc, server.log)
    health, not_found = sorted(logged(), key=lambda line: line["path"])
    assert (health["method"], health["path"], health["status"]) == ("GET", "/health", 200)
    assert (not_found["path"], not_found["status"]) == ("/missing", 404)
    assert isinstance(health["duration_ms"], (int, float))
    assert health["timestamp"].endswith("Z") and health["level"] == "info"
