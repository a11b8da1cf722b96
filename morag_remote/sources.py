"""Source files: only regular files inside the configured roots, checked at create and at serve time.

Both checks resolve the path (following every symlink, in any component) and require the result to
be inside the real path of one of ``SOURCE_ROOTS``, so a symlink inside a root that points to
another file inside a root is fine, and one that points out is not. A relative path is taken
relative to the first root.

The serve-time check never opens a path that resolves outside the roots (opening a device or a
FIFO can have effects of its own), and then checks the descriptor it actually opened (its
``/proc/self/fd`` link and ``fstat``), so a file or a directory swapped for a symlink between the
check and the open cannot leak a byte from outside the roots.
"""
from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Iterable

from .exceptions import InvalidRequest, SourceForbidden, SourceMissing

FIELD = "source_file_path"


ROOTS_RECHECK_SECONDS = 5.0
_resolved_roots: dict[tuple[str, ...], tuple[float, list[str]]] = {}


def _real_roots(roots: Iterable[str]) -> list[str]:
    """The roots' real paths, resolved again at most every ``ROOTS_RECHECK_SECONDS`` (each is a
    stat per path component, twice per create). A root repointed meanwhile can only refuse: the
    file opened is checked against the real paths the roots had, never against the new ones."""
    key = tuple(roots)
    now = time.monotonic()
    known = _resolved_roots.get(key)
    if known is not None and known[0] > now:
        return known[1]
    real = [os.path.realpath(root) for root in key]
    if len(_resolved_roots) > 64:  # settings change in tests, not in a server: keep it bounded
        _resolved_roots.clear()
    _resolved_roots[key] = (now + ROOTS_RECHECK_SECONDS, real)
    return real


def _inside(path: str, real_roots: Iterable[str]) -> bool:
    for real_root in real_roots:
        if path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep):
            return True
    return False


def _candidate(source_file_path: str, roots: list[str]) -> str:
    if not os.path.isabs(source_file_path) and roots:
        return os.path.join(roots[0], source_file_path)
    return source_file_path


def _resolve(path: str) -> str | None:
    """``realpath`` that follows what it can; None when the path changed under it (realpath itself
    raises EINVAL when a symlink it found is gone by the time it reads it)."""
    try:
        return os.path.realpath(path)
    except OSError:
        return None


def _valid_name(path: str) -> bool:
    """Whether ``path`` can name a file: a lone surrogate (JSON "\\ud800") encodes to no bytes,
    while the surrogateescape form Python gives a real non-UTF-8 name does."""
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        return False
    return True


def _refuse(detail: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"source_file_path {detail}", {FIELD: [message]})


def _outside() -> InvalidRequest:
    return _refuse("is outside the configured source roots (MORAG_REMOTE_SOURCE_ROOTS)",
                   "must resolve to a file inside one of the source roots")


def confine(source_file_path: str, roots: Iterable[str]) -> str:
    """The real path of a readable regular file inside one of ``roots``; InvalidRequest (422) otherwise.

    The path is stored as the producer gave it; the download checks it again.
    """
    roots = list(roots)
    if "\x00" in source_file_path:
        raise _refuse("contains a NUL byte", "contains a NUL byte")
    if not _valid_name(source_file_path):
        raise _refuse("is not a valid file name (it contains a lone surrogate)", "not a valid file name")
    candidate = _candidate(source_file_path, roots)
    real_roots = _real_roots(roots)
    try:
        real = os.path.realpath(candidate, strict=True)
        st = os.stat(real)
    except OSError as exc:  # missing, a symlink loop, a name too long, changed while resolving
        resolved = _resolve(candidate)  # as far as it resolves: outside the roots is the answer then
        if resolved is not None and not _inside(resolved, real_roots):
            raise _outside() from None
        if isinstance(exc, FileNotFoundError):
            raise _refuse("does not exist", "no such file") from None
        raise _refuse(f"cannot be resolved ({exc.strerror})", "cannot be resolved") from None
    if not _inside(real, real_roots):
        raise _outside()
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(f"is not a regular file (it is a {_kind(st.st_mode)})", "not a regular file")
    if not os.access(real, os.R_OK):
        raise _refuse("is not readable by the server", "not readable")
    return real


def open_source(source_file_path: str, roots: Iterable[str]) -> tuple[BinaryIO, os.stat_result]:
    """Open the job's source for reading, re-checking confinement on the open descriptor.

    SourceMissing (404) when the file is gone, SourceForbidden (403) when it now resolves outside
    the roots or is no longer a regular file.
    """
    roots = list(roots)
    if "\x00" in source_file_path:
        raise SourceForbidden("the job's source path may not be served (it contains a NUL byte)")
    if not _valid_name(source_file_path):
        raise SourceForbidden("the job's source path may not be served (it is not a valid file name)")
    real_roots = _real_roots(roots)
    real = _resolve(_candidate(source_file_path, roots))
    if real is None:
        raise SourceForbidden("the job's source file changed while it was being checked")
    if not _inside(real, real_roots):
        raise SourceForbidden("the job's source file now resolves outside the source roots")
    try:
        before = os.lstat(real)
        if not stat.S_ISREG(before.st_mode):  # never open a FIFO or a device, even inside a root
            raise SourceForbidden(f"the job's source is no longer a regular file (it is a {_kind(before.st_mode)})")
        # O_NOFOLLOW: ELOOP if the file became a symlink since the lstat
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise SourceMissing(f"the job's source file {source_file_path!r} no longer exists") from None
    except OSError as exc:
        raise SourceForbidden(f"the job's source file may not be served ({exc.strerror})") from None
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _inside(opened, real_roots):
            raise SourceForbidden("the job's source file resolves outside the source roots")
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symlink"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "special file")


def download_name(source_file_path: str) -> str:
    return Path(source_file_path).name or "source"


PIECE = 1024 * 1024


def sha256_file(fh: BinaryIO) -> tuple[str, int]:
    """The sha256 (hex) and size of an open file, read from its start (left at its start)."""
    hasher, size = hashlib.sha256(), 0
    fh.seek(0)
    while piece := fh.read(PIECE):
        hasher.update(piece)
        size += len(piece)
    fh.seek(0)
    return hasher.hexdigest(), size


def stat_key(st: os.stat_result) -> dict[str, int]:
    """What says a file is still the one whose sha256 was taken: its inode, size and modification
    time (not the device: hosts that share a BLOB_DIR see one file under different device numbers)."""
    return {"ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class SourceDigests:
    """The sha256 of files this process has read whole, by the file's identity and version (device,
    inode, size, modification and change time): a job created from a file already hashed knows its
    sha256 at once, and a producer's declared sha256 of such a file is checked without reading it
    again. Bounded (least recently used go first); a file written since has another key."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._known: OrderedDict[tuple[int, ...], str] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(st: os.stat_result) -> tuple[int, ...]:
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def get(self, st: os.stat_result) -> str | None:
        key = self._key(st)
        with self._lock:
            sha = self._known.get(key)
            if sha is not None:
                self._known.move_to_end(key)
            return sha

    def put(self, st: os.stat_result, sha256: str) -> None:
        key = self._key(st)
        with self._lock:
            self._known[key] = sha256
            self._known.move_to_end(key)
            while len(self._known) > self.capacity:
                self._known.popitem(last=False)


def describe(source_file_path: str, roots: Iterable[str], declared_sha256: str | None,
             digests: SourceDigests | None = None) -> dict:
    """A path source's size and stat, and its sha256 when the producer declared one (verified: 422
    when the file's bytes differ) or when ``digests`` knows this version of the file."""
    fh, st = open_source(source_file_path, roots)
    with fh:
        sha = digests.get(st) if digests is not None else None
        if declared_sha256 is not None and sha is None:
            sha, _ = sha256_file(fh)
            if digests is not None:
                digests.put(st, sha)
        if declared_sha256 is not None:
            if sha != declared_sha256.lower():
                raise InvalidRequest(f"source_sha256 does not match the file: its sha256 is {sha}",
                                     {"source_sha256": ["does not match the file's sha256"]})
        return {"source_size": st.st_size, "source_sha256": sha, "source_stat": stat_key(st)}
