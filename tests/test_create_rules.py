"""The service's own checks of a create, below the schema (the API's schema catches most of these
first; scripts and the CLI's import call the service directly): each is a 422 naming the field,
and nothing is created."""
from __future__ import annotations

from datetime import timedelta

import pytest

from morag_remote.exceptions import InvalidRequest
from morag_remote.models import to_iso
from morag_remote.store.base import JobFilter


def _source(instance_path):
    path = instance_path / "sources" / "a.mp3"
    path.write_bytes(b"audio")
    return str(path)


@pytest.mark.parametrize("field, extra", [
    ("requires.min.gpu_memory_gb", {"requires": {"min": {"gpu_memory_gb": "lots"}}}),
    ("available_at", {"available_at": "next tuesday"}),
    ("expires_at", {"expires_at": "2001-01-01T00:00:00Z"}),
    ("on_lapse", {"on_lapse": "forget"}),
])
def test_a_create_the_rules_refuse_names_the_field_and_makes_nothing(service, instance_path, field, extra):
    with pytest.raises(InvalidRequest) as caught:
        service.create(source_file_path=_source(instance_path), content_type="audio", ingestion_task_id="t", **extra)
    assert caught.value.status_code == 422 and field in caught.value.extra["errors"]

    assert service.list(JobFilter(), None, 10)[0] == []


def test_expires_at_must_come_after_available_at(service, instance_path, clock):
    start = clock.now + timedelta(hours=2)
    with pytest.raises(InvalidRequest) as caught:
        service.create(source_file_path=_source(instance_path), content_type="audio", ingestion_task_id="t",
                       available_at=to_iso(start), expires_at=to_iso(start - timedelta(minutes=1)))
    assert "expires_at" in caught.value.extra["errors"]
    job = service.create(source_file_path=_source(instance_path), content_type="audio", ingestion_task_id="t",
                         available_at=to_iso(clock.now - timedelta(hours=1)))
    assert job.available_at == clock.now  # a moment already passed means now


def test_a_create_needs_a_source(service):
    with pytest.raises(InvalidRequest) as caught:
        service.create(content_type="audio", ingestion_task_id="t")
    assert "source_file_path" in caught.value.extra["errors"]
