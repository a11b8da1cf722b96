"""``Idempotency-Key`` on create: a retried create answers with the job it already made, across
threads, gunicorn processes and a crash between the record and the job."""
from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

import live_gunicorn

from morag_remote import create_app
from morag_remote.context import KEYS, SERVICE
from morag_remote.idempotency import IDEMPOTENCY, IdempotencyRecord, fingerprint_of, key_id_of
from morag_remote.models import new_job_id, utcnow
from morag_remote.schemas import CreateJobRequest


def keyed(producer, key: str, **body: Any):
    path = producer.source("talk.mp3")
    payload = {"source_file_path": str(path), "content_type": "audio", "ingestion_task_id": "ingest-1", **body}
    return producer.client.post("/api/v1/remote-jobs/", json=payload,
                                headers={**producer.headers, "Idempotency-Key": key})


def job_count(producer) -> int:
    return len(producer.client.get("/api/v1/remote-jobs/", headers=producer.headers).json["jobs"])


def test_same_key_and_body_answers_200_with_the_original_job(producer):
    first = keyed(producer, "req-1")
    again = keyed(producer, "req-1")
    assert first.status_code == 201 and again.status_code == 200
    assert again.json == first.json
    assert again.headers["Location"] == first.headers["Location"]
    assert job_count(producer) == 1


def test_same_key_with_a_different_body_is_422_and_makes_nothing(producer):
    keyed(producer, "req-1")
    response = keyed(producer, "req-1", priority=5)
    assert response.status_code == 422
    assert response.headers["Content-Type"] == "application/problem+json"
    assert "Idempotency-Key" in response.json["errors"]
    assert job_count(producer) == 1


def test_replay_answers_with_the_jobs_current_status(producer, worker):
    first = keyed(producer, "req-1")
    worker.claim()
    again = keyed(producer, "req-1")
    assert again.status_code == 200 and again.json["job_id"] == first.json["job_id"]
    assert again.json["status"] == "processing"


def test_different_keys_make_different_jobs(producer):
    assert keyed(producer, "a").json["job_id"] != keyed(producer, "b").json["job_id"]
    assert job_count(producer) == 2


def test_keys_are_scoped_to_the_api_key_that_sent_them(producer, app, client, instance_path):
    from conftest import ProducerActions

    _, other_secret = app.extensions[KEYS].create("producer-2", "producer")
    other = ProducerActions(client, other_secret, instance_path / "sources")
    assert keyed(producer, "shared").json["job_id"] != keyed(other, "shared").json["job_id"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "naïve", "tab\there"])
def test_a_malformed_key_is_422_and_makes_nothing(producer, key):
    response = producer.client.post("/api/v1/remote-jobs/", headers={**producer.headers, "Idempotency-Key": key},
                                    json={"source_file_path": str(producer.source()), "content_type": "audio",
                                          "ingestion_task_id": "i"})
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json["errors"]
    assert job_count(producer) == 0


def test_an_invalid_body_does_not_use_up_the_key(producer):
    assert keyed(producer, "req-1", content_type="hologram").status_code == 422
    assert keyed(producer, "req-1").status_code == 201


def test_a_refused_source_does_not_use_up_the_key(producer):
    refused = keyed(producer, "req-1", source_file_path="/etc/passwd")
    assert refused.status_code == 422
    assert keyed(producer, "req-1").status_code == 201
    assert job_count(producer) == 1


def test_a_key_is_kept_a_day_then_names_a_new_request(producer, clock, app):
    first = keyed(producer, "req-1").json["job_id"]
    clock.advance(23 * 3600)
    assert keyed(producer, "req-1").json["job_id"] == first
    clock.advance(2 * 3600)
    second = keyed(producer, "req-1")
    assert second.status_code == 201 and second.json["job_id"] != first


def test_expired_records_are_purged(producer, clock, app):
    keyed(producer, "old")
    records_dir = Path(app.config["JOBS_DATA_DIR"]) / "idempotency"
    assert len(list(records_dir.glob("*.json"))) == 1
    clock.advance(25 * 3600)
    creates = app.extensions[IDEMPOTENCY]
    creates._next_purge = 0.0
    keyed(producer, "new")
    assert len(list(records_dir.glob("*.json"))) == 1


def test_a_key_whose_job_was_deleted_is_409(producer, admin_headers):
    job_id = keyed(producer, "req-1").json["job_id"]
    producer.client.delete(f"/api/v1/remote-jobs/{job_id}", headers=admin_headers)
    response = keyed(producer, "req-1")
    assert response.status_code == 409 and response.json["job_id"] == job_id


def test_eight_threads_with_one_key_make_one_job(app, producer):
    barrier = threading.Barrier(8)
    answers: list[tuple[int, str]] = []

    def create() -> None:
        client = app.test_client()
        body = {"source_file_path": str(producer.sources / "talk.mp3"), "content_type": "audio",
                "ingestion_task_id": "ingest-1"}
        barrier.wait(30)
        r = client.post("/api/v1/remote-jobs/", json=body, headers={**producer.headers, "Idempotency-Key": "k8"})
        answers.append((r.status_code, r.json["job_id"]))

    producer.source("talk.mp3")
    _run_together(create, 8)
    _assert_one_job_made(answers, 8)
    assert job_count(producer) == 1


def _run_together(target, n: int) -> None:
    """Run ``target`` in ``n`` threads (they meet at their own barrier) and wait for all of them."""
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def _assert_one_job_made(answers: list[tuple[int, str]], n: int) -> None:
    """Of ``n`` creates with one key, one made the job (201) and the rest got it back (200)."""
    assert sorted(code for code, _ in answers) == [200] * (n - 1) + [201]
    assert len({job_id for _, job_id in answers}) == 1


# -- a crash between the record and the job ---------------------------------------------------------

def _reserve_and_die(instance_path: str, key: str, body: dict, create_job: bool, producer_name: str) -> None:
    """Child: take the key as a create would, then die before (or right after) making the job."""
    app = create_app({"TESTING": True, "INSTANCE_PATH": instance_path, "LOG_JSON": True})
    creates = app.extensions[IDEMPOTENCY]
    service = app.extensions[SERVICE]
    request = CreateJobRequest(content_types=service.settings.content_types).load(body)
    record = IdempotencyRecord(key_id_of(producer_name, key), fingerprint_of(request), new_job_id(), request,
                               utcnow())
    creates.records.put(record)
    if create_job:
        service.create(**request, job_id=record.job_id)
    os._exit(0)


@pytest.mark.files_only
@pytest.mark.parametrize("job_made", [False, True])
def test_a_create_that_died_after_taking_the_key_is_completed_by_the_retry(producer, instance_path, job_made):
    body = {"source_file_path": str(producer.source("talk.mp3")), "content_type": "audio",
            "ingestion_task_id": "ingest-1"}
    child = multiprocessing.get_context("fork").Process(
        target=_reserve_and_die, args=(str(instance_path), "req-1", body, job_made, "producer-key"))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert job_count(producer) == (1 if job_made else 0)
    retried = keyed(producer, "req-1")
    assert retried.status_code == (200 if job_made else 201)
    assert keyed(producer, "req-1").json["job_id"] == retried.json["job_id"]
    assert job_count(producer) == 1


# -- across processes --------------------------------------------------------------------------------

def _create_in_threads(instance_path: str, body: dict, barrier, results) -> None:
    """Child process: two threads race to create with one key, as two requests of a gunicorn worker."""
    app = create_app({"TESTING": True, "INSTANCE_PATH": instance_path, "LOG_JSON": True})
    creates = app.extensions[IDEMPOTENCY]
    request = CreateJobRequest(content_types=app.extensions[SERVICE].settings.content_types).load(body)

    def create() -> None:
        barrier.wait(60)
        job, created = creates.create("producer-key", "cross-process", request)
        results.put((job.id, created))

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


@pytest.mark.files_only
@pytest.mark.slow
def test_four_processes_of_two_threads_with_one_key_make_one_job(producer, instance_path):
    ctx = multiprocessing.get_context("fork")
    body = {"source_file_path": str(producer.source("talk.mp3")), "content_type": "audio",
            "ingestion_task_id": "ingest-1"}
    barrier, results = ctx.Barrier(8), ctx.Queue()
    children = [ctx.Process(target=_create_in_threads, args=(str(instance_path), body, barrier, results))
                for _ in range(4)]
    for child in children:
        child.start()
    answers = [results.get(timeout=60) for _ in range(8)]
    for child in children:
        child.join(60)
    assert len({job_id for job_id, _ in answers}) == 1
    assert sorted(created for _, created in answers) == [False] * 7 + [True]
    assert job_count(producer) == 1


# -- across gunicorn processes --------------------------------------------------------------------------

@pytest.fixture
def gunicorn(instance_path):
    """Two worker processes of four threads, each taking at most four connections: eight requests at
    once reach both processes."""
    with live_gunicorn.gunicorn(instance_path) as base:
        yield base


@pytest.mark.files_only
@pytest.mark.slow
def test_eight_threads_against_two_gunicorn_processes_with_one_key_make_one_job(gunicorn, app, keys, producer):
    producer.source("talk.mp3")
    body = {"source_file_path": str(producer.sources / "talk.mp3"), "content_type": "audio",
            "ingestion_task_id": "ingest-1"}
    headers = {"Authorization": f"Bearer {keys['producer']}", "Idempotency-Key": "gunicorn-8"}
    barrier = threading.Barrier(8)
    answers: list[tuple[int, str]] = []

    def create() -> None:
        barrier.wait(30)
        r = requests.post(f"{gunicorn}/api/v1/remote-jobs/", json=body, headers=headers, timeout=30)
        answers.append((r.status_code, r.json()["job_id"]))

    _run_together(create, 8)
    _assert_one_job_made(answers, 8)
    listed = requests.get(f"{gunicorn}/api/v1/remote-jobs/", headers=headers, timeout=10).json()["jobs"]
    assert [j["id"] for j in listed] == [answers[0][1]]
