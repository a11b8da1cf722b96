"""``estimated_completion``: a processing job's start plus the median duration of the most recent
completed jobs of its type (read from the store, the same answer on both backends), the seed's
constant for a type without history, and null unless the job is processing."""
from __future__ import annotations

from datetime import timedelta

import pytest

from support.jobs import claimed_job
from morag_remote.models import from_iso
from morag_remote.service import DEFAULT_DURATION, DEFAULT_DURATIONS, Caller


@pytest.mark.parametrize("content_type", ["audio", "video", "document"])
def test_estimated_completion_uses_the_seed_constants_without_history(producer, worker, service, content_type):
    job_id = producer.create_id(content_type)
    worker.claim(content_type)
    status = producer.status(job_id).json
    expected = DEFAULT_DURATIONS.get(content_type, DEFAULT_DURATION)
    assert from_iso(status["estimated_completion"]) == from_iso(status["started_at"]) + timedelta(seconds=expected)
    running = service.get(job_id)  # the service answers what the status view shows
    assert service.estimates.estimated_completion(running) == running.started_at + timedelta(seconds=expected)


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
    running = service.get(job_id)
    assert service.estimates.estimated_completion(running) == running.started_at + timedelta(seconds=20)


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


def test_estimated_completion_is_null_unless_processing(producer, worker, service):
    pending = producer.create_id("audio")
    assert producer.status(pending).json["estimated_completion"] is None
    assert service.estimates.estimated_completion(service.get(pending)) is None
    worker.claim("audio")
    worker.result(pending)
    assert producer.status(pending).json["estimated_completion"] is None
