"""A long poll whose caller hung up claims nothing: its wait ends, and a job created afterwards goes
to the next live poller at once with ``retry_count`` 0 (a real gunicorn, raw sockets)."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from support.gunicorn import Gunicorn, make_keys, wait_for

pytestmark = pytest.mark.slow
J = "/api/v1/remote-jobs"


@pytest.fixture
def server(tmp_path):
    instance = tmp_path / "instance"
    (instance / "sources").mkdir(parents=True)
    (instance / "sources" / "a.mp3").write_bytes(b"audio bytes")
    keys = make_keys(instance)
    gunicorn = Gunicorn(instance, workers=1, env={"GUNICORN_THREADS": "8"}).start()
    try:
        yield gunicorn, keys, instance
    finally:
        gunicorn.stop()


def _raw_long_poll(base_url: str, key: str, worker_id: str, wait: int = 15) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall((f"GET {J}/poll?worker_id={worker_id}&content_types=audio&wait={wait} HTTP/1.1\r\n"
                  f"Host: {host}\r\nAuthorization: Bearer {key}\r\n\r\n").encode())
    return sock


def _waiting(gunicorn: Gunicorn, worker_id: str) -> bool:
    summary = requests.get(gunicorn.url(f"{J}/workers"), timeout=5,
                           headers={"Authorization": f"Bearer {gunicorn.admin}"}).json()
    return any(w["worker_id"] == worker_id for w in summary["workers"])


def test_a_long_poll_whose_caller_hung_up_claims_nothing(server):
    gunicorn, keys, instance = server
    gunicorn.admin = keys["admin"]
    dead = _raw_long_poll(gunicorn.base_url, keys["worker"], "dead-worker")
    wait_for(lambda: _waiting(gunicorn, "dead-worker"), 10, "the dead worker's poll to start")
    dead.close()
    time.sleep(1.5)  # longer than the server's client check: the wait has ended

    answers = {}
    live = threading.Thread(target=lambda: answers.update(live=requests.get(
        gunicorn.url(f"{J}/poll"), params={"worker_id": "live-worker", "content_types": "audio", "wait": 15},
        headers={"Authorization": f"Bearer {keys['worker']}"}, timeout=30)))
    live.start()
    wait_for(lambda: _waiting(gunicorn, "live-worker"), 10, "the live worker's poll to start")
    created = requests.post(gunicorn.url(f"{J}/"), headers={"Authorization": f"Bearer {keys['producer']}"},
                            json={"source_file_path": str(instance / "sources" / "a.mp3"), "content_type": "audio",
                                  "ingestion_task_id": "t"}, timeout=10).json()
    started = time.monotonic()
    live.join(30)
    assert answers["live"].json()["job_id"] == created["job_id"]
    assert time.monotonic() - started < 5  # at once, not after a lease or a wait
    job = requests.get(gunicorn.url(f"{J}/{created['job_id']}"), timeout=10,
                       headers={"Authorization": f"Bearer {keys['producer']}"}).json()
    assert job["worker_id"] == "live-worker" and job["retry_count"] == 0 and job["attempt"] == 1
    assert '"poll.client_gone"' in gunicorn.stderr()


def test_a_job_claimed_for_a_caller_already_gone_is_handed_back_without_an_attempt(server):
    """The caller hangs up in the same instant the job appears: whichever way the race goes, the job
    is never left processing under the dead worker, and its retry count stays 0."""
    gunicorn, keys, instance = server
    producer = {"Authorization": f"Bearer {keys['producer']}"}
    body = {"source_file_path": str(instance / "sources" / "a.mp3"), "content_type": "audio", "ingestion_task_id": "t"}
    for attempt in range(5):
        dead = _raw_long_poll(gunicorn.base_url, keys["worker"], f"dead-{attempt}", wait=5)
        time.sleep(0.3)
        dead.shutdown(socket.SHUT_RDWR)
        dead.close()
        job_id = requests.post(gunicorn.url(f"{J}/"), headers=producer, json=body, timeout=10).json()["job_id"]
        time.sleep(1.5)
        job = requests.get(gunicorn.url(f"{J}/{job_id}"), headers=producer, timeout=10).json()
        assert job["status"] == "pending" and job["retry_count"] == 0, job
