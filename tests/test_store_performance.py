"""The JSON-file store's cost model and the write path that keeps it fast and safe.

- a claim reads only the file it takes, whatever the queue depth and however many jobs of other
  types wait (counted with an audit hook on ``open``: no timing);
- a write puts the new file in place under the lock and makes it durable outside it; an update
  computed before the lock is redone on the current version when the job changed meanwhile;
- a moved job ends in one directory; a copy is removed only while it is still the replaced version;
- claims stay exclusive across processes.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import pytest

from morag_remote.models import STATUSES, Action, RemoteJob, new_job_id, next_status
from morag_remote.store.base import pure
from morag_remote.store.files.jobs import FileJobStore, encode_job
from morag_remote.store.files.fsck import fsck
from morag_remote.store.files.journal import Journal
from morag_remote.store.files.recycle import SPARE_DIR, Recycler
from morag_remote.store.files.stale import StaleCopies, version_at

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


def make_job(content_type: str = "audio", **fields) -> RemoteJob:
    values = dict(id=new_job_id(), ingestion_task_id="t", source_file_path="/dev/null", content_type=content_type,
                  task_options={}, created_at=NOW, updated_at=NOW, available_at=NOW)
    values.update(fields)
    return RemoteJob(**values)


def seed(store: FileJobStore, counts: dict[str, int]) -> None:
    """Write pending job files directly (fast); the store's catalog is built from the files."""
    for content_type, n in counts.items():
        for _ in range(n):
            job = make_job(content_type, version=1)
            store.path("pending", job.id).write_bytes(encode_job(job))


def claim_mutator(job: RemoteJob) -> RemoteJob:
    job.status = next_status(job.status, Action.CLAIM).value
    job.worker_id = "w"
    job.attempt += 1
    return job


def complete_mutator(job: RemoteJob) -> RemoteJob:
    job.status = next_status(job.status, Action.COMPLETE).value
    job.completed_at = NOW
    return job


_counting: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _counting is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _counting.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@contextmanager
def opened_files(under: Path) -> Iterator[list[str]]:
    """The files under ``under`` that Python opens inside the block."""
    global _counting
    _counting = []
    found: list[str] = []
    try:
        yield found
    finally:
        found.extend(p for p in _counting if p.startswith(str(under)) and p.endswith(".json"))
        _counting = None


def job_files_read_by_one_claim(tmp_path: Path, counts: dict[str, int], name: str) -> list[str]:
    store = FileJobStore(tmp_path / name)
    seed(store, counts)
    store.stats()  # the catalog is built once per process, from every file
    with opened_files(store.root) as opened:
        claimed = store.claim(["audio"], 1, NOW, claim_mutator)
    assert len(claimed) == 1
    return opened


def test_a_claim_reads_the_same_files_at_10_and_at_3000_pending(tmp_path):
    small = job_files_read_by_one_claim(tmp_path, {"audio": 10}, "small")
    large = job_files_read_by_one_claim(tmp_path, {"audio": 3000}, "large")
    assert len(large) == len(small)
    assert {Path(p).stem for p in large} == {Path(large[0]).stem}  # all of them: the claimed job


def test_a_claim_does_not_read_jobs_of_other_content_types(tmp_path):
    opened = job_files_read_by_one_claim(tmp_path, {"video": 3000, "audio": 1}, "mixed")
    store = FileJobStore(tmp_path / "mixed")
    (audio,) = [j for j in store.iter_all() if j.content_type == "audio"]
    assert {Path(p).stem for p in opened} == {audio.id}


def test_a_rebuilt_catalog_takes_the_newest_copy_and_skips_an_unreadable_file(tmp_path):
    store = FileJobStore(tmp_path / "data")
    moved, broken, plain = make_job(), make_job(), make_job()
    for job in (moved, broken, plain):
        store.create(job)
    store.claim(["audio"], 1, NOW, claim_mutator)  # the oldest: moved to processing, version 2
    store.path("pending", moved.id).write_bytes(encode_job(moved))  # and its version 1 back, as after a crash
    store.path("pending", broken.id).write_bytes(b"{not json")
    fresh = FileJobStore(tmp_path / "data")
    counts = fresh.stats().counts
    assert counts == {("processing", "audio"): 1, ("pending", "audio"): 1}
    assert fresh.claim(["audio"], 5, NOW, claim_mutator)[0].id == plain.id


def test_claims_follow_priority_then_age_without_reading_the_queue(tmp_path):
    store = FileJobStore(tmp_path / "data")
    old = make_job(created_at=NOW - timedelta(seconds=2))
    new = make_job(created_at=NOW - timedelta(seconds=1))
    urgent = make_job(priority=5)
    for job in (old, new, urgent):
        store.create(job)
    taken = [store.claim(["audio"], 1, NOW, claim_mutator)[0].id for _ in range(3)]
    assert taken == [urgent.id, old.id, new.id]
    assert store.claim(["audio"], 1, NOW, claim_mutator) == []


def test_a_claim_skips_a_job_the_catalog_still_lists_but_the_files_do_not(tmp_path):
    store = FileJobStore(tmp_path / "data")
    gone, kept = make_job(), make_job()
    store.create(gone)
    store.create(kept)
    os.unlink(store.path("pending", gone.id))  # removed behind the store's back
    (claimed,) = store.claim(["audio"], 2, NOW, claim_mutator)
    assert claimed.id == kept.id


def test_a_claimed_and_completed_job_is_in_one_directory_only(tmp_path):
    store = FileJobStore(tmp_path / "data")
    job = make_job()
    store.create(job)
    store.claim(["audio"], 1, NOW, claim_mutator)
    store.update(job.id, pure(complete_mutator))
    where = [s for s in STATUSES if store.path(s, job.id).exists()]
    assert where == ["completed"]
    assert store.get(job.id).version == 3
    assert not list((store.root / ".incoming").iterdir())


def test_an_update_that_raced_another_writer_is_applied_to_the_newer_version(tmp_path):
    store = FileJobStore(tmp_path / "data")
    other = FileJobStore(tmp_path / "data")  # another process's view of the same files
    job = make_job()
    store.create(job)
    calls = []

    @pure
    def set_progress(current: RemoteJob) -> RemoteJob:
        calls.append(current.version)
        if len(calls) == 1:  # while this update is computed, another writer changes the job
            other.update(job.id, lambda j: setattr(j, "progress_message", "from elsewhere") or j)
        current.progress = 0.5
        return current

    stored = store.update(job.id, set_progress)
    assert calls == [1, 2]  # computed again, on the version the other writer made
    assert stored.version == 3
    final = other.get(job.id)
    assert (final.progress, final.progress_message, final.version) == (0.5, "from elsewhere", 3)
    assert not list((store.root / ".incoming").iterdir())


def test_a_refusal_computed_before_the_lock_is_decided_again_under_it(tmp_path):
    store = FileJobStore(tmp_path / "data")
    job = make_job()
    store.create(job)
    calls = []

    @pure
    def refuse_first(current: RemoteJob) -> RemoteJob:
        calls.append(current.version)
        if len(calls) == 1:
            raise RuntimeError("based on what the job was a moment ago")
        current.progress = 1.0
        return current

    assert store.update(job.id, refuse_first).progress == 1.0
    assert calls == [1, 1]


def test_an_update_of_a_missing_job_is_not_found_by_either_path(tmp_path):
    from morag_remote.exceptions import JobNotFound

    store = FileJobStore(tmp_path / "data")
    with pytest.raises(JobNotFound):
        store.update(new_job_id(), pure(complete_mutator))
    with pytest.raises(JobNotFound):
        store.update(new_job_id(), complete_mutator)


def test_a_copy_is_removed_only_while_it_is_the_version_that_was_replaced(tmp_path):
    store = FileJobStore(tmp_path / "data")
    job = make_job(version=4)
    path = store.path("pending", job.id)
    path.write_bytes(encode_job(job))
    recycler = Recycler(store.root / SPARE_DIR)
    stale = StaleCopies(store.lock, recycler)
    stale.remove([(path, 3)])  # a writer replaced version 3; this is 4
    assert version_at(path) == 4
    stale.remove([(path, 4), (store.path("failed", job.id), 9)])
    assert not path.exists()
    spare = recycler.take()  # set aside, kept for reuse
    assert os.listdir(store.root / SPARE_DIR) == [os.path.basename(spare)]
    assert recycler.take() is None


def test_concurrent_moves_leave_every_job_in_one_directory(tmp_path):
    store = FileJobStore(tmp_path / "data")
    jobs = [make_job() for _ in range(40)]
    for job in jobs:
        store.create(job)

    def work() -> None:
        for _ in range(10):
            for claimed in store.claim(["audio"], 1, NOW, claim_mutator):
                store.update(claimed.id, pure(complete_mutator))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(p.stem for p in (store.root / "completed").iterdir()) == sorted(j.id for j in jobs)
    assert not list((store.root / "pending").iterdir()) and not list((store.root / "processing").iterdir())
    assert fsck(store) == []


def test_fsck_still_reports_and_repairs_a_duplicate_left_by_a_crash(tmp_path):
    store = FileJobStore(tmp_path / "data")
    job = make_job()
    store.create(job)
    store.claim(["audio"], 1, NOW, claim_mutator)
    old = make_job(version=1)
    old.id = job.id
    store.path("pending", job.id).write_bytes(encode_job(old))  # the crash left the old copy behind
    (finding,) = fsck(store)
    assert finding.kind == "duplicate" and finding.path.startswith("pending/")
    fsck(store, repair=True)
    assert not store.path("pending", job.id).exists()
    assert store.get(job.id).status == "processing"


def test_fsck_removes_an_old_staged_record_but_not_one_in_flight(tmp_path):
    store = FileJobStore(tmp_path / "data")
    incoming = store.root / ".incoming"
    old, fresh = incoming / ".tmp-a.json.1.aa", incoming / ".tmp-b.json.2.bb"
    old.write_bytes(b"{}")
    fresh.write_bytes(b"{}")
    os.utime(old, (0, 0))  # its writer died long ago
    (finding,) = fsck(store)
    assert (finding.kind, finding.path) == ("temp", ".incoming/.tmp-a.json.1.aa")
    fsck(store, repair=True)
    assert not old.exists() and fresh.exists()


def test_the_change_watcher_stops_when_nobody_waits(tmp_path):
    store = FileJobStore(tmp_path / "data", watch_interval=0.01, watch_linger=0.05)
    store.stats()
    marker = store.change_marker()
    assert store.wait_for_change(0.05, since=marker) is False
    watcher = store._watcher
    assert watcher is not None
    watcher.join(10)
    assert not watcher.is_alive()


def test_the_change_watcher_ends_when_the_store_directory_is_gone(tmp_path):
    import shutil

    store = FileJobStore(tmp_path / "data", watch_interval=0.01)
    store.stats()
    store.wait_for_change(0.01, since=store.change_marker())
    watcher = store._watcher
    shutil.rmtree(tmp_path / "data")
    watcher.join(10)
    assert not watcher.is_alive()


def test_creating_a_job_whose_id_exists_fails_and_leaves_no_temp_file(tmp_path):
    store = FileJobStore(tmp_path / "data")
    job = make_job()
    store.create(job)
    twin = make_job()
    twin.id = job.id
    with pytest.raises(ValueError):
        store.create(twin)
    assert not list((store.root / ".incoming").iterdir())
    assert store.get(job.id).version == 1


def test_a_change_by_another_process_wakes_a_waiter(tmp_path):
    store = FileJobStore(tmp_path / "data", watch_interval=0.01)
    other = FileJobStore(tmp_path / "data")
    marker = store.change_marker()
    store.stats()
    woke = {}
    waiter = threading.Thread(target=lambda: woke.setdefault("changed", store.wait_for_change(30, since=marker)))
    waiter.start()
    other.create(make_job())
    waiter.join(30)
    assert woke["changed"] is True


def test_a_change_between_looking_and_waiting_is_not_missed(tmp_path):
    store = FileJobStore(tmp_path / "data")
    marker = store.change_marker()
    store.create(make_job())  # after the look, before the wait
    assert store.wait_for_change(30, since=marker) is True


def test_journal_head_follows_segments_another_writer_started(tmp_path):
    mine, theirs = Journal(tmp_path / "journal", segment_bytes=64), Journal(tmp_path / "journal", segment_bytes=64)
    mine.head()
    ids = [new_job_id() for _ in range(6)]
    for job_id in ids:
        end = theirs.append([job_id])
    assert mine.head() == end and end[0] > 1
    more, position = mine.read_since((end[0], 0))
    assert more == [] and position == end


def test_a_change_by_another_process_is_read_from_the_one_file_its_line_names(tmp_path):
    store, other = FileJobStore(tmp_path / "data"), FileJobStore(tmp_path / "data")
    job = make_job()
    store.create(job)
    other.stats()
    store.claim(["audio"], 1, NOW, claim_mutator)
    with opened_files(other.root) as opened:
        counts = other.stats().counts
    assert counts == {("processing", "audio"): 1}
    assert opened == [str(other.path("processing", job.id))]


@pytest.mark.parametrize("damage", ["never written", "damaged"])
def test_a_change_whose_writer_died_before_its_rename_is_read_from_every_directory(tmp_path, damage):
    store, other = FileJobStore(tmp_path / "data"), FileJobStore(tmp_path / "data")
    job = make_job()
    store.create(job)
    other.stats()
    with store.lock.hold():  # as a writer does, then dies before (or while) writing the file
        store.journal.append([job.id], where=("processing", 2))
        if damage == "damaged":
            store.path("processing", job.id).write_bytes(b'{"id": "')
    assert other.stats().counts == {("pending", "audio"): 1}
    assert [j.id for j in other.claim(["audio"], 1, NOW, claim_mutator)] == [job.id]


def test_journal_lines_name_the_record_they_announce(tmp_path):
    journal = Journal(tmp_path / "journal")
    start = journal.head()
    journal.append(["a"], where=("processing", 7))
    journal.append(["b", "c"])
    assert journal.changes_since(start)[0] == [("a", ("processing", 7)), ("b", None), ("c", None)]
    assert journal.read_since(start)[0] == ["a", "b", "c"]


def test_journal_reads_back_a_batch_longer_than_one_read(tmp_path):
    journal = Journal(tmp_path / "journal")
    start = journal.head()
    ids = [new_job_id() for _ in range(3000)]  # about 110 KB of lines
    end = journal.append(ids)
    assert journal.read_since(start) == (ids, end)


def test_a_lease_granted_by_another_process_lapses_on_the_first_poll_after_it(tmp_path):
    store, other = FileJobStore(tmp_path / "data"), FileJobStore(tmp_path / "data")
    job = make_job()
    store.create(job)
    assert store.lapsed(NOW, 10) == []  # this process has synced: nothing is processing

    def lease(j: RemoteJob) -> RemoteJob:
        j = claim_mutator(j)
        j.timeout_at = NOW + timedelta(seconds=60)
        return j

    other.claim(["audio"], 1, NOW, lease)
    assert store.lapsed(NOW + timedelta(seconds=61), 10) == [job.id]


# -- across processes -------------------------------------------------------------------------------

def _claim_until_empty(data_dir: str, out: "multiprocessing.Queue[list[str]]") -> None:
    store = FileJobStore(data_dir)
    mine: list[str] = []
    for _ in range(10_000):
        claimed = store.claim(["audio"], 1, NOW, claim_mutator)
        if not claimed:
            break
        mine.append(claimed[0].id)
        store.update(claimed[0].id, pure(complete_mutator))
    out.put(mine)


@pytest.mark.slow
def test_claims_are_exclusive_across_processes(tmp_path):
    store = FileJobStore(tmp_path / "data")
    jobs = [make_job() for _ in range(120)]
    for job in jobs:
        store.create(job)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_until_empty, args=(str(store.root), out)) for _ in range(4)]
    for p in procs:
        p.start()
    claimed = [job_id for _ in procs for job_id in out.get(timeout=120)]
    for p in procs:
        p.join(60)
    assert sorted(claimed) == sorted(j.id for j in jobs)  # each once, none lost
    assert all(j.attempt == 1 and j.status == "completed" for j in store.iter_all())
    assert fsck(store) == []
