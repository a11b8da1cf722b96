"""The file store's in-memory index hands out pending jobs in claim order (priority, then age) once
they are due, however many become due at once (a start after a backlog promotes them in bulk)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from morag_remote.models import RemoteJob
from morag_remote.store.files.catalog import Catalog

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def job(name: str, age: float, priority: int = 0, due: float | None = None, requires: dict | None = None) -> RemoteJob:
    created = T0 + timedelta(seconds=age)
    return RemoteJob(id=name, ingestion_task_id="t", source_file_path="/a", content_type="audio",
                     task_options={}, created_at=created, updated_at=created, priority=priority,
                     available_at=T0 + timedelta(seconds=due) if due is not None else created,
                     requires=requires)


def at(seconds: float) -> float:
    return (T0 + timedelta(seconds=seconds)).timestamp()


def test_due_jobs_come_in_priority_then_age_order_and_later_ones_merge_in():
    catalog = Catalog()
    for j in (job("old", 1), job("urgent", 3, priority=5), job("young", 2), job("later", 0, due=100),
              job("gpu", 1.5, requires={"labels": ["gpu"]})):
        catalog.apply(j.id, j)
    assert list(catalog.candidates(["audio"], at(10))) == ["urgent", "old", "gpu", "young"]
    assert list(catalog.candidates(["audio"], at(10), keys=[None])) == ["urgent", "old", "young"]
    catalog.apply("mid", job("mid", 1.2))  # joins a list that already has ready jobs
    assert list(catalog.candidates(["audio"], at(100))) == ["urgent", "later", "old", "mid", "gpu", "young"]
    catalog.apply("old", None)
    assert list(catalog.candidates(["audio"], at(100))) == ["urgent", "later", "mid", "gpu", "young"]


def test_a_backlog_becomes_claimable_at_once_and_a_job_not_yet_due_stays_back():
    catalog = Catalog()
    for i in range(5000):
        catalog.apply(f"j{i:05d}", job(f"j{i:05d}", i))
    catalog.apply("tomorrow", job("tomorrow", 0, due=86400))
    first = catalog.candidates(["audio"], at(6000))
    assert [next(first) for _ in range(3)] == ["j00000", "j00001", "j00002"]
    assert "tomorrow" not in set(catalog.candidates(["audio"], at(6000)))
    assert catalog.ready_counts("audio", at(6000)) == {None: 5000}
    assert catalog.next_available(["audio"]) == at(86400)
