"""The repository interface (``store/base.py``), held to the same behaviour by both backends.

Every test runs twice: against the JSON-file store and against PostgreSQL (``backend`` in conftest).
"""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from morag_remote.exceptions import JobNotFound, LeaseConflict
from morag_remote.models import RemoteJob, new_job_id
from morag_remote.routing import Requirements
from morag_remote.store.base import Availability, Claimable, ClaimRoute, JobFilter, TypeControl
from morag_remote.store.files.jobs import FileJobStore

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def repo(backend, tmp_path, request):
    if backend == "files":
        return FileJobStore(tmp_path / "jobs")
    from morag_remote.store.postgres.db import database
    from morag_remote.store.postgres.jobs import PostgresJobStore

    store = PostgresJobStore(database(request.getfixturevalue("pg_url")), batch_size=3)
    assert store.db.ensure_listening(10), "the LISTEN connection did not come up"
    return store


_seq = iter(range(1, 10**9))


def job(content_type: str = "audio", *, created: datetime | None = None, **fields) -> RemoteJob:
    """A pending job; ids follow creation order like the service's (a counter keeps them distinct)."""
    created = created or T0 + timedelta(milliseconds=next(_seq))
    fields.setdefault("available_at", created)
    return RemoteJob(id=fields.pop("id", new_job_id()), ingestion_task_id=fields.pop("ingestion_task_id", "ingest-1"),
                     source_file_path="/data/in.mp3", content_type=content_type,
                     task_options=fields.pop("task_options", {"language": "en"}), created_at=created,
                     updated_at=created, **fields)


def claim_as(worker: str, now: datetime = T0 + timedelta(hours=1), lease: float = 60):
    def mutate(j: RemoteJob) -> RemoteJob:
        j.status = "processing"
        j.worker_id = worker
        j.started_at = j.heartbeat_at = now
        j.timeout_at = now + timedelta(seconds=lease)
        j.attempt += 1
        return j

    return mutate


def finish(status: str, at: datetime):
    def mutate(j: RemoteJob) -> RemoteJob:
        j.status = status
        j.completed_at = j.updated_at = at
        j.result_data = {"content": "text", "metadata": {}, "processing_time": 1.0} if status == "completed" else None
        return j

    return mutate


NOW = T0 + timedelta(hours=1)


def test_created_job_reads_back_whole_with_version_one(repo):
    j = job(priority=3, task_options={"nested": {"a": [1, 2]}}, extra={"from_the_future": True})
    repo.create(j)
    got = repo.get(j.id)
    assert got.to_dict() == j.to_dict()
    assert got.version == 1


def test_create_refuses_an_existing_id(repo):
    j = repo.create(job())
    with pytest.raises(ValueError):
        repo.create(job(id=j.id))


@pytest.mark.parametrize("job_id", ["0190-missing", "../etc/passwd", "x" * 80, "..\x00", "a\x00b"])
def test_unknown_or_malformed_ids_are_job_not_found(repo, job_id):
    with pytest.raises(JobNotFound):
        repo.get(job_id)
    with pytest.raises(JobNotFound):
        repo.update(job_id, claim_as("w1"))
    with pytest.raises(JobNotFound):
        repo.delete(job_id)


def test_a_list_cursor_with_a_nul_is_only_a_position(repo):
    ids = sorted(repo.create(job()).id for _ in range(2))
    jobs, _ = repo.list(JobFilter(), ids[0] + "\x00", 10)
    assert [j.id for j in jobs] == ids[1:]


def test_update_applies_the_mutator_and_bumps_the_version(repo):
    j = repo.create(job())
    updated = repo.update(j.id, claim_as("w1"))
    assert updated.version == 2
    assert repo.get(j.id).to_dict() == updated.to_dict()
    assert repo.get(j.id).worker_id == "w1"


def test_update_whose_mutator_raises_changes_nothing_and_propagates(repo):
    j = repo.create(job())

    def refuse(current: RemoteJob) -> RemoteJob:
        current.status = "completed"
        raise LeaseConflict("no")

    with pytest.raises(LeaseConflict):
        repo.update(j.id, refuse)
    assert repo.get(j.id).to_dict() == j.to_dict()


def test_update_of_unknown_job_is_job_not_found(repo):
    with pytest.raises(JobNotFound):
        repo.update(new_job_id(), claim_as("w1"))


def test_claim_takes_higher_priority_first_then_oldest(repo):
    old_low = repo.create(job(created=T0))
    new_high = repo.create(job(created=T0 + timedelta(seconds=2), priority=5))
    old_high = repo.create(job(created=T0 + timedelta(seconds=1), priority=5))
    claimed = repo.claim(["audio"], 3, NOW, claim_as("w1"))
    assert [c.id for c in claimed] == [old_high.id, new_high.id, old_low.id]


def test_claim_merges_the_order_across_content_types(repo):
    audio = repo.create(job("audio", created=T0 + timedelta(seconds=2)))
    video = repo.create(job("video", created=T0 + timedelta(seconds=1)))
    urgent = repo.create(job("video", created=T0 + timedelta(seconds=3), priority=1))
    claimed = repo.claim(["audio", "video"], 2, NOW, claim_as("w1"))
    assert [c.id for c in claimed] == [urgent.id, video.id]
    assert repo.get(audio.id).status == "pending"


def test_claim_takes_only_the_requested_content_types(repo):
    repo.create(job("video"))
    assert repo.claim(["audio", "document"], 5, NOW, claim_as("w1")) == []


def test_claim_respects_the_limit_and_stores_the_mutation(repo):
    for _ in range(4):
        repo.create(job())
    claimed = repo.claim(["audio"], 3, NOW, claim_as("w1"))
    assert len(claimed) == 3
    assert all(repo.get(c.id).status == "processing" and repo.get(c.id).version == 2 for c in claimed)
    assert len(repo.claim(["audio"], 3, NOW, claim_as("w2"))) == 1


def test_claim_skips_jobs_not_yet_available(repo):
    later = repo.create(job(available_at=NOW + timedelta(seconds=30)))
    assert repo.claim(["audio"], 1, NOW, claim_as("w1")) == []
    assert [c.id for c in repo.claim(["audio"], 1, NOW + timedelta(seconds=30), claim_as("w1"))] == [later.id]


def test_a_job_back_from_backoff_keeps_its_place_by_age(repo):
    retried = repo.create(job(created=T0, available_at=NOW + timedelta(seconds=10)))
    newer = repo.create(job(created=T0 + timedelta(minutes=1)))
    claimed = repo.claim(["audio"], 2, NOW + timedelta(seconds=10), claim_as("w1"))
    assert [c.id for c in claimed] == [retried.id, newer.id]


def test_claim_never_returns_a_job_that_is_no_longer_pending(repo):
    j = repo.create(job())
    repo.claim(["audio"], 1, NOW, claim_as("w1"))
    assert repo.claim(["audio"], 1, NOW, claim_as("w2")) == []
    assert repo.get(j.id).worker_id == "w1"


def test_delete_removes_the_job(repo):
    j = repo.create(job())
    repo.delete(j.id)
    with pytest.raises(JobNotFound):
        repo.get(j.id)
    with pytest.raises(JobNotFound):
        repo.delete(j.id)


def test_delete_only_if_checks_the_predicate_on_the_stored_job(repo):
    j = repo.create(job())
    repo.update(j.id, claim_as("w1"))
    seen = []
    assert repo.delete(j.id, only_if=lambda current: seen.append(current.status) or False) is False
    assert seen == ["processing"] and repo.get(j.id).status == "processing"
    assert repo.delete(j.id, only_if=lambda current: current.status == "processing") is True
    with pytest.raises(JobNotFound):
        repo.get(j.id)


def test_list_pages_through_jobs_in_creation_order(repo):
    ids = sorted(repo.create(job()).id for _ in range(5))  # ids order creation (to the ms)
    page1, cursor = repo.list(JobFilter(), None, 2)
    page2, cursor2 = repo.list(JobFilter(), cursor, 2)
    page3, cursor3 = repo.list(JobFilter(), cursor2, 2)
    assert [j.id for j in page1 + page2 + page3] == ids
    assert cursor == ids[1] and cursor2 == ids[3] and cursor3 is None


def test_list_without_more_jobs_gives_no_cursor(repo):
    ids = sorted(repo.create(job()).id for _ in range(2))
    jobs, cursor = repo.list(JobFilter(), None, 2)
    assert [j.id for j in jobs] == ids and cursor is None


@pytest.mark.parametrize("filters, expected", [
    (JobFilter(status="processing"), {"claimed"}),
    (JobFilter(content_type="video"), {"video"}),
    (JobFilter(ingestion_task_id="ingest-9"), {"other-task"}),
    (JobFilter(worker_id="w1"), {"claimed"}),
    (JobFilter(status="pending", content_type="audio"), {"other-task", "plain"}),
])
def test_list_filters(repo, filters, expected):
    names = {}
    names["plain"] = repo.create(job()).id
    names["video"] = repo.create(job("video")).id
    names["other-task"] = repo.create(job(ingestion_task_id="ingest-9")).id
    names["claimed"] = repo.create(job("document")).id
    repo.claim(["document"], 1, NOW, claim_as("w1"))
    jobs, _ = repo.list(filters, None, 10)
    by_id = {v: k for k, v in names.items()}
    assert {by_id[j.id] for j in jobs} == expected


def test_lapsed_lists_processing_jobs_whose_lease_ended_in_lease_order(repo):
    first = repo.create(job())
    second = repo.create(job())
    repo.create(job())
    repo.update(second.id, claim_as("w1", lease=10))
    repo.update(first.id, claim_as("w2", lease=20))
    assert repo.lapsed(NOW + timedelta(seconds=5), 10) == []
    assert repo.lapsed(NOW + timedelta(seconds=10), 10) == [second.id]
    assert repo.lapsed(NOW + timedelta(seconds=60), 10) == [second.id, first.id]
    assert repo.lapsed(NOW + timedelta(seconds=60), 1) == [second.id]


def test_pending_available_before_lists_pending_jobs_claimable_since_before_the_cutoff(repo):
    old = repo.create(job(created=T0))
    repo.create(job(created=T0 + timedelta(hours=2)))
    delayed = repo.create(job(created=T0 - timedelta(hours=3), available_at=T0 + timedelta(hours=3)))
    claimed = repo.create(job(created=T0 - timedelta(hours=1)))
    repo.update(claimed.id, claim_as("w1"))
    assert repo.pending_available_before(T0 + timedelta(hours=1), 10) == [old.id]
    assert delayed.id in repo.pending_available_before(T0 + timedelta(hours=4), 10)


def test_recently_completed_returns_newest_completions_of_one_type_first(repo):
    first, second, video = repo.create(job()), repo.create(job()), repo.create(job("video"))
    repo.update(first.id, finish("completed", T0 + timedelta(minutes=1)))
    repo.update(second.id, finish("completed", T0 + timedelta(minutes=2)))
    repo.update(video.id, finish("completed", T0 + timedelta(minutes=3)))
    assert [j.id for j in repo.recently_completed("audio", 10)] == [second.id, first.id]
    assert [j.id for j in repo.recently_completed("audio", 1)] == [second.id]


def test_finished_since_pages_through_terminal_jobs_by_finish_time_then_id(repo):
    a, b, c = repo.create(job()), repo.create(job()), repo.create(job())
    repo.update(a.id, finish("completed", T0))
    repo.update(b.id, finish("failed", T0))
    repo.update(c.id, finish("cancelled", T0 + timedelta(minutes=1)))
    everything = repo.finished_since(T0, 10)
    assert everything == sorted([a.id, b.id]) + [c.id]
    first_page = repo.finished_since(T0, 1)
    assert repo.finished_since(T0, 10, after_id=first_page[0]) == everything[1:]
    assert repo.finished_since(T0 + timedelta(seconds=1), 10) == [c.id]


def test_finished_before_lists_terminal_jobs_by_completion(repo):
    done = repo.create(job())
    failed = repo.create(job())
    recent = repo.create(job())
    repo.create(job())
    repo.update(done.id, finish("completed", T0 + timedelta(days=1)))
    repo.update(failed.id, finish("failed", T0))
    repo.update(recent.id, finish("cancelled", T0 + timedelta(days=5)))
    assert repo.finished_before(T0 + timedelta(days=2), 10) == [failed.id, done.id]
    assert repo.finished_before(T0 + timedelta(days=2), 1) == [failed.id]


def test_stats_counts_by_status_and_type_with_oldest_pending_and_workers(repo):
    oldest = repo.create(job(created=T0))
    repo.create(job("video", created=T0 + timedelta(seconds=5)))
    busy = repo.create(job(created=T0 - timedelta(hours=1)))
    repo.update(busy.id, claim_as("w7", now=NOW))
    stats = repo.stats()
    assert stats.counts == {("pending", "audio"): 1, ("pending", "video"): 1, ("processing", "audio"): 1}
    assert stats.oldest_pending_created_at == oldest.created_at
    assert stats.worker_last_seen == {"w7": NOW}


def test_availability_counts_what_a_claim_could_take_per_type_and_requirement_set(repo):
    assert repo.availability(["audio"], NOW) == Availability()
    delayed = repo.create(job(available_at=NOW + timedelta(seconds=30)))
    repo.create(job("video", available_at=NOW + timedelta(seconds=5)))
    assert repo.availability(["audio"], NOW) == Availability((), delayed.available_at)
    assert repo.availability(["audio", "video"], NOW).next_at == NOW + timedelta(seconds=5)
    gpu = Requirements.parse({"labels": ["gpu"]})
    for _ in range(2):
        repo.create(job(requires=gpu.to_dict()))
    repo.create(job("document"))
    later = repo.availability(["audio", "video", "document"], NOW + timedelta(seconds=30))
    assert sorted(later.ready, key=lambda c: (c.content_type, c.requirements is not None)) == [
        Claimable("audio", None, 1), Claimable("audio", gpu, 2), Claimable("document", None, 1),
        Claimable("video", None, 1)]
    assert later.next_at is None and not later.lapsed


def test_availability_leaves_paused_types_out_and_caps_limited_ones_by_their_room(repo):
    for _ in range(3):
        repo.create(job("audio"))
        repo.create(job("video"))
    repo.claim(["audio"], 1, NOW, claim_as("w", lease=10))
    repo.set_control("video", lambda c: TypeControl(c.content_type, paused=True), NOW)
    route = ClaimRoute(limits={"audio": 2})
    available = repo.availability(["audio", "video"], NOW, route)
    assert available.ready == (Claimable("audio", None, 1),)  # 2 pending, room for one more processing
    assert available.next_at == NOW + timedelta(seconds=10) and not available.lapsed  # the lease's end
    assert repo.availability(["audio"], NOW, ClaimRoute(limits={"audio": 1})).ready == ()
    lapsed = repo.availability(["audio"], NOW + timedelta(seconds=11))
    assert lapsed.lapsed and lapsed.next_at is None


def test_put_stores_a_new_job_at_its_version_and_replaces_an_old_one(repo):
    j = job()
    j.version = 7
    assert repo.put(j).version == 7
    replacement = repo.get(j.id)
    replacement.status = "cancelled"
    repo.put(replacement)
    assert repo.get(j.id).status == "cancelled" and repo.get(j.id).version == 8


def test_iter_all_yields_every_job_once(repo):
    ids = {repo.create(job()).id for _ in range(7)}
    seen = [j.id for j in repo.iter_all()]
    assert sorted(seen) == sorted(ids)


def test_check_writable_passes_on_a_healthy_store(repo):
    repo.check_writable()


def test_wait_for_change_times_out_without_a_change(repo):
    # True is allowed for a change made before the wait (an earlier test's wake-up may still be on
    # its way); with nothing happening, a wait soon times out
    assert any(repo.wait_for_change(0.05) is False for _ in range(20))


def test_wait_for_change_wakes_when_another_thread_creates_a_job(repo):
    repo.wait_for_change(0.01)
    ready = threading.Event()
    woke = []

    def waiter() -> None:
        repo.availability(["audio"], NOW)
        ready.set()
        woke.append(repo.wait_for_change(60))

    thread = threading.Thread(target=waiter)
    thread.start()
    assert ready.wait(10)
    for _ in range(50):  # the waiter may not be waiting yet when the first job arrives
        repo.create(job())
        thread.join(0.2)
        if not thread.is_alive():
            break
    assert woke == [True]
