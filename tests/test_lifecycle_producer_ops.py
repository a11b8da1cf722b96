"""What producers and operators do to jobs: cancel, retry, delete, stats, and the status view's
``estimated_completion``."""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from support.actions import auth
from support.jobs import claimed_job, directories_of, new_job
from morag_remote.models import from_iso
from morag_remote.service import DEFAULT_DURATION, DEFAULT_DURATIONS, Caller

UNKNOWN = "0190a0a0-0000-7000-8000-000000000000"


# -- cancel -----------------------------------------------------------------------------------

def test_cancelled_job_is_not_handed_to_workers(producer, worker):
    job_id = producer.create_id("audio")
    producer.cancel(job_id)
    assert worker.poll("audio").json["job_id"] is None


def test_cancel_records_when_and_drops_the_lease(producer, worker, clock):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    body = producer.cancel(job_id).json
    assert from_iso(body["completed_at"]) == clock.now
    assert body["timeout_at"] is None


def test_cancelled_job_lease_no_longer_opens_the_source(producer, worker):
    job_id = producer.create_id("audio")
    claimed = worker.claim("audio")
    producer.cancel(job_id)
    assert worker.download(claimed["source_file_url"]).status_code == 409


# -- retry ------------------------------------------------------------------------------------

def test_retry_of_failed_job_clears_the_outcome_and_makes_it_claimable_now(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    worker.result(job_id, success=False, error_message="bad input", retryable=False)

    body = producer.retry(job_id).json

    assert body["status"] == "pending"
    assert body["error_message"] is None and body["completed_at"] is None and body["worker_id"] is None
    again = worker.claim("audio")
    assert again["job_id"] == job_id


def test_retry_of_job_with_retries_exhausted_grants_one_more_attempt(service, clock):
    job = claimed_job(service, max_retries=0)
    clock.advance(service.settings.lease_for("audio") + 1)
    service.expire_due()
    assert service.get(job.id).status == "timeout"

    reopened = service.retry(job.id)

    assert reopened.max_retries == reopened.retry_count + 1
    again = service.poll("w2", ["audio"])[0]
    clock.advance(service.settings.lease_for("audio") + 1)
    service.expire_due()
    assert service.get(again.id).status == "pending"


def test_retry_gives_the_next_claim_a_new_lease(service):
    job = claimed_job(service)
    service.cancel(job.id)
    service.retry(job.id)
    again = service.poll("w2", ["audio"])[0]
    assert again.lease_id != job.lease_id and again.attempt == job.attempt + 1


# -- delete -----------------------------------------------------------------------------------

@pytest.mark.files_only
def test_delete_by_admin_answers_204_and_removes_the_file(producer, admin_headers, service):
    job_id = producer.create_id("audio")
    response = producer.client.delete(f"/api/v1/remote-jobs/{job_id}", headers=admin_headers)
    assert response.status_code == 204 and response.data == b""
    assert producer.get(job_id).status_code == 404
    assert directories_of(Path(service.store.root), job_id) == []


def test_delete_by_producer_is_403_and_keeps_the_job(producer):
    job_id = producer.create_id("audio")
    response = producer.client.delete(f"/api/v1/remote-jobs/{job_id}", headers=producer.headers)
    assert response.status_code == 403
    assert producer.get(job_id).status_code == 200


def test_delete_of_unknown_job_is_404(client, admin_headers):
    response = client.delete(f"/api/v1/remote-jobs/{UNKNOWN}", headers=admin_headers)
    assert response.status_code == 404 and response.mimetype == "application/problem+json"


def test_deleted_processing_job_answers_its_worker_404(producer, worker, admin_headers):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    producer.client.delete(f"/api/v1/remote-jobs/{job_id}", headers=admin_headers)
    assert worker.result(job_id).status_code == 404


# -- stats ------------------------------------------------------------------------------------

def _stats(client, key):
    response = client.get("/api/v1/remote-jobs/stats", headers=auth(key))
    assert response.status_code == 200, response.json
    return response.json


def test_stats_count_jobs_by_status_and_content_type(client, keys, service):
    new_job(service, "audio")
    new_job(service, "audio")
    new_job(service, "video")
    claimed_job(service, "w1", "document")
    service.cancel(new_job(service, "video").id)

    body = _stats(client, keys["worker"])

    assert body["counts"]["pending"] == {"audio": 2, "video": 1}
    assert body["counts"]["processing"] == {"document": 1}
    assert body["counts"]["cancelled"] == {"video": 1}
    assert body["counts"]["completed"] == {}
    assert body["totals"] == {"pending": 3, "processing": 1, "completed": 0, "failed": 0,
                              "timeout": 0, "cancelled": 1}


def test_stats_age_of_the_oldest_pending_job(client, keys, service, clock):
    new_job(service)
    clock.advance(40)
    new_job(service)
    clock.advance(2)
    assert _stats(client, keys["producer"])["oldest_pending_age_seconds"] == 42.0


def test_stats_without_pending_jobs_has_no_oldest_age(client, keys):
    assert _stats(client, keys["producer"])["oldest_pending_age_seconds"] is None


def test_stats_lists_workers_seen_within_the_lease_period(client, keys, service, clock):
    old = claimed_job(service, "gpu-old")
    service.submit_result(old.id, Caller(old.lease_id), success=True, content="done")
    clock.advance(max(service.settings.lease_seconds.values()) + 10)
    claimed_job(service, "gpu-new")
    assert _stats(client, keys["admin"])["active_workers"] == ["gpu-new"]


def test_stats_counts_a_heartbeat_as_seeing_the_worker(client, keys, service, clock):
    job = claimed_job(service, "gpu-1")
    window = max(service.settings.lease_seconds.values())
    clock.advance(window - 10)
    service.heartbeat(job.id, Caller(job.lease_id))
    clock.advance(20)
    assert _stats(client, keys["admin"])["active_workers"] == ["gpu-1"]


# -- estimated completion ---------------------------------------------------------------------

@pytest.mark.parametrize("content_type", ["audio", "video", "document"])
def test_estimated_completion_uses_the_seed_constants_without_history(producer, worker, content_type):
    job_id = producer.create_id(content_type)
    worker.claim(content_type)
    status = producer.status(job_id).json
    expected = DEFAULT_DURATIONS.get(content_type, DEFAULT_DURATION)
    assert from_iso(status["estimated_completion"]) == from_iso(status["started_at"]) + timedelta(seconds=expected)


def _complete_after(service, clock, seconds: float, content_type: str = "audio") -> None:
    job = claimed_job(service, content_type=content_type)
    clock.advance(seconds)
    service.submit_result(job.id, Caller(job.lease_id), success=True, content="ok")


def test_estimated_completion_is_the_median_of_observed_durations(producer, worker, service, clock):
    for seconds in (10, 20, 600):
        _complete_after(service, clock, seconds)
    job_id = producer.create_id("audio")
    worker.claim("audio")

    status = producer.status(job_id).json

    assert from_iso(status["estimated_completion"]) == clock.now + timedelta(seconds=20)


def test_estimated_completion_history_is_per_content_type(service, clock):
    _complete_after(service, clock, 10, "video")
    job = claimed_job(service, content_type="audio")
    assert service.estimates.estimated_completion(job) == job.started_at + timedelta(seconds=DEFAULT_DURATIONS["audio"])


def test_estimated_completion_samples_the_most_recent_completions(service, clock):
    service.estimates.duration_sample = 3
    for seconds in (500, 500, 500, 7, 8, 9):
        _complete_after(service, clock, seconds)
    assert service.estimates.typical_duration("audio") == 8


def test_estimated_completion_follows_a_new_completion_at_once(service, clock):
    assert service.estimates.typical_duration("audio") == DEFAULT_DURATIONS["audio"]
    _complete_after(service, clock, 42)
    assert service.estimates.typical_duration("audio") == 42


def test_estimated_completion_is_null_unless_processing(producer, worker):
    pending = producer.create_id("audio")
    assert producer.status(pending).json["estimated_completion"] is None
    worker.claim("audio")
    worker.result(pending)
    assert producer.status(pending).json["estimated_completion"] is None
