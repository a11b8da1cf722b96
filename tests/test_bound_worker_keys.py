"""A worker key bound to a worker id polls only as that id (403 otherwise) and acts only on jobs
that id holds (409 otherwise), with or without a lease id or a download token; its own repeated
result (a success, or a failure that re-queued the job) answers as the first time."""
from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from support.actions import WorkerActions

LEASE = 1800


@pytest.fixture
def bound(client, keys) -> WorkerActions:
    return WorkerActions(client, keys["worker_bound"], "bound-worker")


@pytest.fixture
def held_by_other(producer, worker, service):
    """A job held by w1 (unbound key): (job id, w1's claim)."""
    job_id = producer.create_id("audio")
    claimed = worker.claim("audio")
    assert claimed["job_id"] == job_id
    return job_id, claimed


def test_bound_key_polls_as_its_own_worker_id(producer, bound):
    job_id = producer.create_id("audio")
    assert bound.claim("audio")["job_id"] == job_id


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_bound_key_polling_as_another_worker_id_is_403_and_claims_nothing(method, producer, client, bound, service):
    job_id = producer.create_id("audio")
    query = {"worker_id": "someone-else", "content_types": "audio"}
    if method == "GET":
        response = client.get("/api/v1/remote-jobs/poll", query_string=query, headers=bound.headers)
    else:
        response = client.post("/api/v1/remote-jobs/poll", json=query, headers=bound.headers)
    assert response.status_code == 403
    assert "bound-worker" in response.json["detail"]
    assert service.get(job_id).status == "pending"


def test_bound_key_heartbeat_on_a_job_another_worker_holds_is_409(held_by_other, bound, service):
    job_id, _ = held_by_other
    before = service.get(job_id)
    response = bound.heartbeat(job_id, progress=0.9)
    assert response.status_code == 409
    after = service.get(job_id)
    assert (after.timeout_at, after.progress, after.version) == (before.timeout_at, before.progress, before.version)


def test_bound_key_result_on_a_job_another_worker_holds_is_409(held_by_other, bound, service):
    job_id, _ = held_by_other
    response = bound.result(job_id, content="stolen")
    assert response.status_code == 409
    job = service.get(job_id)
    assert job.status == "processing"
    assert job.result_data is None


def test_bound_key_with_the_holders_lease_id_is_still_409(held_by_other, bound):
    job_id, claimed = held_by_other
    assert bound.heartbeat(job_id, lease_id=claimed["lease_id"]).status_code == 409
    assert bound.result(job_id, lease_id=claimed["lease_id"]).status_code == 409


def test_bound_key_download_of_a_job_another_worker_holds_is_409_even_with_its_url(held_by_other, bound, producer):
    _, claimed = held_by_other
    data = next(producer.sources.iterdir()).read_bytes()
    with_token = bound.download(claimed["source_file_url"])
    without = bound.download(urlsplit(claimed["source_file_url"]).path)
    assert (with_token.status_code, without.status_code) == (409, 409)
    assert data not in with_token.data
    assert data not in without.data


def test_bound_key_acts_on_the_job_it_holds_without_lease_id_or_token(producer, bound):
    job_id = producer.create_id("audio", name="mine.mp3")
    claimed = bound.claim("audio")
    assert bound.download(urlsplit(claimed["source_file_url"]).path).data == (producer.sources / "mine.mp3").read_bytes()
    assert bound.heartbeat(job_id, progress=0.5).status_code == 200
    assert bound.result(job_id).json["status"] == "completed"


def test_bound_key_loses_the_job_once_it_was_handed_to_another_worker(producer, bound, worker, clock, service):
    job_id = producer.create_id("audio")
    bound.claim("audio")
    clock.advance(LEASE + 1)
    assert worker.claim("audio")["job_id"] == job_id
    assert bound.heartbeat(job_id).status_code == 409
    assert bound.result(job_id).status_code == 409
    assert service.get(job_id).worker_id == "w1"


def test_bound_key_repeating_another_workers_identical_result_is_409(held_by_other, worker, bound, service):
    job_id, _ = held_by_other
    assert worker.result(job_id, content="w1's transcript").status_code == 200
    before = service.get(job_id)
    response = bound.result(job_id, content="w1's transcript")
    assert response.status_code == 409
    assert service.get(job_id).version == before.version


def test_bound_key_repeating_its_own_result_answers_as_the_first_time(producer, bound, service):
    job_id = producer.create_id("audio")
    bound.claim("audio")
    first = bound.result(job_id, content="mine")
    again = bound.result(job_id, content="mine")
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json["status"] == first.json["status"] == "completed"


def test_bound_worker_repeating_a_requeued_failure_gets_its_first_answer(producer, bound, service):
    """Found by the state machine: the re-queue cleared the job's worker id, so the shortcut for a
    repeated result no longer recognised the bound key that sent it, and its retried request got 409."""
    job_id = producer.create_id("audio", max_retries=2)
    bound.claim("audio")
    first = bound.result(job_id, success=False, error_message="GPU out of memory")
    before = service.get(job_id)
    again = bound.result(job_id, success=False, error_message="GPU out of memory")
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json == first.json == {"status": "pending", "ingestion_continued": False}
    assert service.get(job_id).version == before.version
