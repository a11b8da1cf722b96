"""``morag_remote.client`` against a real gunicorn: typed answers, problem+json exceptions,
Idempotency-Key, waiting for a job, retries of transient failures, and no server import."""
from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading
import time

import pytest

from morag_remote.client import (Client, ConfigError, ConnectionFailed, Forbidden, InvalidRequest, LeaseLost,
                                 NotFound, RetryPolicy, ServiceUnavailable, Unauthorized,
                                 WaitTimeout)
from support.workers import served

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with served(tmp_path_factory.mktemp("client")) as running:
        yield running


def test_importing_the_client_loads_no_server_dependency():
    code = ("import sys, morag_remote.client, morag_remote.worker.runner\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('flask', 'werkzeug', 'marshmallow', 'psycopg', 'psycopg_pool', 'apispec'))\n"
            "mine = sorted(m for m in sys.modules if m.startswith('morag_remote.') and "
            "not m.startswith(('morag_remote.client', 'morag_remote.worker', 'morag_remote.version')))\n"
            "print(bad, mine)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] []"


def test_a_base_url_without_a_scheme_is_refused():
    with pytest.raises(ConfigError, match="http://"):
        Client("127.0.0.1:8000", "k")


def test_producer_calls_return_typed_records(srv):
    producer = srv.client()
    created = producer.create(srv.source("one.mp3", b"x"), "audio", "ingest-typed", task_options={"lang": "en"},
                              priority=5)
    assert created.created and created.status == "pending" and created.location.endswith(created.job_id)
    job = producer.get(created.job_id)
    assert job.job_id == created.job_id and job.task_options == {"lang": "en"} and not job.is_terminal
    assert producer.status(created.job_id).status == "pending"
    listed = producer.list(ingestion_task_id="ingest-typed")
    assert [j.job_id for j in listed.jobs] == [created.job_id]
    assert [j.job_id for j in producer.iter_jobs(ingestion_task_id="ingest-typed", limit=1)] == [created.job_id]
    assert producer.cancel(created.job_id).status == "cancelled"
    assert producer.retry(created.job_id).status == "pending"
    assert producer.stats()["totals"]


def test_the_same_idempotency_key_answers_with_the_first_job(srv):
    producer = srv.client()
    path = srv.source("idem.mp3", b"x")
    first = producer.create(path, "audio", "ingest-idem", idempotency_key="k-1")
    again = producer.create(path, "audio", "ingest-idem", idempotency_key="k-1")
    assert first.created and not again.created and again.job_id == first.job_id


def test_errors_are_exceptions_carrying_the_problem(srv):
    producer = srv.client()
    with pytest.raises(NotFound) as missing:
        producer.get("no-such-job")
    assert missing.value.status == 404 and "no-such-job" in missing.value.detail
    assert missing.value.problem["title"] == "Job not found"
    with pytest.raises(InvalidRequest) as invalid:
        producer.create(srv.source("v.mp3", b"x"), "not-a-type", "ingest-1")
    assert "content_type" in invalid.value.errors
    with pytest.raises(Unauthorized):
        Client(srv.url, "mrk_wrong").stats()
    with pytest.raises(Forbidden):
        srv.client("worker").create(srv.source("f.mp3", b"x"), "audio", "ingest-1")


def test_a_worker_cycle_and_lease_lost_after_a_cancel(srv, tmp_path):
    producer, worker = srv.client(), srv.client("worker")
    job_id = producer.create(srv.source("cycle.mp3", b"audio bytes"), "video", "ingest-cycle").job_id
    claimed = worker.poll("w-cycle", ["video"], wait=1)
    assert [c.job_id for c in claimed] == [job_id] and claimed[0].lease_id and claimed[0].timeout_at
    assert worker.download(claimed[0], str(tmp_path / "src")).size == len(b"audio bytes")
    beat = worker.heartbeat(job_id, lease_id=claimed[0].lease_id, progress=0.5, message="half")
    assert beat.status == "processing" and beat.timeout_at and producer.status(job_id).progress == 0.5
    answer = worker.result(job_id, success=True, content="text", lease_id=claimed[0].lease_id, processing_time=1.0)
    assert answer.status == "completed"
    again = worker.result(job_id, success=True, content="text", lease_id=claimed[0].lease_id, processing_time=1.0)
    assert again.status == "completed"  # the same result again is answered as the first was
    other = producer.create(srv.source("c2.mp3", b"x"), "video", "ingest-cycle").job_id
    held = worker.poll("w-cycle", ["video"])[0]
    producer.cancel(other)
    with pytest.raises(LeaseLost):
        worker.heartbeat(other, lease_id=held.lease_id)


def test_release_hands_the_job_back(srv):
    producer, worker = srv.client(), srv.client("worker")
    job_id = producer.create(srv.source("rel.mp3", b"x"), "image", "ingest-rel").job_id
    held = worker.poll("w-rel", ["image"])[0]
    worker.release(job_id, lease_id=held.lease_id)
    status = producer.status(job_id)
    assert status.status == "pending" and status.retry_count == 0
    with pytest.raises(LeaseLost):  # released: the lease fences nothing any more
        worker.release(job_id, lease_id=held.lease_id)


def test_wait_and_submit_and_wait(srv):
    producer, worker = srv.client(), srv.client("worker")

    def work() -> None:
        for _ in range(50):
            for job in worker.poll("w-wait", ["web"], wait=1):
                worker.result(job.job_id, success=True, content="waited", lease_id=job.lease_id)
                return

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    job = producer.submit_and_wait(srv.source("w.mp3", b"x"), "web", "ingest-wait", timeout=60)
    thread.join(30)
    assert job.status == "completed" and job.content == "waited"
    pending = producer.create(srv.source("w2.mp3", b"x"), "youtube", "ingest-wait").job_id
    with pytest.raises(WaitTimeout):
        producer.wait(pending, timeout=0.5)


def test_connection_refused_is_retried_a_bounded_number_of_times():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    retries: list[str] = []
    client = Client(f"http://127.0.0.1:{port}", "k", retry=RetryPolicy(attempts=3, base=0.01, cap=0.05),
                    on_retry=lambda method, path, reason: retries.append(reason))
    with pytest.raises(ConnectionFailed) as failed:
        client.stats()
    assert failed.value.attempts == 3 and retries == ["ConnectionRefusedError"] * 2


class _Busy(http.server.BaseHTTPRequestHandler):
    """503 with Retry-After: 1 for the first request, then 200."""

    calls: list[float] = []

    def do_GET(self) -> None:
        self.calls.append(time.monotonic())
        body = b'{"ok": true}' if len(self.calls) > 1 else b'{"title": "busy", "detail": "try later", "status": 503}'
        self.send_response(200 if len(self.calls) > 1 else 503)
        if len(self.calls) == 1:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_503_is_retried_after_its_retry_after():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = Client(f"http://127.0.0.1:{server.server_port}", "k", retry=RetryPolicy(attempts=3, base=0.01))
        assert client.stats() == {"ok": True}
        assert _Busy.calls[1] - _Busy.calls[0] >= 0.9  # it waited as told, not its own 10 ms
        _Busy.calls.clear()
        once = Client(f"http://127.0.0.1:{server.server_port}", "k", retry=RetryPolicy(attempts=1))
        with pytest.raises(ServiceUnavailable) as busy:
            once.stats()
        assert busy.value.detail == "try later"
    finally:
        server.shutdown()
        server.server_close()
