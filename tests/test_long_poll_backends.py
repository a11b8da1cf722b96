"""A long poll through the service waits for a job and takes it when one is created, on both backends."""
from __future__ import annotations

import threading


def _source(instance_path):
    path = instance_path / "sources" / "a.mp3"
    path.write_bytes(b"a")
    return str(path)


def test_a_long_poll_takes_a_job_created_while_it_waits(service, instance_path):
    source = _source(instance_path)
    got = []
    poller = threading.Thread(target=lambda: got.extend(service.poll("w1", ["audio"], wait=30)))
    poller.start()
    created = []
    for _ in range(100):  # bounded; usually the first job wakes the poll
        created.append(service.create(source_file_path=source, content_type="audio", ingestion_task_id="t").id)
        poller.join(0.3)
        if not poller.is_alive():
            break
    assert len(got) == 1 and got[0].id in created and got[0].worker_id == "w1"


def test_a_long_poll_with_nothing_to_take_ends_empty(service):
    assert service.poll("w1", ["audio"], wait=0.2) == []


def test_a_long_poll_for_other_types_is_not_handed_a_job(service, instance_path):
    service.create(source_file_path=_source(instance_path), content_type="video", ingestion_task_id="t")
    assert service.poll("w1", ["audio"], wait=0.3) == []
