"""Leases: a claim grants one (its length per content type), a heartbeat extends it and records
progress, a lapsed one re-queues the job (or times it out), lazily on poll or through
``cleanup-expired``, a worker that lost its lease is fenced off, and the optional pending TTL."""
from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest

from support.actions import WorkerActions
from support.jobs import claimed_job, new_job
from morag_remote.exceptions import InvalidTransition
from morag_remote.models import from_iso
from morag_remote.service import Caller

LEASES = {"audio": 1, "video": 5, "default": 3}


@pytest.fixture
def app_config():
    return {"LEASE_SECONDS": LEASES}


@pytest.fixture
def bound_worker(client, keys) -> WorkerActions:
    """A worker whose key is bound to its worker id (``bound-worker``)."""
    return WorkerActions(client, keys["worker_bound"], "bound-worker")


def _problem(response, status: int = 409) -> dict:
    assert response.status_code == status, response.json
    assert response.mimetype == "application/problem+json"
    return response.json


# -- the scenario: a 1-second lease, no heartbeat ----------------------------------------

def test_one_second_lease_without_heartbeat_goes_to_the_next_worker_and_fences_the_first(
        producer, worker, worker2, clock):
    job_id = producer.create_id("audio")
    first = worker.claim("audio")
    clock.advance(1.5)  # no heartbeat

    second = worker2.claim("audio")
    assert second["job_id"] == job_id
    assert second["retry_count"] == 1
    assert second["lease_id"] != first["lease_id"]

    late = _problem(worker.result(job_id, lease_id=first["lease_id"], content="stale"))
    assert late["title"] == "Lease not held"
    assert first["lease_id"] in late["detail"]

    done = worker2.result(job_id, lease_id=second["lease_id"], content="fresh")
    assert done.status_code == 200
    assert done.json["status"] == "completed"
    job = producer.get(job_id).json
    assert job["result_data"]["content"] == "fresh"
    assert job["worker_id"] == "w2"
    assert job["retry_count"] == 1
    assert job["attempt"] == 2


@pytest.mark.slow
def test_one_second_lease_in_real_time_returns_the_job_to_the_queue(producer, worker, worker2):
    job_id = producer.create_id("audio")
    first = worker.claim("audio")
    deadline = time.monotonic() + 15
    second = None
    while second is None and time.monotonic() < deadline:
        body = worker2.poll("audio").json
        if body["job_id"]:
            second = body["jobs"][0]
        else:
            time.sleep(0.05)
    assert second is not None, "the lapsed job never came back"
    assert second["job_id"] == job_id
    assert second["retry_count"] == 1
    assert worker.result(job_id, lease_id=first["lease_id"]).status_code == 409
    assert worker2.result(job_id, lease_id=second["lease_id"]).json["status"] == "completed"


def test_lapsed_lease_puts_the_job_back_pending_with_retry_count_1(producer, worker, service, clock):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    clock.advance(1.5)

    assert service.expire_due() == 1

    status = producer.status(job_id).json
    assert status["status"] == "pending"
    assert status["retry_count"] == 1
    assert status["worker_id"] is None
    assert status["timeout_at"] is None


def test_late_result_with_a_key_bound_to_the_first_worker_is_409(producer, bound_worker, worker2, clock):
    job_id = producer.create_id("audio")
    bound_worker.claim("audio")
    clock.advance(1.5)
    second = worker2.claim("audio")

    late = _problem(bound_worker.result(job_id))  # no lease id: the key says who it is

    assert "bound-worker" in late["detail"]
    assert worker2.result(job_id, lease_id=second["lease_id"]).json["status"] == "completed"


def test_late_result_with_stale_lease_in_header_is_409(producer, worker, worker2, clock):
    job_id = producer.create_id("audio")
    first = worker.claim("audio")
    clock.advance(1.5)
    worker2.claim("audio")
    response = worker.client.put(f"/api/v1/remote-jobs/{job_id}/result", json={"success": True, "content": "x"},
                                 headers={**worker.headers, "X-Lease-Id": first["lease_id"]})
    _problem(response)
    assert producer.status(job_id).json["status"] == "processing"


def test_seed_worker_late_result_after_reassignment_wins_when_it_arrives_first(producer, worker, worker2, clock):
    """The contract: a shared key and no lease id cannot be told apart from the new holder, so the
    first result for the current attempt wins; the new holder's own result then gets 409."""
    job_id = producer.create_id("audio")
    worker.claim("audio")
    clock.advance(1.5)
    second = worker2.claim("audio")

    seed_style = worker.client.put(f"/api/v1/remote-jobs/{job_id}/result", headers=worker.headers,
                                   json={"success": True, "content": "from the first worker", "metadata": {},
                                         "processing_time": 90.0})
    assert seed_style.status_code == 200
    assert seed_style.json["status"] == "completed"

    current = _problem(worker2.result(job_id, lease_id=second["lease_id"], content="from the second"))
    assert current["detail"] == "cannot complete a job that is completed"
    assert producer.get(job_id).json["result_data"]["content"] == "from the first worker"


def test_seed_worker_late_result_after_the_new_holder_finished_is_409(producer, worker, worker2, clock):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    clock.advance(1.5)
    second = worker2.claim("audio")
    worker2.result(job_id, lease_id=second["lease_id"], content="from the second")

    late = worker.client.put(f"/api/v1/remote-jobs/{job_id}/result", headers=worker.headers,
                             json={"success": True, "content": "from the first worker"})

    _problem(late)
    assert producer.get(job_id).json["result_data"]["content"] == "from the second"


def test_stale_download_token_is_refused_after_reassignment(producer, worker, worker2, clock):
    producer.create_id("audio")
    first = worker.claim("audio")
    clock.advance(1.5)
    worker2.claim("audio")
    assert worker.download(first["source_file_url"]).status_code == 409


def test_lease_length_is_per_content_type(producer, worker, clock):
    producer.create_id("video")
    claimed = worker.claim("video")
    assert from_iso(claimed["timeout_at"]) == clock.now + timedelta(seconds=LEASES["video"])


def test_lease_length_falls_back_to_default_for_other_types(producer, worker, clock):
    producer.create_id("document")
    claimed = worker.claim("document")
    assert from_iso(claimed["timeout_at"]) == clock.now + timedelta(seconds=LEASES["default"])


# -- heartbeats -------------------------------------------------------------------------------

def test_heartbeat_extends_the_lease_from_now(producer, worker, clock):
    job_id = producer.create_id("audio")
    claimed = worker.claim("audio")
    clock.advance(0.8)
    response = worker.heartbeat(job_id, lease_id=claimed["lease_id"])
    assert response.status_code == 200
    assert from_iso(response.json["timeout_at"]) == clock.now + timedelta(seconds=1)


def test_heartbeat_keeps_the_job_past_its_first_lease(producer, worker, worker2, clock):
    job_id = producer.create_id("audio")
    claimed = worker.claim("audio")
    for _ in range(4):
        clock.advance(0.8)
        assert worker.heartbeat(job_id, lease_id=claimed["lease_id"]).status_code == 200
        assert worker2.poll("audio").json["job_id"] is None
    assert producer.status(job_id).json["worker_id"] == "w1"


def test_heartbeat_progress_and_message_are_shown_by_status(producer, worker, clock):
    job_id = producer.create_id("audio")
    claimed = worker.claim("audio")
    clock.advance(0.6)
    response = worker.heartbeat(job_id, lease_id=claimed["lease_id"], progress=0.42, message="diarizing")
    assert response.status_code == 200
    assert from_iso(response.json["timeout_at"]) == clock.now + timedelta(seconds=LEASES["audio"])
    assert response.json["progress"] == 0.42
    status = producer.status(job_id).json
    assert status["progress"] == 0.42
    assert status["progress_message"] == "diarizing"


def test_heartbeat_without_body_is_accepted_from_the_holder(producer, worker):
    """The body is optional: a worker may send a bare POST to keep its lease."""
    job_id = producer.create_id("audio")
    worker.claim("audio")
    response = worker.client.post(f"/api/v1/remote-jobs/{job_id}/heartbeat", headers=worker.headers)
    assert response.status_code == 200
    assert response.json["status"] == "processing"


@pytest.mark.parametrize("progress", [-0.1, 1.5, "half"])
def test_heartbeat_with_progress_outside_0_1_is_422(producer, worker, progress):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    body = _problem(worker.heartbeat(job_id, progress=progress), 422)
    assert "progress" in body["errors"]


def test_heartbeat_with_a_stale_lease_id_is_409(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    assert worker.heartbeat(job_id, lease_id="not-the-lease").status_code == 409


def test_heartbeat_with_lost_lease_is_409_and_changes_nothing(producer, worker, worker2, clock):
    job_id = producer.create_id("audio")
    first = worker.claim("audio")
    clock.advance(1.5)
    worker2.claim("audio")
    before = producer.get(job_id).json

    body = _problem(worker.heartbeat(job_id, lease_id=first["lease_id"], progress=0.9))

    assert body["title"] == "Lease not held"
    assert producer.get(job_id).json == before


def test_heartbeat_from_a_key_bound_to_another_worker_is_409(producer, worker, bound_worker):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    body = _problem(bound_worker.heartbeat(job_id))
    assert "bound-worker" in body["detail"]


def test_heartbeat_after_requeue_is_409(producer, worker, service, clock):
    job_id = producer.create_id("audio")
    claimed = worker.claim("audio")
    clock.advance(1.5)
    service.expire_due()
    body = _problem(worker.heartbeat(job_id, lease_id=claimed["lease_id"]))
    assert body["detail"] == "cannot heartbeat a job that is pending"


def test_heartbeat_after_lapse_but_before_anyone_requeued_it_revives_the_lease(producer, worker, clock):
    """Lapses are applied by polls and the CLI: until one runs, no newer attempt exists, so the
    holder's heartbeat (like its result) is still accepted and the lease runs from now."""
    job_id = producer.create_id("audio")
    claimed = worker.claim("audio")
    clock.advance(1.5)
    response = worker.heartbeat(job_id, lease_id=claimed["lease_id"])
    assert response.status_code == 200
    assert from_iso(response.json["timeout_at"]) == clock.now + timedelta(seconds=1)


def test_result_after_lapse_but_before_anyone_requeued_it_is_accepted(producer, worker, clock):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    clock.advance(3600)
    response = worker.result(job_id, True)
    assert response.status_code == 200
    assert response.json["status"] == "completed"
    assert worker.poll("audio").json["job_id"] is None  # nothing was re-queued behind the result


# -- lapses: lazily on poll, bounded; and the CLI -------------------------------------------------

@pytest.mark.parametrize("app_config", [{"LEASE_SECONDS": LEASES, "LAPSED_PER_POLL": 2}])
def test_each_poll_requeues_at_most_lapsed_per_poll_leases(service, clock):
    ids = [claimed_job(service, f"w{i}").id for i in range(5)]
    clock.advance(1.5)

    assert service.poll("idle", ["document"]) == []  # a poll for another type still does the work

    statuses = [service.get(job_id).status for job_id in ids]
    assert statuses.count("pending") == 2
    assert statuses.count("processing") == 3
    service.poll("idle", ["document"])
    service.poll("idle", ["document"])
    assert all(service.get(job_id).status == "pending" for job_id in ids)


def test_poll_claims_a_job_whose_lease_lapsed_in_the_same_call(service, clock):
    job = claimed_job(service, "w1")
    clock.advance(1.5)
    got = service.poll("w2", ["audio"])
    assert [j.id for j in got] == [job.id]
    assert got[0].retry_count == 1
    assert got[0].worker_id == "w2"


def test_cleanup_expired_requeues_every_lapsed_lease_and_prints_the_count(service, clock, runner):
    ids = [claimed_job(service, f"w{i}").id for i in range(3)]
    clock.advance(1.5)

    result = runner.invoke(args=["remote-jobs", "cleanup-expired"])

    assert result.exit_code == 0, result.stdout
    assert result.stdout.strip() == "3 job(s) handled"
    assert {service.get(job_id).status for job_id in ids} == {"pending"}


def test_cleanup_expired_json_output_counts_nothing_when_no_lease_lapsed(service, clock, runner):
    claimed_job(service)
    clock.advance(0.5)
    result = runner.invoke(args=["remote-jobs", "cleanup-expired", "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"expired": 0}


def test_lapse_with_no_retry_left_times_the_job_out(service, clock):
    job = claimed_job(service, max_retries=1)
    clock.advance(1.5)
    service.expire_due()
    again = service.poll("w2", ["audio"])[0]
    clock.advance(1.5)

    assert service.expire_due() == 1

    final = service.get(job.id)
    assert again.retry_count == 1
    assert final.status == "timeout"
    assert final.retry_count == 1
    assert final.completed_at == clock.now
    assert final.lease_id is None
    assert "no retry left" in final.error_message
    assert service.poll("w3", ["audio"]) == []


def test_timed_out_job_answers_the_old_holder_409(service, clock):
    job = claimed_job(service, max_retries=0)
    clock.advance(1.5)
    service.expire_due()

    with pytest.raises(InvalidTransition):
        service.submit_result(job.id, Caller(job.lease_id), success=True, content="too late")


def test_lease_not_yet_lapsed_is_left_alone(service, clock):
    job = claimed_job(service)
    clock.advance(0.9)
    assert service.expire_due() == 0
    assert service.get(job.id).status == "processing"


# -- the optional pending TTL -----------------------------------------------------------------

TTL = {"LEASE_SECONDS": LEASES, "PENDING_TTL_SECONDS": 10}


def test_pending_job_has_no_queue_deadline_by_default(service, clock):
    job = new_job(service)
    clock.advance(30 * 24 * 3600)
    assert service.expire_due() == 0
    assert [j.id for j in service.poll("w1", ["audio"])] == [job.id]


@pytest.mark.parametrize("app_config", [TTL])
def test_pending_job_past_the_ttl_times_out(service, clock):
    job = new_job(service)
    clock.advance(10.5)

    assert service.expire_due() == 1

    expired = service.get(job.id)
    assert expired.status == "timeout"
    assert expired.error_message == "no worker took the job within 10 s"
    assert service.poll("w1", ["audio"]) == []


@pytest.mark.parametrize("app_config", [TTL])
def test_pending_job_within_the_ttl_stays(service, clock):
    job = new_job(service)
    clock.advance(9.5)
    assert service.expire_due() == 0
    assert service.get(job.id).status == "pending"


@pytest.mark.parametrize("app_config", [TTL])
def test_pending_ttl_is_applied_lazily_by_poll(service, clock):
    job = new_job(service, "video")
    clock.advance(10.5)
    service.poll("w1", ["audio"])
    assert service.get(job.id).status == "timeout"


@pytest.mark.parametrize("app_config", [TTL])
def test_pending_ttl_counts_from_the_requeue_not_from_creation(service, clock):
    job = new_job(service)
    clock.advance(8)
    service.poll("w1", ["audio"])
    for _ in range(5):  # the worker runs for 4 s past the TTL measured from creation
        clock.advance(0.8)
        service.heartbeat(job.id, Caller())
    clock.advance(1.5)
    service.expire_due()  # the lease lapses: back to the queue
    clock.advance(5)

    assert service.expire_due() == 0
    assert service.get(job.id).status == "pending"
    clock.advance(5.5)
    assert service.expire_due() == 1


@pytest.mark.parametrize("app_config", [TTL])
def test_retry_of_a_ttl_expired_job_gets_a_fresh_ttl(service, clock):
    job = new_job(service)
    clock.advance(10.5)
    service.expire_due()
    service.retry(job.id)

    assert service.expire_due() == 0
    assert [j.id for j in service.poll("w1", ["audio"])] == [job.id]



@pytest.mark.parametrize("app_config", [{**TTL, "RETRY_BACKOFF_SECONDS": 30}])
def test_pending_ttl_starts_when_a_backoff_ends(service, clock):
    service.rng = lambda: 0.0
    job = claimed_job(service)
    service.submit_result(job.id, Caller(job.lease_id), success=False, error_message="flaky")

    clock.advance(30 + 9.5)
    assert service.expire_due() == 0
    clock.advance(1)
    assert service.expire_due() == 1
    assert service.get(job.id).status == "timeout"
