"""What producers and operators do to jobs through the API: cancel, retry, delete and stats.
(The status view's ``estimated_completion``: test_estimates.py.)"""
from __future__ import annotations

from pathlib import Path

from support.actions import auth
from support.jobs import claimed_job, directories_of, new_job
from morag_remote.models import from_iso
from morag_remote.service import Caller

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
    job_id = producer.create_id("audio", max_retries=0)
    assert producer.retry(job_id).status_code == 409  # a pending job has nothing to retry
    worker.claim("audio")
    worker.result(job_id, success=False, error_message="bad input", retryable=False)

    response = producer.retry(job_id)
    body = response.json

    assert response.status_code == 200
    assert body["status"] == "pending"
    assert body["max_retries"] == 1  # one more attempt than the job had
    assert body["error_message"] is None
    assert body["completed_at"] is None
    assert body["worker_id"] is None
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
    assert again.lease_id != job.lease_id
    assert again.attempt == job.attempt + 1


# -- delete -----------------------------------------------------------------------------------

def test_delete_by_admin_answers_204_and_removes_the_file(producer, admin_headers, service, backend):
    job_id = producer.create_id("audio")
    response = producer.client.delete(f"/api/v1/remote-jobs/{job_id}", headers=admin_headers)
    assert response.status_code == 204
    assert response.data == b""
    assert producer.get(job_id).status_code == 404
    if backend == "files":
        assert directories_of(Path(service.store.root), job_id) == []
    assert producer.client.delete(f"/api/v1/remote-jobs/{job_id}", headers=admin_headers).status_code == 404


def test_delete_by_producer_is_403_and_keeps_the_job(producer):
    job_id = producer.create_id("audio")
    response = producer.client.delete(f"/api/v1/remote-jobs/{job_id}", headers=producer.headers)
    assert response.status_code == 403
    assert producer.get(job_id).status_code == 200


def test_delete_of_unknown_job_is_404(client, admin_headers):
    response = client.delete(f"/api/v1/remote-jobs/{UNKNOWN}", headers=admin_headers)
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"


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
                              "timeout": 0, "cancelled": 1, "held": 0}


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
