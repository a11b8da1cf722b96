"""Long polls: ``wait`` on GET/POST /poll (and ``JobService.poll(wait=)``) returns as soon as a job
can be claimed (one created meanwhile by another thread or process, one whose backoff ends, one whose
previous holder's lease lapses, with no cron job and no other request), empty when the wait ends,
never beyond the configured maximum, and never holds more threads than the cap allows. Every test
runs on both backends (across hosts on PostgreSQL: test_postgres_scaleout.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import requests
from support.actions import WorkerActions, auth
from support.gunicorn import gunicorn, wait_for

POLL = "/api/v1/remote-jobs/poll"


def waiting(service, n: int = 1) -> None:
    """Wait (bounded) until ``n`` long polls of this app are waiting."""
    wait_for(lambda: service.polls.waiting == n, 15, f"{n} waiting poll(s)", interval=0.01)


def backend_env(app, base: dict | None = None) -> dict[str, str]:
    """The environment for another process to use this app's store (its database, when it has one)."""
    env = dict(os.environ) if base is None else dict(base)
    if app.config.get("DATABASE_URL"):
        env["MORAG_REMOTE_DATABASE_URL"] = app.config["DATABASE_URL"]
    return env


def _source(instance_path) -> str:
    path = instance_path / "sources" / "a.mp3"
    path.write_bytes(b"a")
    return str(path)


class PollInThread:
    """A long poll run on its own thread and test client, as a second worker would."""

    def __init__(self, app, key: str, worker_id: str, content_types: str, wait: float) -> None:
        self.response = None
        client = app.test_client()
        query = {"worker_id": worker_id, "content_types": content_types, "wait": wait}
        self.thread = threading.Thread(
            target=lambda: setattr(self, "response", client.get(POLL, query_string=query, headers=auth(key))),
            daemon=True)
        self.thread.start()

    def result(self, timeout: float = 30.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the poll did not return"
        return self.response


def test_waiting_poll_returns_job_created_by_another_thread_meanwhile(app, service, keys, producer):
    waiter = PollInThread(app, keys["worker"], "w-wait", "audio", wait=20)
    waiting(service)
    job_id = producer.create_id("audio")
    response = waiter.result()
    assert response.status_code == 200
    assert response.json["job_id"] == job_id
    assert response.json["jobs"][0]["lease_id"]


def test_waiting_poll_returns_job_created_by_another_process_meanwhile(app, service, keys, instance_path):
    source = instance_path / "sources" / "other.mp3"
    source.write_bytes(b"audio")
    waiter = PollInThread(app, keys["worker"], "w-wait", "audio", wait=20)
    waiting(service)
    script = ("import json, sys\n"
              "from morag_remote import create_app\n"
              "from morag_remote.context import SERVICE\n"
              "app = create_app({'INSTANCE_PATH': sys.argv[1], 'LOG_JSON': True})\n"
              "job = app.extensions[SERVICE].create(source_file_path=sys.argv[2], content_type='audio',\n"
              "                                     ingestion_task_id='elsewhere')\n"
              "print(json.dumps({'id': job.id}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(instance_path), str(source)], env=backend_env(app),
                          capture_output=True, text=True, timeout=60, check=True)
    job_id = json.loads(done.stdout.strip().splitlines()[-1])["id"]
    response = waiter.result()
    assert response.json["job_id"] == job_id


def test_poll_returns_empty_when_the_wait_ends(worker, service):
    response = worker.poll("audio", wait=0.2)
    assert response.status_code == 200
    assert response.json["job_id"] is None
    assert response.json["jobs"] == []
    assert service.poll("w1", ["audio"], wait=0.2) == []  # the service's own long poll, too


def test_a_long_poll_takes_a_job_created_while_it_waits(service, instance_path):
    source = _source(instance_path)
    got = []
    poller = threading.Thread(target=lambda: got.extend(service.poll("w1", ["audio"], wait=30)))
    poller.start()
    created = []
    for _ in range(100):  # bounded; usually the first job wakes the poll
        created.append(service.create(source_file_path=source, content_type="audio", ingestion_task_id="t").id)
        poller.join(0.3)
        if not poller.is_alive():
            break
    assert len(got) == 1
    assert got[0].id in created
    assert got[0].worker_id == "w1"


def test_a_long_poll_for_other_types_is_not_handed_a_job(service, instance_path):
    service.create(source_file_path=_source(instance_path), content_type="video", ingestion_task_id="t")
    assert service.poll("w1", ["audio"], wait=0.3) == []


def test_post_poll_waits_as_get_does(app, service, keys, producer):
    client = app.test_client()
    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("r", client.post(
        POLL, json={"worker_id": "w-post", "content_types": ["video"], "wait": 20},
        headers=auth(keys["worker"]))), daemon=True)
    thread.start()
    waiting(service)
    job_id = producer.create_id("video")
    thread.join(30)
    assert box["r"].json["job_id"] == job_id


@pytest.mark.parametrize("wait", ["20.5", "-1", "soon"])
def test_wait_outside_zero_to_the_maximum_is_422(worker, wait):
    response = worker.poll("audio", wait=wait)
    assert response.status_code == 422
    assert response.content_type == "application/problem+json"
    assert "wait" in response.json["errors"]


@pytest.mark.parametrize("app_config", [{"POLL_MAX_WAIT_SECONDS": 5}])
def test_configured_maximum_wait_is_enforced(worker, app_config):
    assert worker.poll("audio", wait=5).status_code == 200
    response = worker.poll("audio", wait=5.5)
    assert response.status_code == 422
    assert "5" in response.json["errors"]["wait"][0]


@pytest.mark.parametrize("app_config", [{"POLL_MAX_WAITERS": 1}])
def test_polls_beyond_the_waiter_cap_return_at_once_instead_of_waiting(app, service, keys, producer, app_config):
    first = PollInThread(app, keys["worker"], "w-first", "audio", wait=20)
    waiting(service)
    second = app.test_client().get(POLL, query_string={"worker_id": "w-second", "content_types": "audio",
                                                       "wait": 20}, headers=auth(keys["worker"]))
    assert second.status_code == 200
    assert second.json["job_id"] is None
    assert first.thread.is_alive()
    assert service.polls.waiting == 1  # the first is still waiting
    job_id = producer.create_id("audio")
    assert first.result().json["job_id"] == job_id


SHORT = 0.3  # seconds: short enough to pass within a long poll, long enough to be a real delay


@pytest.mark.parametrize("app_config", [{"RETRY_BACKOFF_SECONDS": SHORT, "RETRY_BACKOFF_MAX_SECONDS": SHORT}])
def test_delayed_retry_wakes_a_waiting_poll_when_its_backoff_ends(app, service, keys, producer, worker, app_config):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    failed = worker.result(job_id, success=False, error_message="GPU out of memory")
    assert failed.json["status"] == "pending"
    waiting_job = producer.get(job_id).json
    assert waiting_job["available_at"] > waiting_job["updated_at"]  # a real delay
    assert worker.poll("audio").json["job_id"] is None  # still in its backoff

    response = WorkerActions(app.test_client(), keys["worker"], "w2").poll("audio", wait=20)
    assert response.json["job_id"] == job_id
    job = producer.get(job_id).json
    assert job["retry_count"] == 1
    assert job["worker_id"] == "w2"
    assert job["started_at"] >= job["available_at"]


@pytest.mark.slow
@pytest.mark.parametrize("app_config", [{"LEASE_SECONDS": {"default": SHORT}}])
def test_long_poll_returns_a_job_whose_lease_lapses_while_it_waits(producer, worker, worker2):
    job_id = producer.create_id("audio")
    first = worker.claim("audio")

    body = worker2.poll("audio", wait=10).json

    assert body["job_id"] == job_id
    assert body["jobs"][0]["retry_count"] == 1
    assert body["jobs"][0]["lease_id"] != first["lease_id"]


def test_a_job_of_another_type_does_not_end_the_wait(app, service, keys, producer):
    waiter = PollInThread(app, keys["worker"], "w-wait", "audio", wait=20)
    waiting(service)
    producer.create_id("video")
    audio_id = producer.create_id("audio")
    assert waiter.result().json["job_id"] == audio_id
    assert producer.get(audio_id).json["worker_id"] == "w-wait"


# -- over a real gunicorn ---------------------------------------------------------------------------

@pytest.mark.slow
def test_long_polls_over_gunicorn_leave_a_thread_for_the_rest_of_the_api(app, keys, instance_path):
    """One process of 3 threads, at most 2 of them in long polls: the third serves everyone else."""
    env = {**backend_env(app, {}), "MORAG_REMOTE_POLL_MAX_WAITERS": "2"}
    with gunicorn(instance_path, env, workers=1, threads=3, worker_connections=16) as base:
        _long_polls_leave_a_thread(base, auth(keys["worker"]), auth(keys["producer"]), instance_path)


def _long_polls_leave_a_thread(base: str, worker_h: dict, producer_h: dict, instance_path: Path) -> None:
    source = instance_path / "sources" / "talk.mp3"
    source.write_bytes(b"audio" * 100)
    results: list[dict] = []

    def long_poll(i: int) -> None:
        r = requests.get(f"{base}{POLL}", params={"worker_id": f"lp-{i}", "content_types": "audio", "wait": 20},
                         headers=worker_h, timeout=60)
        results.append(r.json())

    threads = [threading.Thread(target=long_poll, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    # 2 of the 4 may wait (the cap); the other 2 answer at once, empty: then 2 are surely waiting
    wait_for(lambda: len(results) == 2, 30, "the polls beyond the cap to answer")
    assert all(r["job_id"] is None for r in results)

    # with 2 of 3 threads waiting, the rest of the API still answers
    created = requests.post(f"{base}/api/v1/remote-jobs/", headers=producer_h, timeout=30, json={
        "source_file_path": str(source), "content_type": "video", "ingestion_task_id": "t"})
    assert created.status_code == 201
    status = requests.get(f"{base}/api/v1/remote-jobs/{created.json()['job_id']}/status", headers=producer_h,
                          timeout=30)
    assert status.status_code == 200
    assert status.json()["status"] == "pending"

    # and each waiting poll gets the audio job created for it
    audio = [requests.post(f"{base}/api/v1/remote-jobs/", headers=producer_h, timeout=30, json={
        "source_file_path": str(source), "content_type": "audio", "ingestion_task_id": "t"}).json()["job_id"]
        for _ in range(2)]
    for t in threads:
        t.join(30)
    assert sorted(r["job_id"] for r in results if r["job_id"]) == sorted(audio)
