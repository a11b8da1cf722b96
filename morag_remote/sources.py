"""Source files: only regular files inside the configured roots, checked at create and at serve time.

The serve-time check looks at the file actually opened (``/proc/self/fd``), not at the name, so a
file swapped for a symlink between the check and the open cannot leak a byte from outside the roots.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterable

from .exceptions import InvalidRequest, SourceForbidden, SourceMissing


def _inside(path: str, roots: Iterable[str]) -> bool:
    for root in roots:
        real_root = os.path.realpath(root)
        if path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep):
            return True
    return False


def confine(source_file_path: str, roots: Iterable[str]) -> str:
    """The real path of a regular file inside one of ``roots``; InvalidRequest (422) otherwise.

    A relative path is taken relative to the first root. The path is stored as the producer gave
    it; the download checks it again.
    """
    roots = list(roots)
    field = "source_file_path"
    if "\x00" in source_file_path:
        raise InvalidRequest("source_file_path contains a NUL byte", {field: ["contains a NUL byte"]})
    candidate = source_file_path
    if not os.path.isabs(candidate) and roots:
        candidate = os.path.join(roots[0], candidate)
    real = os.path.realpath(candidate)
    if not _inside(real, roots):
        raise InvalidRequest("source_file_path is outside the configured source roots",
                             {field: ["must name a file inside one of the source roots"]})
    try:
        st = os.stat(real)
    except OSError:
        raise InvalidRequest("source_file_path does not exist", {field: ["no such file"]}) from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidRequest("source_file_path is not a regular file", {field: ["not a regular file"]})
    return real


def open_source(source_file_path: str, roots: Iterable[str]) -> tuple[BinaryIO, os.stat_result]:
    """Open the job's source for reading, re-checking confinement on the open descriptor.

    SourceMissing (404) when the file is gone, SourceForbidden (403) when it now resolves outside
    the roots or is no longer a regular file.
    """
    roots = list(roots)
    candidate = source_file_path
    if not os.path.isabs(candidate) and roots:
        candidate = os.path.join(roots[0], candidate)
    if "\x00" in candidate:
        raise SourceForbidden("the source path is not allowed")
    try:
        fd = os.open(candidate, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SourceMissing("the job's source file no longer exists") from None
    except OSError:  # ELOOP: the file itself is now a symlink; EACCES and friends
        raise SourceForbidden("the source file may not be served") from None
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
        st = os.fstat(fd)
        if not _inside(opened, roots) or not stat.S_ISREG(st.st_mode):
            raise SourceForbidden("the source file resolves outside the source roots")
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def download_name(source_file_path: str) -> str:
    return Path(source_file_path).name or "source"
