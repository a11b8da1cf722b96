"""The JSON-file repository: the seed layout, atomic writes, one status directory per job, several
store objects (as in several gunicorn processes) on one directory, and what a crash leaves behind."""
from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from morag_remote.exceptions import JobNotFound, StoreUnavailable
from morag_remote.models import RemoteJob, new_job_id
from morag_remote.fileio import TEMP_PREFIX, write_atomic
from morag_remote.store.base import JobFilter, pure
from morag_remote.store.files.jobs import FileJobStore
from morag_remote.store.files.fsck import fsck

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "remote_jobs"


@pytest.fixture
def store(data_dir: Path) -> FileJobStore:
    return FileJobStore(data_dir)


def make_job(content_type: str = "audio", at: datetime = T0, **fields) -> RemoteJob:
    return RemoteJob(id=new_job_id(), ingestion_task_id=fields.pop("ingestion_task_id", "t"),
                     source_file_path="/src/a", content_type=content_type, task_options={},
                     created_at=at, updated_at=at, available_at=fields.pop("available_at", at), **fields)


def claim_as(worker_id: str, now: datetime = T0, lease: float = 60):
    def mutate(job: RemoteJob) -> RemoteJob:
        job.status = "processing"
        job.worker_id = worker_id
        job.started_at = job.heartbeat_at = now
        job.timeout_at = now + timedelta(seconds=lease)
        return job

    return mutate


def set_status(status: str, at: datetime = T0):
    def mutate(job: RemoteJob) -> RemoteJob:
        job.status = status
        job.completed_at = job.updated_at = at
        return job

    return mutate


def files_of(data_dir: Path, job_id: str) -> list[str]:
    return sorted(p.parent.name for p in data_dir.glob(f"*/{job_id}.json"))


def temp_files(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.rglob(f"{TEMP_PREFIX}*")]


# -- layout and atomic writes ------------------------------------------------------------------


def test_create_writes_one_json_file_in_the_status_directory(store, data_dir):
    job = store.create(make_job())
    assert files_of(data_dir, job.id) == ["pending"]
    record = json.loads((data_dir / "pending" / f"{job.id}.json").read_text())
    assert record["id"] == job.id and record["status"] == "pending" and record["version"] == 1
    assert record["created_at"] == "2026-01-01T00:00:00Z"
    assert temp_files(data_dir) == []


def test_create_refuses_an_existing_id(store):
    job = store.create(make_job())
    with pytest.raises(ValueError):
        store.create(job.copy())


def test_a_transition_moves_the_file_and_leaves_one_copy(store, data_dir):
    job = store.create(make_job())
    updated = store.update(job.id, claim_as("w1"))
    assert updated.version == 2
    assert files_of(data_dir, job.id) == ["processing"]
    assert store.get(job.id).worker_id == "w1"
    assert temp_files(data_dir) == []


def test_write_atomic_removes_its_temp_file_when_the_rename_fails(tmp_path):
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "child").write_text("x")
    with pytest.raises(OSError):
        write_atomic(target, b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["occupied"]


def test_a_temp_file_left_by_an_earlier_process_with_the_same_pid_does_not_block_writes(store, data_dir):
    """After a restart, processes often get the pids the crashed ones had."""
    job = make_job()
    leftover = data_dir / "pending" / f"{TEMP_PREFIX}{job.id}.json.{os.getpid()}.{threading.get_ident()}"
    leftover.write_text("half a job")
    store.create(job)
    assert store.get(job.id).id == job.id
    assert [f.kind for f in fsck(store)] == ["temp"]


def test_a_large_record_is_written_whole(store, data_dir):
    job = make_job()
    job.result_data = {"content": "x" * (8 * 1024 * 1024), "metadata": {}, "processing_time": 1.0}
    store.create(job)
    assert store.get(job.id).result_data == job.result_data


def test_a_mutator_that_raises_changes_nothing(store, data_dir):
    job = store.create(make_job())

    def refuse(_: RemoteJob) -> RemoteJob:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        store.update(job.id, refuse)
    assert store.get(job.id).version == 1 and files_of(data_dir, job.id) == ["pending"]


@pytest.mark.parametrize("job_id", ["", "../x", "a/b", "x" * 65, "nul\x00"])
def test_ids_that_cannot_name_a_file_are_not_found(store, job_id):
    for call in (lambda: store.get(job_id), lambda: store.update(job_id, set_status("failed")),
                 lambda: store.delete(job_id)):
        with pytest.raises(JobNotFound):
            call()


def test_unknown_ids_are_not_found(store):
    missing = new_job_id()
    for call in (lambda: store.get(missing), lambda: store.update(missing, set_status("failed")),
                 lambda: store.delete(missing)):
        with pytest.raises(JobNotFound):
            call()


def test_delete_removes_the_file(store, data_dir):
    job = store.create(make_job())
    store.delete(job.id)
    assert files_of(data_dir, job.id) == []
    with pytest.raises(JobNotFound):
        store.get(job.id)
    assert store.list(JobFilter(), None, 10) == ([], None)


def test_put_imports_a_job_as_it_is_and_replaces_an_existing_one(store, data_dir):
    job = make_job(status="completed", completed_at=T0)
    store.put(job)
    assert files_of(data_dir, job.id) == ["completed"]
    job.status = "failed"
    store.put(job)
    assert files_of(data_dir, job.id) == ["failed"] and store.get(job.id).version == 2
    assert [j.id for j in store.iter_all()] == [job.id]


def test_check_writable_raises_when_the_directory_is_gone(store, data_dir):
    store.check_writable()
    data_dir.rename(data_dir.with_name("gone"))
    with pytest.raises(StoreUnavailable):
        store.check_writable()


# -- claims ------------------------------------------------------------------------------------


def test_claim_takes_priority_then_age_and_only_the_wanted_types(store):
    old = store.create(make_job("audio", T0))
    doc = store.create(make_job("document", T0 - timedelta(seconds=5)))
    urgent = store.create(make_job("video", T0 + timedelta(seconds=9), priority=5))
    young = store.create(make_job("audio", T0 + timedelta(seconds=10)))
    claimed = store.claim(["audio", "video"], 10, T0 + timedelta(seconds=20), claim_as("w"))
    assert [j.id for j in claimed] == [urgent.id, old.id, young.id]
    assert store.get(doc.id).status == "pending"


def test_claim_never_takes_more_than_the_limit(store, data_dir):
    jobs = [store.create(make_job(at=T0 + timedelta(seconds=i))) for i in range(5)]
    claimed = store.claim(["audio"], 2, T0 + timedelta(minutes=1), claim_as("w"))
    assert [j.id for j in claimed] == [jobs[0].id, jobs[1].id]
    assert [files_of(data_dir, j.id) for j in jobs] == [["processing"]] * 2 + [["pending"]] * 3


def test_claim_skips_jobs_not_yet_available(store):
    later = store.create(make_job(available_at=T0 + timedelta(seconds=30)))
    assert store.claim(["audio"], 1, T0, claim_as("w")) == []
    assert store.availability(["audio"], T0).next_at == T0 + timedelta(seconds=30)
    assert store.availability(["audio"], T0).ready == ()
    assert store.availability(["audio"], T0 + timedelta(seconds=30)).ready[0].count == 1
    assert [j.id for j in store.claim(["audio"], 1, T0 + timedelta(seconds=31), claim_as("w"))] == [later.id]


def test_two_store_objects_on_one_directory_never_claim_one_job_twice(data_dir):
    first, second = FileJobStore(data_dir), FileJobStore(data_dir)
    jobs = [first.create(make_job(at=T0 + timedelta(seconds=i))) for i in range(4)]
    a = second.claim(["audio"], 3, T0 + timedelta(minutes=1), claim_as("a"))
    b = first.claim(["audio"], 3, T0 + timedelta(minutes=1), claim_as("b"))
    assert [j.id for j in a] == [j.id for j in jobs[:3]]
    assert [j.id for j in b] == [jobs[3].id]
    assert first.claim(["audio"], 3, T0 + timedelta(minutes=1), claim_as("c")) == []


def test_a_second_store_object_sees_changes_made_through_the_first(data_dir):
    first, second = FileJobStore(data_dir), FileJobStore(data_dir)
    job = first.create(make_job())
    assert second.stats().counts == {("pending", "audio"): 1}
    first.update(job.id, claim_as("w1"))
    assert second.stats().counts == {("processing", "audio"): 1}
    assert [j.id for j in second.list(JobFilter(worker_id="w1"), None, 10)[0]] == [job.id]
    first.delete(job.id)
    assert second.stats().counts == {}


def test_a_store_that_missed_a_removed_journal_segment_rebuilds_from_the_files(data_dir):
    writer = FileJobStore(data_dir, journal_segment_bytes=200)
    reader = FileJobStore(data_dir, journal_segment_bytes=200)
    reader.stats()  # the reader now has a journal position
    jobs = [writer.create(make_job(at=T0 + timedelta(seconds=i))) for i in range(30)]
    assert len(list((data_dir / "journal").glob("*.log"))) <= 2
    assert reader.stats().counts == {("pending", "audio"): 30}
    assert [j.id for j in reader.claim(["audio"], 1, T0 + timedelta(minutes=1), claim_as("r"))] == [jobs[0].id]


# -- queries -----------------------------------------------------------------------------------


def test_list_pages_in_creation_order_with_a_cursor(store):
    jobs = [store.create(make_job()) for _ in range(7)]
    page1, cursor = store.list(JobFilter(), None, 3)
    page2, cursor2 = store.list(JobFilter(), cursor, 3)
    page3, cursor3 = store.list(JobFilter(), cursor2, 3)
    assert [j.id for j in page1 + page2 + page3] == [j.id for j in jobs]
    assert cursor3 is None


def test_time_queries_answer_from_the_index(store):
    pending = store.create(make_job(at=T0))
    running = store.create(make_job(at=T0))
    done = store.create(make_job(at=T0))
    store.update(running.id, claim_as("w", T0, lease=10))
    store.update(done.id, set_status("completed", T0 + timedelta(seconds=5)))
    assert store.lapsed(T0 + timedelta(seconds=9), 10) == []
    assert store.lapsed(T0 + timedelta(seconds=11), 10) == [running.id]
    assert store.pending_available_before(T0 + timedelta(seconds=1), 10) == [pending.id]
    assert store.pending_available_before(T0, 10) == []
    assert store.finished_before(T0 + timedelta(seconds=6), 10) == [done.id]
    assert store.finished_before(T0 + timedelta(seconds=5), 10) == []


def test_stats_count_by_status_and_type_with_oldest_pending_and_workers(store):
    store.create(make_job("audio", T0))
    store.create(make_job("video", T0 + timedelta(seconds=3)))
    running = store.create(make_job("video", T0 + timedelta(seconds=4)))
    store.update(running.id, claim_as("gpu-1", T0 + timedelta(seconds=6)))
    stats = store.stats()
    assert stats.counts == {("pending", "audio"): 1, ("pending", "video"): 1, ("processing", "video"): 1}
    assert stats.oldest_pending_created_at == T0
    assert stats.worker_last_seen == {"gpu-1": T0 + timedelta(seconds=6)}


# -- damage a crash or a hand edit can leave ---------------------------------------------------


def plant(data_dir: Path, status: str, job: RemoteJob, version: int) -> Path:
    job = job.copy()
    job.status = status
    job.version = version
    path = data_dir / status / f"{job.id}.json"
    path.write_text(json.dumps(job.to_dict()))
    return path


def test_a_job_left_in_two_directories_reads_as_its_newest_copy(store, data_dir):
    job = store.create(make_job())
    store.update(job.id, claim_as("w1"))
    plant(data_dir, "pending", job, version=1)  # the old copy a crash did not remove
    assert store.get(job.id).status == "processing"
    store.update(job.id, set_status("completed"))
    assert files_of(data_dir, job.id) == ["completed"]


@pytest.mark.parametrize("write", ["locked", "staged"])
def test_an_old_copy_left_by_a_writer_of_another_process_goes_with_the_next_write(data_dir, write):
    mover, other = FileJobStore(data_dir), FileJobStore(data_dir)
    job = mover.create(make_job())
    assert other.get(job.id).status == "pending"
    other.stats()  # this one's catalog knows the job as pending
    mover.update(job.id, claim_as("w1"))
    plant(data_dir, "pending", job, version=1)  # the mover died before removing its old copy
    # the other learns the move from the journal, so it looks for the copy the move left behind
    mutate = set_status("completed") if write == "locked" else pure(set_status("completed"))
    assert other.update(job.id, mutate).status == "completed"
    assert files_of(data_dir, job.id) == ["completed"]


def test_a_catalog_built_over_a_job_in_two_directories_removes_the_old_copy_on_the_next_write(data_dir):
    store = FileJobStore(data_dir)
    job = store.create(make_job())
    store.update(job.id, claim_as("w1"))
    plant(data_dir, "pending", job, version=1)
    fresh = FileJobStore(data_dir)  # a process started after the crash: it scans both folders
    assert fresh.get(job.id).status == "processing"
    fresh.update(job.id, pure(set_status("completed")))
    assert files_of(data_dir, job.id) == ["completed"]
    assert fresh.update(job.id, pure(set_status("failed"))).status == "failed"  # nothing left to look for
    assert files_of(data_dir, job.id) == ["failed"]


@pytest.mark.parametrize("content", [b"{trunc", b"[1, 2]", b'{"id": "someone-else"}', b"\xff\xfe"])
def test_a_corrupt_file_does_not_stop_the_store(store, data_dir, content):
    good = store.create(make_job())
    bad_id = new_job_id()
    (data_dir / "pending" / f"{bad_id}.json").write_bytes(content)
    fresh = FileJobStore(data_dir)
    assert [j.id for j in fresh.list(JobFilter(), None, 10)[0]] == [good.id]
    with pytest.raises(JobNotFound):
        fresh.get(bad_id)
    assert [j.id for j in fresh.claim(["audio"], 5, T0, claim_as("w"))] == [good.id]


def test_a_record_with_an_unknown_status_is_corrupt(store, data_dir):
    job = make_job()
    record = job.to_dict()
    record["status"] = "exploded"
    (data_dir / "pending" / f"{job.id}.json").write_text(json.dumps(record))
    with pytest.raises(JobNotFound):
        FileJobStore(data_dir).get(job.id)


def test_fsck_finds_and_repairs_each_kind_of_damage(store, data_dir):
    dup = store.create(make_job())
    store.update(dup.id, claim_as("w"))
    plant(data_dir, "pending", dup, version=1)
    misplaced = store.create(make_job())
    moved = data_dir / "failed" / f"{misplaced.id}.json"
    os.replace(data_dir / "pending" / f"{misplaced.id}.json", moved)
    (data_dir / "pending" / f"{TEMP_PREFIX}x.json.1.2").write_text("half")
    corrupt_id = new_job_id()
    (data_dir / "completed" / f"{corrupt_id}.json").write_text("{")

    found = fsck(store)
    assert sorted(f.kind for f in found) == ["corrupt", "duplicate", "misplaced", "temp"]
    assert not any(f.repaired for f in found)
    assert files_of(data_dir, dup.id) == ["pending", "processing"]

    repaired = fsck(store, repair=True)
    assert all(f.repaired for f in repaired) and len(repaired) == 4
    assert fsck(store) == []
    assert files_of(data_dir, dup.id) == ["processing"]
    assert files_of(data_dir, misplaced.id) == ["pending"]
    assert temp_files(data_dir) == []
    assert [p.name.split(".")[0] for p in (data_dir / "corrupt").iterdir()] == [f"completed-{corrupt_id}"]
    assert store.get(misplaced.id).status == "pending"
    assert FileJobStore(data_dir).stats().counts == {("processing", "audio"): 1, ("pending", "audio"): 1}


# -- change notification -----------------------------------------------------------------------


def test_wait_for_change_wakes_when_another_store_object_writes(data_dir):
    waiter, writer = FileJobStore(data_dir, watch_interval=0.01), FileJobStore(data_dir)
    woke: list[bool] = []
    thread = threading.Thread(target=lambda: woke.append(waiter.wait_for_change(30)))
    thread.start()
    for _ in range(600):  # bounded: the watcher may start after the first write, so keep writing
        writer.create(make_job())
        thread.join(timeout=0.05)
        if not thread.is_alive():
            break
    assert woke == [True]


def test_wait_for_change_times_out_when_nothing_happens(store):
    assert store.wait_for_change(0.01) is False


def test_a_copy_of_a_job_shares_no_nested_value_with_it():
    job = make_job(extra={"tags": {"a", "b"}})
    job.task_options = {"lang": ["de", "en"], "opts": {"beam": 5}}
    job.result_data = {"content": "text", "metadata": {"pages": [1, 2]}}
    clone = job.copy()
    assert clone == job and clone is not job
    clone.task_options["lang"].append("fr")
    clone.task_options["opts"]["beam"] = 1
    clone.result_data["metadata"]["pages"].clear()
    clone.extra["tags"].add("c")  # not a JSON value: copied all the same
    assert job.task_options == {"lang": ["de", "en"], "opts": {"beam": 5}}
    assert job.result_data["metadata"] == {"pages": [1, 2]}
    assert job.extra == {"tags": {"a", "b"}}


def test_a_job_record_larger_than_one_read_comes_back_whole(store):
    content = "x" * (3 * 64 * 1024 + 17)  # a long conversion result: several reads of the file
    job = store.create(make_job())
    store.update(job.id, set_status("completed"))

    def with_result(j: RemoteJob) -> RemoteJob:
        j.result_data = {"content": content, "metadata": {}}
        return j

    store.update(job.id, with_result)
    assert FileJobStore(store.root).get(job.id).result_data["content"] == content


def test_a_claim_whose_rename_fails_leaves_the_job_pending_and_no_temp_file(store, data_dir):
    job = store.create(make_job())
    (data_dir / "processing").rmdir()  # the rename into it fails (ENOENT)
    with pytest.raises(FileNotFoundError):
        store.claim(["audio"], 1, T0, claim_as("w1"))
    assert files_of(data_dir, job.id) == ["pending"]
    assert os.listdir(data_dir / ".incoming") == []
    (data_dir / "processing").mkdir()
    assert [j.id for j in store.claim(["audio"], 1, T0, claim_as("w1"))] == [job.id]
    assert files_of(data_dir, job.id) == ["processing"]


def test_a_claim_that_finds_only_a_job_in_backoff_leaves_no_temp_file(store, data_dir):
    job = store.create(make_job(available_at=T0 + timedelta(seconds=60)))  # pending, not yet due
    store.stats()  # this process now knows an audio job is pending
    assert store.claim(["audio"], 1, T0, claim_as("w1")) == []
    assert os.listdir(data_dir / ".incoming") == []
    assert [j.id for j in store.claim(["audio"], 1, T0 + timedelta(seconds=61), claim_as("w1"))] == [job.id]
    assert os.listdir(data_dir / ".incoming") == []
    assert files_of(data_dir, job.id) == ["processing"]


def test_a_claim_refused_by_its_mutator_leaves_no_temp_file(store, data_dir):
    job = store.create(make_job())

    def refuse(j: RemoteJob) -> RemoteJob:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        store.claim(["audio"], 1, T0, refuse)
    assert os.listdir(data_dir / ".incoming") == []
    assert files_of(data_dir, job.id) == ["pending"]
