"""``GET /workers`` and ``remote-jobs workers``: who polled, for what, from which host, holding what."""
from __future__ import annotations

import json
from datetime import timedelta

from support.actions import auth

J = "/api/v1/remote-jobs"
INFO = {"hostname": "gpu-7", "version": "1.2.0", "concurrency": 4, "labels": {"gpu": "a100", "model": "whisper-large-v3"}}


def _poll(client, key, worker_id="w1", **body):
    return client.post(f"{J}/poll", json={"worker_id": worker_id, "content_types": ["audio", "video"], **body},
                       headers=auth(key))


def test_a_poll_with_metadata_makes_the_worker_listed_with_what_it_holds(producer, client, keys):
    job_id = producer.create_id()
    assert _poll(client, keys["worker"], worker=INFO).json["job_id"] == job_id
    response = client.get(f"{J}/workers", headers=auth(keys["producer"]))
    assert response.status_code == 200
    (entry,) = response.json["workers"]
    assert entry["worker_id"] == "w1" and entry["hostname"] == "gpu-7" and entry["version"] == "1.2.0"
    assert entry["concurrency"] == 4 and entry["labels"] == {"gpu": "a100", "model": "whisper-large-v3"}
    assert entry["content_types"] == ["audio", "video"] and entry["last_seen"]
    assert [j["job_id"] for j in entry["jobs"]] == [job_id] and entry["jobs"][0]["attempt"] == 1


def test_a_heartbeat_keeps_the_metadata_and_reports_progress_of_held_jobs(producer, client, keys, worker):
    job_id = producer.create_id()
    lease = _poll(client, keys["worker"], worker=INFO).json["jobs"][0]["lease_id"]
    assert worker.heartbeat(job_id, lease_id=lease, progress=0.4, message="transcribing").status_code == 200
    (entry,) = client.get(f"{J}/workers", headers=auth(keys["producer"])).json["workers"]
    assert entry["hostname"] == "gpu-7"
    assert entry["jobs"][0]["progress"] == 0.4 and entry["jobs"][0]["progress_message"] == "transcribing"


def test_a_plain_get_poll_registers_the_worker_without_metadata(client, keys, worker):
    assert worker.poll().status_code == 200
    (entry,) = client.get(f"{J}/workers", headers=auth(keys["admin"])).json["workers"]
    assert entry["worker_id"] == "w1" and entry["hostname"] is None and entry["labels"] == {} and entry["jobs"] == []


def test_workers_not_seen_for_a_day_are_forgotten(client, keys, clock, app):
    _poll(client, keys["worker"], "old", worker=INFO)
    clock.advance(timedelta(days=1, seconds=1).total_seconds())
    _poll(client, keys["worker"], "new")
    listed = [w["worker_id"] for w in client.get(f"{J}/workers", headers=auth(keys["producer"])).json["workers"]]
    assert listed == ["new"]
    from morag_remote.context import WORKERS
    assert app.extensions[WORKERS].purge() == 1


def test_worker_metadata_is_validated_and_a_bad_one_changes_nothing(client, keys, producer):
    job_id = producer.create_id()
    for bad in ({"hostname": 5}, {"concurrency": 0}, {"labels": {"x" * 65: "a"}},
                {"labels": {f"l{n}": "v" for n in range(33)}}, {"labels": ["a"]}, {"labels": {"a": 1}},
                {"gpu": "a100"}, "gpu-7"):
        response = _poll(client, keys["worker"], worker=bad)
        assert response.status_code == 422 and any(k.startswith("worker") for k in response.json["errors"]), bad
    assert producer.get(job_id).json["status"] == "pending"
    assert client.get(f"{J}/workers", headers=auth(keys["producer"])).json["workers"] == []


def test_only_producers_and_admins_list_workers(client, keys):
    assert client.get(f"{J}/workers", headers=auth(keys["worker"])).status_code == 403
    assert client.get(f"{J}/workers").status_code == 401


def test_the_cli_prints_the_workers(client, keys, runner, producer):
    job_id = producer.create_id()
    _poll(client, keys["worker"], worker=INFO)
    out = runner.invoke(args=["remote-jobs", "workers"])
    assert out.exit_code == 0 and "w1" in out.output and "host=gpu-7" in out.output and job_id in out.output
    listed = json.loads(runner.invoke(args=["remote-jobs", "workers", "--json"]).output)
    assert listed["workers"][0]["worker_id"] == "w1"


def test_the_cli_says_when_no_worker_was_seen(runner):
    out = runner.invoke(args=["remote-jobs", "workers"])
    assert out.exit_code == 0 and out.output.strip() == "no worker seen"
