"""The lifecycle endpoints as the foundation ships them, checked through the API: heartbeat, lapsed
leases, retry backoff, cancel, retry, delete, stats, estimated completion and long polls.
(The lifecycle issue tests every transition of the table; these pin the contract's basics.)"""
from __future__ import annotations

import dataclasses
import threading
from datetime import datetime, timedelta

import pytest

from support.actions import auth

BASE = "/api/v1/remote-jobs"


@pytest.fixture
def no_jitter(service):
    service.rng = lambda: 0.0


# -- heartbeat ---------------------------------------------------------------------------------


def test_heartbeat_extends_the_lease_and_records_progress(producer, worker, clock):
    job_id = producer.create_id("audio")
    lease = worker.claim()["lease_id"]
    clock.advance(600)
    response = worker.heartbeat(job_id, lease_id=lease, progress=0.4, message="decoding")
    assert response.status_code == 200
    assert datetime.fromisoformat(response.json["timeout_at"]) == clock.now + timedelta(seconds=1800)
    status = producer.status(job_id).json
    assert (status["progress"], status["progress_message"]) == (0.4, "decoding")


def test_heartbeat_with_an_empty_body_is_accepted(producer, worker, client):
    job_id = producer.create_id("audio")
    worker.claim()
    response = client.post(f"{BASE}/{job_id}/heartbeat", headers=worker.headers)
    assert response.status_code == 200


def test_heartbeat_with_a_stale_lease_id_is_409(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim()
    assert worker.heartbeat(job_id, lease_id="not-the-lease").status_code == 409


def test_heartbeat_on_a_cancelled_job_is_409(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim()
    producer.cancel(job_id)
    response = worker.heartbeat(job_id)
    assert response.status_code == 409 and "cancelled" in response.json["detail"]


def test_heartbeat_progress_outside_0_1_is_422(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim()
    assert worker.heartbeat(job_id, progress=1.5).status_code == 422


# -- lapsed leases -----------------------------------------------------------------------------


def test_a_lapsed_lease_requeues_with_retry_count_and_fences_the_old_worker(producer, worker, worker2, clock):
    job_id = producer.create_id("audio")
    first = worker.claim("audio")
    clock.advance(1801)
    second = worker2.poll("audio").json["jobs"][0]
    assert (second["job_id"], second["retry_count"]) == (job_id, 1)
    assert second["lease_id"] != first["lease_id"]
    late = worker.result(job_id, lease_id=first["lease_id"])
    assert late.status_code == 409
    assert worker.download(first["source_file_url"]).status_code == 409
    assert worker2.result(job_id, lease_id=second["lease_id"]).json["status"] == "completed"


def test_a_lapsed_lease_without_retries_left_times_out(producer, worker, clock, service):
    job_id = producer.create_id("audio", max_retries=0)
    worker.claim("audio")
    clock.advance(1801)
    assert service.expire_due() == 1
    job = producer.get(job_id).json
    assert job["status"] == "timeout" and "no retry left" in job["error_message"]


def test_pending_jobs_past_the_ttl_time_out(producer, service, clock):
    service.settings = dataclasses.replace(service.settings, pending_ttl_seconds=60)
    old = producer.create_id("audio")
    clock.advance(61)
    young = producer.create_id("audio")
    assert service.expire_due() == 1
    assert producer.get(old).json["status"] == "timeout"
    assert producer.get(young).json["status"] == "pending"


# -- failures and backoff ----------------------------------------------------------------------


def test_a_failure_requeues_after_the_backoff_delay(producer, worker, clock, no_jitter):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    assert worker.result(job_id, success=False, error_message="oom").json["status"] == "pending"
    assert worker.poll("audio").json["job_id"] is None
    clock.advance(29)
    assert worker.poll("audio").json["job_id"] is None
    clock.advance(2)
    assert worker.poll("audio").json["job_id"] == job_id


def test_backoff_doubles_and_is_capped_with_at_most_ten_percent_jitter(service):
    service.rng = lambda: 0.0
    assert [service.backoff(n) for n in (1, 2, 3)] == [30, 60, 120]
    assert service.backoff(20) == 3600
    service.rng = lambda: 0.999
    assert 30 < service.backoff(1) < 33


def test_a_failure_with_no_retry_left_fails_the_job(producer, worker):
    job_id = producer.create_id("audio", max_retries=0)
    worker.claim("audio")
    response = worker.result(job_id, success=False)
    assert response.json["status"] == "failed"
    assert producer.get(job_id).json["error_message"] == "the worker reported a failure"


# -- cancel, retry, delete ---------------------------------------------------------------------


def test_cancel_a_pending_job_then_a_second_cancel_is_409(producer):
    job_id = producer.create_id()
    response = producer.cancel(job_id)
    assert response.status_code == 200 and response.json["status"] == "cancelled"
    again = producer.cancel(job_id)
    assert again.status_code == 409 and again.content_type == "application/problem+json"


def test_a_cancelled_job_is_not_claimed(producer, worker):
    producer.cancel(producer.create_id("audio"))
    assert worker.poll("audio").json["job_id"] is None


def test_retry_reopens_a_failed_job_and_a_pending_one_is_409(producer, worker):
    job_id = producer.create_id("audio", max_retries=0)
    assert producer.retry(job_id).status_code == 409
    worker.claim("audio")
    worker.result(job_id, success=False, retryable=False)
    response = producer.retry(job_id)
    assert response.status_code == 200 and response.json["status"] == "pending"
    assert response.json["max_retries"] == 1 and response.json["error_message"] is None
    assert worker.poll("audio").json["job_id"] == job_id


def test_delete_needs_admin_and_removes_the_job(producer, client, admin_headers, app):
    job_id = producer.create_id()
    assert client.delete(f"{BASE}/{job_id}", headers=producer.headers).status_code == 403
    response = client.delete(f"{BASE}/{job_id}", headers=admin_headers)
    assert response.status_code == 204 and response.data == b""
    assert producer.get(job_id).status_code == 404
    assert client.delete(f"{BASE}/{job_id}", headers=admin_headers).status_code == 404


# -- stats and estimated completion ------------------------------------------------------------


def test_stats_count_jobs_by_status_and_type(producer, worker, client, keys, clock):
    producer.create_id("audio")
    clock.advance(10)
    producer.create_id("video")
    producer.create_id("document")
    worker.poll("video")
    body = client.get(f"{BASE}/stats", headers=auth(keys["worker"])).json
    assert body["counts"]["pending"] == {"audio": 1, "document": 1}
    assert body["counts"]["processing"] == {"video": 1}
    assert body["totals"]["pending"] == 2 and body["totals"]["completed"] == 0
    assert body["oldest_pending_age_seconds"] == 10
    assert body["active_workers"] == ["w1"]


def test_estimated_completion_uses_the_median_of_observed_durations(producer, worker, clock, service):
    for seconds in (100, 200, 900):
        job_id = producer.create_id("audio")
        worker.claim("audio")
        clock.advance(seconds)
        worker.result(job_id)
    job_id = producer.create_id("audio")
    claimed_at = clock.now
    worker.claim("audio")
    estimate = producer.status(job_id).json["estimated_completion"]
    assert datetime.fromisoformat(estimate) == claimed_at + timedelta(seconds=200)


def test_estimated_completion_without_history_uses_the_seed_guess(producer, worker, clock):
    job_id = producer.create_id("video")
    worker.claim("video")
    estimate = producer.status(job_id).json["estimated_completion"]
    assert datetime.fromisoformat(estimate) == clock.now + timedelta(seconds=900)


def test_a_pending_job_has_no_estimated_completion(producer):
    assert producer.status(producer.create_id()).json["estimated_completion"] is None
