"""Old copies of moved jobs are overwritten by later writes instead of new files being created.

Counted, not timed: the files the store creates (``open`` with ``O_CREAT``, seen by an audit hook).
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import pytest
from structlog.testing import capture_logs

from morag_remote.fileio import read_committed, stage, stage_open
from morag_remote.store.base import pure
from morag_remote.store.files.jobs import FileJobStore, load_job_file
from morag_remote.store.files.fsck import fsck
from morag_remote.store.files.recycle import SPARE_DIR, Recycler, recycler_for
from test_store_performance import NOW, claim_mutator, complete_mutator, make_job

_created: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    """Files created for records (a store object also opens, creating if need be, its lock file)."""
    if _created is not None and event == "open" and args[2] is not None and args[2] & os.O_CREAT:
        path = os.fspath(args[0])
        if not path.endswith("/.lock"):
            _created.append(path)


sys.addaudithook(_audit)


@contextmanager
def created_files() -> Iterator[list[str]]:
    global _created
    _created = []
    try:
        yield _created
    finally:
        _created = None


def cycle(store: FileJobStore) -> None:
    job = make_job()
    store.create(job)
    (claimed,) = store.claim(["audio"], 1, NOW, claim_mutator)
    store.update(claimed.id, pure(complete_mutator))


def test_after_the_first_cycles_only_claims_create_files(tmp_path):
    store = FileJobStore(tmp_path / "data")
    for _ in range(3):
        cycle(store)
    with created_files() as created:
        for _ in range(10):
            cycle(store)
    assert len(created) == 10  # one per claim; the create and the result overwrite spares
    assert all(".incoming" in path for path in created)
    assert len(os.listdir(store.root / SPARE_DIR)) == 1
    assert fsck(store) == []
    completed = sorted((store.root / "completed").iterdir())
    assert len(completed) == 13
    for path in completed:  # every record whole, under its own name
        assert load_job_file(path).status == "completed"


def test_a_reused_file_holds_exactly_the_new_bytes(tmp_path):
    recycler = Recycler(tmp_path / "spare")
    (tmp_path / "spare").mkdir()
    old = recycler.name()
    with open(old, "wb") as fh:
        fh.write(b"x" * 5000)
    recycler.keep_files([old])
    path = stage(str(tmp_path), "job.json", b'{"short":1}', reuse=recycler)
    assert path == old
    assert open(path, "rb").read() == b'{"short":1}'
    assert recycler.take() is None


def test_a_spare_is_only_used_by_a_write_fsynced_before_its_rename(tmp_path):
    recycler = Recycler(tmp_path)
    with pytest.raises(ValueError):
        stage_open(str(tmp_path), "job.json", b"{}", sync=False, reuse=recycler)


def test_a_spare_removed_by_hand_is_passed_over(tmp_path):
    recycler = Recycler(tmp_path / "spare")
    (tmp_path / "spare").mkdir()
    gone, kept = recycler.name(), recycler.name()
    for path in (gone, kept):
        open(path, "wb").close()
    recycler.keep_files([kept, gone])
    os.unlink(gone)
    assert stage(str(tmp_path), "a.json", b"a", reuse=recycler) == kept
    fresh = stage(str(tmp_path), "b.json", b"b", reuse=recycler)  # none left: a new file
    assert os.path.dirname(fresh) == str(tmp_path) and open(fresh, "rb").read() == b"b"


def test_spares_beyond_the_limit_are_unlinked(tmp_path):
    recycler = Recycler(tmp_path, keep=2)
    paths = [recycler.name() for _ in range(5)]
    for path in paths:
        open(path, "wb").close()
    recycler.keep_files(paths)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths[:2])


def _leave_spares(folder: str, n: int) -> None:
    recycler = Recycler(folder)
    paths = [recycler.name() for _ in range(n)]
    for path in paths:
        open(path, "wb").close()
    recycler.keep_files(paths)
    os._exit(0)


def spares_of_a_dead_process(tmp_path, n: int):
    """A spare folder holding ``n`` spares of a process that has exited."""
    folder = tmp_path / "spare"
    folder.mkdir()
    child = multiprocessing.get_context("fork").Process(target=_leave_spares, args=(str(folder), n))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    return folder


def test_spares_of_a_process_that_is_gone_are_adopted_those_of_a_live_one_are_not(tmp_path):
    folder = spares_of_a_dead_process(tmp_path, 3)
    live = folder / "1.cafe"  # pid 1 is always alive
    live.write_bytes(b"")
    recycler = Recycler(folder)
    adopted = [recycler.take() for _ in range(3)]
    assert all(p is not None and os.path.basename(p).startswith(f"{os.getpid()}.") for p in adopted)
    assert recycler.take() is None
    assert live.exists()


def _take_in_child(recycler: Recycler, out) -> None:
    out.put(recycler.take())


def test_a_forked_child_does_not_use_its_parents_spares(tmp_path):
    recycler = Recycler(tmp_path)
    path = recycler.name()
    open(path, "wb").close()
    recycler.keep_files([path])
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_take_in_child, args=(recycler, out))
    child.start()
    assert out.get(timeout=30) is None
    child.join(30)
    assert recycler.take() == path


def test_store_objects_of_one_directory_share_its_spares(tmp_path):
    store = FileJobStore(tmp_path / "data")
    cycle(store)
    # the claim left the pending copy, the result overwrote it and left the processing copy
    assert len(os.listdir(store.root / SPARE_DIR)) == 1
    other = FileJobStore(tmp_path / "data")
    with created_files() as created:
        other.create(make_job())
    assert created == []


def test_a_new_process_with_a_dead_ones_pid_adopts_its_spares(tmp_path):
    folder = tmp_path / "spare"
    folder.mkdir()
    leftover = folder / f"{os.getpid()}.beef"  # left by an earlier process that had this pid
    leftover.write_bytes(b"old")
    recycler = recycler_for(folder)
    path = recycler.take()
    assert path is not None and os.path.exists(path) and not leftover.exists()


@contextmanager
def before_first_read(action) -> Iterator[None]:
    """Run ``action`` once, just before the next ``os.read`` (what a thread that lost the GIL
    between opening a file and reading it would see)."""
    real_read = os.read
    pending = [action]

    def read(fd: int, n: int) -> bytes:
        if pending:
            pending.pop()()
        return real_read(fd, n)

    os.read = read
    try:
        yield
    finally:
        os.read = real_read


def test_a_file_replaced_by_another_while_it_is_read_is_not_returned(tmp_path):
    path, spare = tmp_path / "x.json", tmp_path / "spare"
    path.write_bytes(b'{"id":"x"}')

    def retire_and_reuse() -> None:
        os.rename(path, spare)
        spare.write_bytes(b'{"id":"y"}')

    with before_first_read(retire_and_reuse), pytest.raises(FileNotFoundError):
        read_committed(path)


def test_a_file_rewritten_in_place_while_it_is_read_is_not_returned(tmp_path):
    path, aside = tmp_path / "x.json", tmp_path / "aside"
    path.write_bytes(b'{"id":"x","version":1}')

    def retire_reuse_and_return() -> None:  # the same inode, back under the same name
        os.rename(path, aside)
        aside.write_bytes(b'{"id":"x","version":3}')
        os.rename(aside, path)

    with before_first_read(retire_reuse_and_return), pytest.raises(FileNotFoundError):
        read_committed(path)
    assert read_committed(path) == b'{"id":"x","version":3}'


def test_a_read_without_the_lock_that_races_a_move_and_a_reuse_finds_the_job_where_it_is_now(tmp_path):
    store = FileJobStore(tmp_path / "data")
    cycle(store)  # one spare now
    job = make_job()
    store.create(job)  # overwrites the spare: none left
    other = make_job()

    def claim_then_create() -> None:  # the pending copy is retired, then overwritten by `other`
        (claimed,) = store.claim(["audio"], 1, NOW, claim_mutator)
        assert claimed.id == job.id
        store.create(other)

    with capture_logs() as logs, before_first_read(claim_then_create):
        found = store.get(job.id)
    assert (found.id, found.status) == (job.id, "processing")
    assert not [e for e in logs if e["event"] == "store.corrupt_file"]
    assert store.get(other.id).status == "pending"


def test_a_spare_that_cannot_be_opened_is_passed_over(tmp_path):
    recycler = Recycler(tmp_path / "spare")
    (tmp_path / "spare").mkdir()
    blocked = recycler.name()
    os.mkdir(blocked)  # not a file: opening it for writing fails (EISDIR)
    recycler.keep_files([blocked])
    path = stage(str(tmp_path), "a.json", b"a", reuse=recycler)
    assert os.path.dirname(path) == str(tmp_path) and open(path, "rb").read() == b"a"
    assert recycler.take() is None


def test_adopted_spares_beyond_the_limit_are_unlinked(tmp_path):
    folder = spares_of_a_dead_process(tmp_path, 5)
    recycler = Recycler(folder, keep=2)
    recycler.adopt()
    assert len(os.listdir(folder)) == 2
    assert recycler.take() is not None and recycler.take() is not None and recycler.take() is None


def test_a_recycler_without_its_folder_has_nothing_to_give(tmp_path):
    recycler = Recycler(tmp_path / "missing")
    assert recycler.take() is None


def test_discarded_spares_are_unlinked(tmp_path):
    recycler = Recycler(tmp_path)
    paths = [recycler.name() for _ in range(2)]
    for path in paths:
        open(path, "wb").close()
    recycler.discard(paths)
    assert os.listdir(tmp_path) == [] and recycler.take() is None
