"""``estimated_completion`` reads the store's completed jobs of a type: the same answer on both backends."""
from __future__ import annotations

from datetime import timedelta

from morag_remote.service import DEFAULT_DURATIONS, Caller


def _job(service, instance_path, content_type="audio"):
    path = instance_path / "sources" / "a.bin"
    path.write_bytes(b"a")
    return service.create(source_file_path=str(path), content_type=content_type, ingestion_task_id="t")


def test_a_processing_job_is_estimated_from_the_median_of_completed_ones(service, clock, instance_path):
    for seconds in (10, 20, 60):
        _job(service, instance_path)
        (claimed,) = service.poll("w1", ["audio"])
        clock.advance(seconds)
        service.submit_result(claimed.id, Caller(lease_id=claimed.lease_id), success=True, content="x")
    _job(service, instance_path)
    (running,) = service.poll("w1", ["audio"])
    assert service.estimates.estimated_completion(running) == running.started_at + timedelta(seconds=20)


def test_without_history_the_estimate_is_the_default_for_the_type(service, clock, instance_path):
    _job(service, instance_path, "video")
    (running,) = service.poll("w1", ["video"])
    assert service.estimates.estimated_completion(running) == running.started_at + timedelta(seconds=DEFAULT_DURATIONS["video"])
    assert service.estimates.estimated_completion(service.get(_job(service, instance_path).id)) is None
