"""Job files that moves leave behind, kept to be written again instead of creating new files.

Every move of a job between status directories makes a new file and, once that is durable, drops
the old one. Creating a file is the dearest step a filesystem takes on the store's hot path: on the
ext4 of the machines we measured on, creating and first writing a small file cost 0.1-1 ms of
kernel time (the inode and block allocators searching their groups), and dropping one frees its
block, which a filesystem mounted with ``discard`` trims on the disk. Overwriting a file that
exists costs neither. So the old copies are renamed into ``<data>/.spare/`` and reused, by the
process that retired them, for the next record written and fsynced before its rename (creates,
results, heartbeats).

A spare holds an old record of some job. That is harmless only where the new content is durable
before the name points at it: :func:`~.atomic.stage_open` overwrites the spare, truncates it to
the new length and fsyncs it, and only then does the caller rename it into place. A record renamed
before its fsync (a claim) always goes to a new, empty file: a power loss can leave it damaged, but
on a filesystem that writes new blocks' data before pointing a file at them (ext4's default
``data=ordered``, xfs) not holding another job's bytes, which an overwrite in place could.

Spares are named ``<pid>.<random>``: a process uses only the ones it holds in memory (one
:class:`Recycler` per folder and process, from :func:`recycler_for`), and on first use adopts the
ones of processes that are gone (by renaming them to a name of its own, so that two adopters never
share one). At most ``keep`` per process; more are unlinked.
"""
from __future__ import annotations

import collections
import os
import secrets
import threading
import weakref

from ...fileio import unlink_quietly

SPARE_DIR = ".spare"
KEEP = 64  # per process: a cycle retires two files and reuses two, so a few dozen absorb bursts


class Recycler:
    def __init__(self, folder: str | os.PathLike, keep: int = KEEP) -> None:
        self.folder = os.fspath(folder)
        self.keep = keep
        self._lock = threading.Lock()
        self._spares: collections.deque[str] = collections.deque()
        self._pid: int | None = None

    def name(self) -> str:
        """A new path in the spare folder that no other process or thread uses."""
        with self._lock:
            self._own()
            return self._name()

    def _name(self) -> str:
        return os.path.join(self.folder, f"{os.getpid()}.{secrets.token_hex(6)}")

    def keep_files(self, paths: list[str]) -> None:
        """Take over ``paths`` (files in the spare folder, named by :meth:`name`): kept for reuse
        up to ``keep``, the rest unlinked."""
        with self._lock:
            self._own()
            extra = self._admit(paths)
        self.discard(extra)

    def discard(self, paths: list[str]) -> None:
        """Unlink ``paths`` (files named by :meth:`name`) instead of keeping them."""
        for path in paths:
            unlink_quietly(path)

    def adopt(self) -> None:
        """Adopt the spares of processes that are gone now (else on first use)."""
        with self._lock:
            self._own()

    def _admit(self, paths: list[str]) -> list[str]:
        """Keep ``paths`` up to ``keep``; the ones left over (caller holds ``_lock``)."""
        room = max(self.keep - len(self._spares), 0)
        self._spares.extend(paths[:room])
        return paths[room:]

    def take(self) -> str | None:
        """A spare's path, now the caller's to overwrite and rename away (or unlink); None when
        this process has none."""
        with self._lock:
            self._own()
            return self._spares.pop() if self._spares else None

    def _own(self) -> None:
        """After a fork, forget the parent's spares (they are its own); on a process's first use,
        adopt the spares of processes that are gone (and of an earlier process that had this pid).
        Caller holds ``_lock``."""
        pid = os.getpid()
        if self._pid == pid:
            return
        self._pid = pid
        self._spares.clear()
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return
        adopted = []
        for entry in names:
            owner = entry.split(".", 1)[0]
            if not owner.isdigit() or (int(owner) != pid and _alive(int(owner))):
                continue
            path = self._name()
            try:
                os.rename(os.path.join(self.folder, entry), path)
            except FileNotFoundError:  # another process adopted it first
                continue
            adopted.append(path)
        self.discard(self._admit(adopted))


_recyclers: "weakref.WeakValueDictionary[str, Recycler]" = weakref.WeakValueDictionary()
_recyclers_lock = threading.Lock()


def recycler_for(folder: str | os.PathLike) -> Recycler:
    """The process's recycler of ``folder``: every store object of one directory shares it, so that
    one of them adopting this process's spares never takes a file another is writing."""
    key = os.path.realpath(folder)
    with _recyclers_lock:
        recycler = _recyclers.get(key)
        if recycler is None:
            recycler = _recyclers[key] = Recycler(key)
        return recycler


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not ours to adopt from
        return True
    return True
