"""Crash-safe file primitives (after CPython's mailbox.Maildir): temp file, fsync, rename.

The rename is the commit point: a reader sees the old bytes or the new ones, never half a file, and
a crash at any instant leaves at most a temp file behind (``TEMP_PREFIX``), which fsck removes.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import threading
import time
import weakref
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

TEMP_PREFIX = ".tmp-"
READ_CHUNK = 64 * 1024


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spares(Protocol):
    """Retired files that may be overwritten instead of creating new ones (the file backend's
    ``store/files/recycle.py``)."""

    def take(self) -> str | None:
        """The path of a spare file this process may overwrite, or None when it has none."""


def stage(folder: str | os.PathLike, name: str, data: bytes, reuse: Spares | None = None) -> str:
    """A new temp file in ``folder`` holding ``data``, fsynced: ready to be renamed into place.

    The caller renames it (the commit point) or removes it; on failure here it is removed. The temp
    name carries random bytes besides the pid: a process killed mid-write leaves its temp file
    behind, and a later process given the same pid must not find its name taken. With ``reuse``,
    a spare file is overwritten instead when the recycler has one (see ``store/files/recycle.py``).
    """
    tmp, fd = stage_open(folder, name, data, sync=True, reuse=reuse)
    os.close(fd)
    return tmp


def stage_open(folder: str | os.PathLike, name: str, data: bytes, *, sync: bool,
               reuse: Spares | None = None) -> tuple[str, int]:
    """:func:`stage`, fsynced only when ``sync``, and the temp file's descriptor left open: for a
    caller that renames the file at once and fsyncs the descriptor later, before it reports the
    write as done, then closes it. On failure here the file is removed and the descriptor closed.

    ``reuse`` only with ``sync``: a spare holds another record until the new bytes are on disk, so
    it may be renamed into place only once they are (``store/files/recycle.py``)."""
    if reuse is not None and not sync:
        raise ValueError("a reused file must be fsynced before it is renamed into place")
    tmp, fd = _reused(reuse) if reuse is not None else (None, -1)
    if tmp is None:
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        if reuse is not None:
            os.ftruncate(fd, len(data))  # the spare's old record may have been longer
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    return tmp, fd


def _reused(recycler: Spares) -> tuple[str | None, int]:
    """A spare file opened for writing (not truncated: its block is overwritten in place), or
    (None, -1) when the recycler has none left that can still be opened."""
    while True:
        path = recycler.take()
        if path is None:
            return None, -1
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:  # removed or made unwritable by hand (another user's file): the next one
            with suppress(OSError):
                os.unlink(path)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # os.write may write less than asked: never commit a short file
        view = view[os.write(fd, view):]


def write_atomic(path: str | os.PathLike, data: bytes, *, sync_dir: bool = True) -> None:
    """Replace ``path`` with ``data`` durably (a staged temp file renamed over it); on any failure
    the temp file is removed."""
    folder, name = os.path.split(os.fspath(path))
    folder = folder or os.curdir
    tmp = stage(folder, name, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink_quietly(tmp)
        raise
    if sync_dir:
        fsync_dir(folder)


def write_json_atomic(path: Path, value: Any) -> None:
    write_atomic(path, json.dumps(value, separators=(",", ":"), sort_keys=True).encode())


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file, read with plain system calls: open, read until end of file, close.

    ``open(path, "rb").read()`` makes nine calls for a small file (it also stats the file twice,
    asks whether it is a terminal and seeks twice); a job store reads several files per request.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _read_to_end(fd)
    finally:
        os.close(fd)


def _read_to_end(fd: int) -> bytes:
    chunks = []
    while True:
        chunk = os.read(fd, READ_CHUNK)
        if not chunk:
            break
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_json(path: str | os.PathLike) -> Any:
    """The parsed file; FileNotFoundError when absent, ValueError when it is not valid JSON."""
    return json.loads(read_bytes(path))


def read_committed(path: str | os.PathLike) -> bytes:
    """:func:`read_bytes` for a file that may be moved away and overwritten while it is read (a
    job file read without the store lock: a move retires the old copy to be reused, see
    ``store/files/recycle.py``). FileNotFoundError when the file is gone, or when what was read is not what
    ``path`` holds now: the name points at another file, or the file was renamed or written
    meanwhile (its inode change time moved; a rename and every write set it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        data = _read_to_end(fd)
    finally:
        os.close(fd)
    after = os.stat(path)
    if (after.st_ino, after.st_dev, after.st_ctime_ns) != (before.st_ino, before.st_dev, before.st_ctime_ns):
        raise FileNotFoundError(errno.ENOENT, "replaced while it was read", os.fspath(path))
    return data


def unlink_quietly(path: str | os.PathLike) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


class LockTimeout(TimeoutError):
    """A :class:`FileLock` that could not be had within its bound."""

    def __init__(self, path: Path, exclusive: bool, waited: float, holders: list[int]) -> None:
        who = f" (held by pid {', '.join(map(str, holders))})" if holders else ""
        super().__init__(f"{path} could not be locked in {waited:.1f} s{who}")
        self.path = path
        self.exclusive = exclusive
        self.waited = waited
        self.holders = holders


# Waiting for a lock another process holds: retry a non-blocking flock after sleeps that grow from
# FIRST_RETRY to LAST_RETRY seconds. The first retries come soon (the store lock is held for well
# under a millisecond at a time), the later ones rarely, so a waiter costs no core.
FIRST_RETRY = 0.0002
LAST_RETRY = 0.01


class FileLock:
    """An exclusive/shared lock across processes (``flock``) and threads (a mutex) on one file.

    Re-entrant within a thread: only the outermost ``hold`` takes and releases the flock, so a
    nested hold has the outermost one's kind: a shared hold inside an exclusive one stays exclusive,
    and an exclusive hold inside a shared one is a RuntimeError (it cannot be had without letting
    go, and going on shared would let another process write in between). The file is reopened
    after a fork, because a flock belongs to an open file description.

    With a ``timeout`` (seconds), a hold that cannot be had within it (the mutex and the flock
    together) raises :class:`LockTimeout`, or what ``on_timeout`` makes of it, instead of waiting
    for as long as another process holds the lock (a process that is stopped, SIGSTOP or a
    debugger, holds it for ever; one that dies lets go, the kernel releases its flock). The
    uncontended case is one non-blocking ``flock``, as cheap as a blocking one.
    """

    def __init__(self, path: Path, timeout: float | None = None,
                 on_timeout: Callable[[LockTimeout], BaseException] | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self.on_timeout = on_timeout
        self._mutex = threading.RLock()
        self._fd: int | None = None
        self._pid: int | None = None
        self._depth = 0
        self._exclusive = False
        self._owner: int | None = None  # the thread that holds it

    def _descriptor(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            self._pid = os.getpid()
            weakref.finalize(self, _close_in, self._pid, self._fd)  # a lock dropped drops its file
        return self._fd

    @contextmanager
    def hold(self, exclusive: bool = True) -> Iterator[None]:
        timeout = self.timeout
        started = time.monotonic() if timeout is not None else 0.0
        if timeout is None:
            self._mutex.acquire()
        elif not self._mutex.acquire(timeout=max(timeout, 0.0)):
            self.timed_out(exclusive, started)
        try:
            outermost = self._depth == 0
            if not outermost and exclusive and not self._exclusive:
                raise RuntimeError(f"an exclusive hold of {self.path} inside a shared one")
            if outermost:
                fd = self._descriptor()
                self._flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, started)
                self._exclusive = exclusive
                self._owner = threading.get_ident()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if outermost:
                    self._owner = None
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._mutex.release()

    def _flock(self, fd: int, mode: int, started: float) -> None:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if self.timeout is None:
            while True:
                try:
                    fcntl.flock(fd, mode)
                    return
                except OSError as exc:  # pragma: no cover - EINTR from a signal
                    if exc.errno != errno.EINTR:
                        raise
        deadline = started + self.timeout
        delay = FIRST_RETRY
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.timed_out(mode == fcntl.LOCK_EX, started)
            time.sleep(min(delay, left))
            delay = min(delay * 2, LAST_RETRY)
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                continue

    def timed_out(self, exclusive: bool, started: float) -> None:
        """Raise the error of a hold that could not be had since ``started`` (a monotonic time)."""
        error = LockTimeout(self.path, exclusive, time.monotonic() - started, self.holders())
        raise (self.on_timeout(error) if self.on_timeout is not None else error)

    def holders(self) -> list[int]:
        """The pids that hold the lock now, as the kernel's /proc/locks says (best effort: empty
        when it cannot be read, and a pid from another pid namespace is that namespace's)."""
        return lock_holders(self.path)

    def held(self) -> bool:
        """Whether the calling thread holds the lock (shared or exclusive)."""
        return self._owner == threading.get_ident()


def lock_holders(path: str | os.PathLike) -> list[int]:
    """The pids holding a flock or POSIX lock on the file at ``path`` (from /proc/locks)."""
    try:
        st = os.stat(path)
        with open("/proc/locks", "rb") as f:
            lines = f.read().decode("ascii", "replace").splitlines()
    except OSError:
        return []
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] == "->":  # "->": a waiter, not a holder
            continue
        if fields[5] == wanted and fields[4].isdigit():
            pids.append(int(fields[4]))
    return sorted(set(pids))


def _close_in(pid: int, fd: int) -> None:
    """Close ``fd`` if this is the process that opened it (a forked child has its own descriptor)."""
    if os.getpid() == pid:
        os.close(fd)
