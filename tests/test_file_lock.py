"""FileLock: an exclusive hold keeps every other process out (shared or exclusive), a shared hold
lets other readers in, and asking for an exclusive hold inside a shared one is an error rather than
a hold that silently stays shared."""
from __future__ import annotations

import fcntl
import gc
import multiprocessing
import os
import threading
from pathlib import Path

import pytest

from morag_remote.fileio import FileLock


def _try_lock(path: str, exclusive: bool, out) -> None:
    """Runs in another process: whether a non-blocking flock of the kind asked for is granted now."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        out.put(False)
    else:
        out.put(True)
    finally:
        os.close(fd)


def other_process_gets(path: Path, exclusive: bool) -> bool:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_try_lock, args=(str(path), exclusive, out))
    proc.start()
    granted = out.get(timeout=60)
    proc.join(60)
    assert proc.exitcode == 0
    return granted


@pytest.fixture
def lock(tmp_path: Path) -> FileLock:
    return FileLock(tmp_path / ".lock")


def test_an_exclusive_hold_keeps_other_processes_out(lock):
    with lock.hold(exclusive=True):
        assert other_process_gets(lock.path, exclusive=False) is False
        assert other_process_gets(lock.path, exclusive=True) is False
    assert other_process_gets(lock.path, exclusive=True) is True


def test_a_shared_hold_lets_other_readers_in_but_not_writers(lock):
    with lock.hold(exclusive=False):
        assert other_process_gets(lock.path, exclusive=False) is True
        assert other_process_gets(lock.path, exclusive=True) is False


def test_a_shared_hold_nested_in_an_exclusive_one_stays_exclusive(lock):
    with lock.hold(exclusive=True):
        with lock.hold(exclusive=False):
            assert other_process_gets(lock.path, exclusive=False) is False


def test_an_exclusive_hold_nested_in_a_shared_one_is_a_runtime_error(lock):
    with lock.hold(exclusive=False):
        with pytest.raises(RuntimeError, match="exclusive"):
            with lock.hold(exclusive=True):
                pass  # pragma: no cover - never entered
        assert other_process_gets(lock.path, exclusive=False) is True  # still held, still shared
    assert other_process_gets(lock.path, exclusive=True) is True  # and released at the end


def test_a_lock_no_longer_referenced_closes_its_file(tmp_path):
    """Every app opens a few locks; a process that makes many (the test suite) must not run out."""
    path = tmp_path / ".lock"
    lock = FileLock(path)
    with lock.hold():
        fd = lock._fd
    assert os.readlink(f"/proc/self/fd/{fd}") == str(path)
    del lock
    gc.collect()
    assert not os.path.exists(f"/proc/self/fd/{fd}") or os.readlink(f"/proc/self/fd/{fd}") != str(path)


def test_held_says_whether_the_calling_thread_holds_the_lock(lock):
    seen: list[bool] = []
    assert not lock.held()
    with lock.hold(exclusive=False):
        assert lock.held()
        other = threading.Thread(target=lambda: seen.append(lock.held()))
        other.start()
        other.join(10)
        with lock.hold(exclusive=False):
            assert lock.held()
        assert lock.held()  # still the outer hold's
    assert seen == [False] and not lock.held()
