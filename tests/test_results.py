"""Results: a success completes the job; a failure re-queues with exponential backoff (kept as
``available_at``) or fails for good; the response's ``status`` says which; the same result sent
twice counts once (also from a bound worker key)."""
from __future__ import annotations

from datetime import timedelta

import pytest

from support.jobs import claimed_job
from morag_remote.exceptions import InvalidTransition
from morag_remote.models import RemoteJob, from_iso
from morag_remote.service import Caller

BASE, CAP = 10, 45


@pytest.fixture
def app_config():
    return {"RETRY_BACKOFF_SECONDS": BASE, "RETRY_BACKOFF_MAX_SECONDS": CAP, "MAX_RETRIES": 3}


class Recorder:
    """A terminal listener that remembers every job it was told about."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, str]] = []

    def job_finished(self, job: RemoteJob) -> bool:
        self.finished.append((job.id, job.status))
        return False

    def job_leaving_terminal(self, job: RemoteJob) -> None:
        pass

    def job_accepted(self, job: RemoteJob) -> bool:
        return False


# -- backoff ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, delay", [(1, 10), (2, 20), (3, 40), (4, 45), (9, 45)])
def test_backoff_doubles_from_the_base_up_to_the_cap(service, n, delay):
    service.rng = lambda: 0.0
    assert service.backoff(n) == delay


@pytest.mark.parametrize("n, delay", [(1, 10), (3, 40), (9, 45)])
def test_backoff_jitter_adds_at_most_ten_percent(service, n, delay):
    service.rng = lambda: 0.999999
    assert delay < service.backoff(n) < delay * 1.1


@pytest.mark.parametrize("app_config", [{}])  # the defaults: 30 s doubling up to an hour
def test_backoff_doubles_and_is_capped_with_at_most_ten_percent_jitter(service):
    service.rng = lambda: 0.0
    assert [service.backoff(n) for n in (1, 2, 3)] == [30, 60, 120]
    assert service.backoff(20) == 3600
    service.rng = lambda: 0.999
    assert 30 < service.backoff(1) < 33


def test_backoff_jitter_spreads_jobs_that_fail_together(service):
    delays = {service.backoff(1) for _ in range(50)}
    assert len(delays) > 1
    assert all(BASE <= d < BASE * 1.1 for d in delays)


# -- failure results --------------------------------------------------------------------------

def test_failure_with_retries_left_answers_pending_and_requeues(producer, worker, clock):
    job_id = producer.create_id("audio")
    worker.claim("audio")

    response = worker.result(job_id, success=False, error_message="CUDA out of memory")

    assert response.status_code == 200
    assert response.json == {"status": "pending", "ingestion_continued": False}
    job = producer.get(job_id).json
    assert job["status"] == "pending"
    assert job["retry_count"] == 1
    assert job["error_message"] == "CUDA out of memory"
    assert job["worker_id"] is None
    assert job["timeout_at"] is None


def test_failure_keeps_the_jittered_backoff_as_available_at(producer, worker, service, clock):
    service.rng = lambda: 0.5
    job_id = producer.create_id("audio")
    worker.claim("audio")
    worker.result(job_id, success=False, error_message="flaky")

    available_at = from_iso(producer.get(job_id).json["available_at"])

    assert available_at == clock.now + timedelta(seconds=BASE * 1.05)


def test_second_failure_waits_twice_as_long(service, clock):
    service.rng = lambda: 0.0
    job = claimed_job(service)
    service.submit_result(job.id, Caller(job.lease_id), success=False, error_message="first")
    clock.advance(BASE)
    again = service.poll("w1", ["audio"])[0]

    after = service.submit_result(job.id, Caller(again.lease_id), success=False, error_message="second").job

    assert after.retry_count == 2
    assert after.available_at == clock.now + timedelta(seconds=2 * BASE)


def test_delayed_job_is_not_claimable_before_available_at(service, clock):
    service.rng = lambda: 0.0
    job = claimed_job(service)
    service.submit_result(job.id, Caller(job.lease_id), success=False, error_message="flaky")

    clock.advance(BASE - 0.5)
    assert service.poll("w2", ["audio"]) == []
    clock.advance(0.5)
    assert [j.id for j in service.poll("w2", ["audio"])] == [job.id]


def test_delayed_job_does_not_hold_back_other_jobs(service, clock):
    delayed = claimed_job(service)
    service.submit_result(delayed.id, Caller(delayed.lease_id), success=False, error_message="flaky")
    other = claimed_job(service, "w2")
    assert other.id != delayed.id


def test_failure_with_retryable_false_fails_for_good(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim("audio")

    response = worker.result(job_id, success=False, error_message="not audio", retryable=False)

    assert response.json["status"] == "failed"
    job = producer.get(job_id).json
    assert job["status"] == "failed"
    assert job["retry_count"] == 0
    assert job["completed_at"] is not None
    assert job["error_message"] == "not audio"
    assert worker.poll("audio").json["job_id"] is None


def test_failure_with_no_retry_left_fails(service, clock):
    service.rng = lambda: 0.0
    job = claimed_job(service, max_retries=1)
    service.submit_result(job.id, Caller(job.lease_id), success=False, error_message="first")
    clock.advance(BASE)
    again = service.poll("w1", ["audio"])[0]

    outcome = service.submit_result(job.id, Caller(again.lease_id), success=False, error_message="second")

    assert outcome.job.status == "failed"
    assert outcome.job.retry_count == 1


def test_failure_of_a_job_with_max_retries_0_fails_at_once(producer, worker, service):
    job_id = producer.create_id("audio", max_retries=0)
    worker.claim("audio")
    response = worker.result(job_id, success=False)
    assert response.json["status"] == "failed"
    assert service.get(job_id).status == "failed"
    assert producer.get(job_id).json["error_message"] == "the worker reported a failure"


def test_seed_failure_body_without_message_still_records_a_reason(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    response = worker.client.put(f"/api/v1/remote-jobs/{job_id}/result", headers=worker.headers,
                                 json={"success": False})
    assert response.json["status"] == "pending"
    assert producer.get(job_id).json["error_message"] == "the worker reported a failure"


# -- idempotent re-submission -----------------------------------------------------------------

def test_identical_success_resubmission_answers_200_again(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    first = worker.result(job_id, content="hello")
    stored = producer.get(job_id).json

    second = worker.result(job_id, content="hello")

    assert second.status_code == 200
    assert second.json == first.json
    assert producer.get(job_id).json == stored  # same version, same completed_at


def test_identical_success_resubmission_completes_the_job_only_once(service):
    recorder = Recorder()
    service.hooks.listeners.append(recorder)
    job = claimed_job(service)
    first = service.submit_result(job.id, Caller(job.lease_id), success=True, content="hello")

    again = service.submit_result(job.id, Caller(job.lease_id), success=True, content="hello")

    assert again.repeated
    assert not first.repeated
    assert again.job.version == first.job.version
    assert recorder.finished == [(job.id, "completed")]


def test_identical_resubmission_from_a_seed_worker_without_lease_is_idempotent(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    body = {"success": True, "content": "text", "metadata": {"pages": 1}, "processing_time": 3.0}
    url = f"/api/v1/remote-jobs/{job_id}/result"
    assert worker.client.put(url, json=body, headers=worker.headers).status_code == 200
    assert worker.client.put(url, json=body, headers=worker.headers).json["status"] == "completed"


def test_identical_failure_resubmission_does_not_count_a_second_retry(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    worker.result(job_id, success=False, error_message="flaky")

    again = worker.result(job_id, success=False, error_message="flaky")

    assert again.status_code == 200
    assert again.json["status"] == "pending"
    assert producer.get(job_id).json["retry_count"] == 1


def test_a_failure_resent_after_the_producer_cancelled_the_requeued_job_is_409(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    assert worker.result(job_id, success=False, error_message="flaky").json["status"] == "pending"
    assert producer.cancel(job_id).status_code == 200

    again = worker.result(job_id, success=False, error_message="flaky")

    assert again.status_code == 409
    assert producer.get(job_id).json["status"] == "cancelled"


def test_resubmission_with_another_lease_is_not_taken_as_the_same(service):
    job = claimed_job(service)
    service.submit_result(job.id, Caller(job.lease_id), success=True, content="hello")

    with pytest.raises(InvalidTransition):
        service.submit_result(job.id, Caller("another-lease"), success=True, content="hello")
