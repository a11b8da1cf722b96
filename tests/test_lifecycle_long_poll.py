"""Long polls and the lifecycle's clocks: a worker waiting in a long poll gets a job as soon as its
backoff ends or its previous holder's lease lapses, with no cron job and no other request."""
from __future__ import annotations

import pytest

from support.jobs import claimed_job
from morag_remote.service import Caller

SHORT = 0.3  # seconds: short enough to pass within a long poll, long enough to be a real delay


@pytest.fixture
def app_config():
    return {"LEASE_SECONDS": {"default": SHORT}, "RETRY_BACKOFF_SECONDS": SHORT,
            "RETRY_BACKOFF_MAX_SECONDS": SHORT}


@pytest.mark.slow
def test_long_poll_returns_a_job_when_its_backoff_ends(service):
    job = claimed_job(service)
    failed = service.submit_result(job.id, Caller(job.lease_id), success=False, error_message="flaky").job
    assert failed.status == "pending" and failed.available_at > failed.updated_at

    got = service.poll("w2", ["audio"], wait=10)

    assert [j.id for j in got] == [job.id]
    assert got[0].retry_count == 1 and service.clock() >= failed.available_at


@pytest.mark.slow
def test_long_poll_returns_a_job_whose_lease_lapses_while_it_waits(producer, worker, worker2):
    job_id = producer.create_id("audio")
    first = worker.claim("audio")

    body = worker2.poll("audio", wait=10).json

    assert body["job_id"] == job_id
    assert body["jobs"][0]["retry_count"] == 1 and body["jobs"][0]["lease_id"] != first["lease_id"]


def test_long_poll_with_nothing_to_claim_returns_nothing_when_the_wait_ends(service):
    assert service.poll("w1", ["audio"], wait=0.2) == []
