"""Removing the copy a move left behind, once the new copy is durable: in batches.

A job moving between status directories exists in both for a moment: the new file is renamed into
place under the store lock, its directory is fsynced after the lock is released, and only then may
the old file go (under the lock again, and only if it is still the version that was replaced). If
every request took the lock a second time for its own old file, that second turn would cost as much
as the first; instead the requests of a process queue their old files here and the first one to
find work queued removes everyone's in one turn of the lock (a leader/follower "group commit"),
while the others wait for it, so every request still answers only once its old copy is gone.

Under the lock an old copy is only renamed aside, into the store's spare folder (a name no one
else knows); once the lock is released, its old directory is fsynced and the file handed to the
:class:`~.recycle.Recycler`, to be overwritten by a later write instead of a new file being created
(or unlinked when it has enough).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterable

import structlog

from ...exceptions import StoreBusy
from ...fileio import FileLock, fsync_dir, read_json
from .recycle import Recycler

log = structlog.get_logger(__name__)

StaleCopy = tuple[str | os.PathLike, int]  # the old file and the version it held when it was replaced


class StaleCopies:
    def __init__(self, lock: FileLock, recycler: Recycler) -> None:
        self._lock = lock
        self._recycler = recycler
        self._cond = threading.Condition()
        self._queue: list[StaleCopy] = []
        self._queued = 0      # how many copies were ever queued (a sequence number)
        self._handled = 0     # every copy queued up to this number has been handled
        self._leading = False

    def remove(self, copies: Iterable[StaleCopy]) -> None:
        """Remove ``copies`` (or see another request remove them) before returning."""
        items = list(copies)
        with self._cond:
            self._queue.extend(items)
            self._queued += len(items)
            mine = self._queued
            while self._handled < mine:
                if not self._leading:
                    self._leading = True
                    batch, self._queue = self._queue, []
                    upto = self._queued
                    break
                self._cond.wait()
            else:
                return
        try:
            self._remove(batch)
        finally:
            with self._cond:
                self._handled = upto
                self._leading = False
                self._cond.notify_all()

    def _remove(self, batch: list[StaleCopy]) -> None:
        """Remove the copies still at their replaced version: renamed into the spare folder under
        the lock; once it is released, their old directories are fsynced and the files handed to
        the recycler. The fsync comes before any reuse: were a spare overwritten while its old name
        could still come back after a power loss, that name would point at the new bytes. (Without
        reuse, a copy that comes back is the older version, which readers pass over for the newer
        and fsck removes.)"""
        aside: list[str] = []
        folders: dict[str, None] = {}
        try:
            with self._lock.hold():  # StoreBusy only here, before anything is moved
                for path, version in batch:
                    found = version_at(path)
                    if found is not None and found <= version:
                        name = self._recycler.name()
                        with contextlib.suppress(FileNotFoundError):
                            os.rename(path, name)
                            aside.append(name)
                            folders[os.path.dirname(os.fspath(path))] = None
        except StoreBusy:
            # the changes are durable already and answered as done; an older copy left beside its
            # newer one is passed over by every reader, and removed by the job's next change or fsck
            log.warning("store.stale_copies_left", copies=len(batch))
        finally:
            if aside:
                try:
                    for folder in folders:
                        fsync_dir(folder)
                except BaseException:
                    self._recycler.discard(aside)
                    raise
                self._recycler.keep_files(aside)


def version_at(path: str | os.PathLike) -> int | None:
    """The version of the job file at ``path``; None when it is gone or unreadable."""
    try:
        version = read_json(path).get("version")
    except (FileNotFoundError, ValueError, AttributeError):
        return None
    return version if isinstance(version, int) else None

