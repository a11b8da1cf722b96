"""What counts as a readable job record on disk. A record that is not one is reported and skipped
by the store (and moved aside by fsck); it must never break the index other jobs are served from."""
from __future__ import annotations

import json
from datetime import timezone
from pathlib import Path

import pytest

from support.jobs import new_job
from morag_remote.store.files.jobs import CorruptJobFile, load_job_file

pytestmark = pytest.mark.files_only  # damage and crashes of the JSON files themselves


@pytest.fixture
def job_file(service) -> Path:
    job = new_job(service)
    return Path(service.store.root) / "pending" / f"{job.id}.json"


def _rewrite(path: Path, **changes) -> None:
    record = json.loads(path.read_bytes())
    record.update(changes)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("field, value", [
    ("priority", "high"), ("retry_count", 1.5), ("max_retries", True), ("version", None),
    ("status", 3), ("content_type", None), ("worker_id", 7), ("lease_id", ["a"]),
    ("task_options", []), ("result_data", "text"), ("progress", "half"), ("progress", False),
    ("created_at", 1700000000), ("timeout_at", "next tuesday"),
])
def test_a_field_of_the_wrong_type_makes_the_record_unreadable(job_file, field, value):
    _rewrite(job_file, **{field: value})
    with pytest.raises(CorruptJobFile) as caught:
        load_job_file(job_file)
    assert repr(field) in caught.value.reason


def test_a_record_without_a_required_field_is_unreadable(job_file):
    record = json.loads(job_file.read_bytes())
    del record["source_file_path"]
    job_file.write_text(json.dumps(record))
    with pytest.raises(CorruptJobFile):
        load_job_file(job_file)


def test_a_record_whose_id_is_not_its_file_name_is_unreadable(job_file):
    _rewrite(job_file, id="0190a0a0-0000-7000-8000-000000000000")
    with pytest.raises(CorruptJobFile) as caught:
        load_job_file(job_file)
    assert "does not match the file name" in caught.value.reason


def test_a_record_with_fields_this_version_does_not_know_is_readable(job_file):
    _rewrite(job_file, shard="eu-1")
    assert load_job_file(job_file).id == job_file.stem


def test_a_naive_timestamp_written_by_another_tool_is_read_as_utc(job_file):
    _rewrite(job_file, created_at="2026-01-02T03:04:05")
    created = load_job_file(job_file).created_at
    assert created.tzinfo is not None and created.utcoffset() == timezone.utc.utcoffset(None)
    assert (created.year, created.hour) == (2026, 3)


def test_the_store_skips_an_unreadable_record_and_serves_the_rest(service, job_file):
    other = new_job(service)
    _rewrite(job_file, priority="high")
    assert [j.id for j in service.poll("w1", ["audio"], max_jobs=5)] == [other.id]
