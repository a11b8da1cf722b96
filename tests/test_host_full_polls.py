"""A poll turned away because its process already has its most waiters says so
(``X-Poll-Host-Full: true``, documented in the OpenAPI document); the client reports it
(``ClaimedJobs.host_full``) and the worker backs off, with jitter, instead of polling again at once.
The API tests run on both backends."""
from __future__ import annotations

import threading

import pytest
import requests

from support.actions import auth
from support.gunicorn import wait_for
from support.workers import WorkerProcess, served

POLL = "/api/v1/remote-jobs/poll"


def _poll(client, key: str, worker_id: str, wait: float):
    return client.get(POLL, query_string={"worker_id": worker_id, "content_types": "audio", "wait": wait},
                      headers=auth(key))


@pytest.mark.parametrize("app_config", [{"POLL_MAX_WAITERS": 1}])
def test_a_poll_beyond_the_waiter_cap_answers_host_full(app, service, keys, producer, app_config):
    box = {}
    first = threading.Thread(target=lambda: box.setdefault("r", _poll(app.test_client(), keys["worker"], "w1", 20)))
    first.start()
    wait_for(lambda: service.polls.waiting == 1, 15, "the first poll to wait")

    turned_away = _poll(app.test_client(), keys["worker"], "w2", 20)

    assert turned_away.status_code == 200 and turned_away.json["jobs"] == []
    assert turned_away.headers["X-Poll-Host-Full"] == "true"
    job_id = producer.create_id("audio")
    first.join(30)
    assert box["r"].json["job_id"] == job_id
    assert "X-Poll-Host-Full" not in box["r"].headers


def test_a_poll_that_waited_does_not_say_host_full(worker):
    response = worker.poll("audio", wait=0.1)
    assert response.json["jobs"] == [] and "X-Poll-Host-Full" not in response.headers


def test_the_openapi_document_names_the_host_full_header(client):
    document = client.get("/openapi.json").json
    poll = document["paths"]["/api/v1/remote-jobs/poll"]["get"]
    header = poll["responses"]["200"]["headers"]["X-Poll-Host-Full"]
    assert header["schema"] == {"type": "string", "enum": ["true"]}
    assert "Back off" in header["description"]


@pytest.mark.slow
def test_the_client_reports_host_full_and_the_worker_backs_off_on_it(tmp_path):
    with served(tmp_path, env={"MORAG_REMOTE_POLL_MAX_WAITERS": "1"}, workers=1) as s:
        worker_key = s.keys["worker"]
        holding = threading.Event()
        stop = threading.Event()

        def hold_the_only_slot() -> None:
            with s.client("worker") as c:
                while not stop.is_set():  # bounded by the test: each poll waits at most 5 s
                    holding.set()
                    c.poll("holder", ["video"], wait=5)

        holder = threading.Thread(target=hold_the_only_slot, daemon=True)
        holder.start()
        assert holding.wait(10)
        with s.client("worker") as c:
            turned_away = wait_for(lambda: (r := c.poll("probe", ["audio"], wait=1)).host_full and [r], 15,
                                   "a poll to be turned away")[0]
        assert turned_away == [] and turned_away.host_full

        proc = WorkerProcess(s.url, worker_key, tmp_path / "worker", "--exec", "true", "--poll-wait", "5").start()
        try:
            first = proc.wait_event("poll.host_full", timeout=30)
            second = proc.wait_event("poll.host_full", timeout=30, times=2)
            assert 1.0 <= first["retry_in_s"] <= 2.0 and 2.0 <= second["retry_in_s"] <= 4.0  # jittered, doubling
            stop.set()
            holder.join(15)
            with s.client("producer") as producer:
                job = producer.create(s.source("a.mp3", b"audio"), "audio", "t")
            proc.wait_event("job.claimed", timeout=60, job_id=job.job_id)
        finally:
            stop.set()
            proc.stop()
            holder.join(15)
        assert requests.get(f"{s.url}/metrics", headers=auth(s.keys["admin"]), timeout=10).text.count(
            "morag_remote_poll_host_full_total") >= 1
