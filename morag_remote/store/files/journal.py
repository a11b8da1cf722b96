"""The change journal: an append-only log of the ids of jobs that changed, in numbered segments.

A writer appends a job's id *before* it touches the job's files, while holding the store lock; every
process reads the lines it has not seen yet when it next takes the lock and re-reads those jobs, which
keeps its in-memory catalog current at a cost proportional to the changes, not to the store. Because
the id is logged before the change, a writer killed half-way still leaves a line, and the next reader
re-reads that job from the files (the truth). The journal is not fsynced: after a power loss every
process starts again and rebuilds its catalog from the files.

A line written for a job's new record also names where it goes and its version (``<id> <status>
<version>``): a reader opens that file first, and only if it is not there at that version (the
writer died before its rename) looks in every status directory. A line with the id alone (fsck,
deletes) always sends the reader to every directory.

Torn lines. A line is ``<id>[ <status> <version>] <crc32>``: the checksum covers the rest of the
line, so a line that is not what one writer wrote (a fragment glued to the next writer's line) is
recognised as damaged rather than read as another id. A reader reads whole lines only; an append
that fails part-way (a full disk writes part of the line, then ENOSPC) cuts the file back to where
it ended before raising, and an append that finds the journal ending in a fragment (its writer was
killed in the middle of its write) cuts the fragment off first: a fragment never announced a change
(the line comes before the change), and no reader has read it. A complete line that does not parse
(a damaged file, lines of an older version glued together) raises :class:`JournalDamaged` in the
reader, which then rebuilds its catalog from the folders, as after a gap; ``fsck`` reports such a
line and starts a new segment past it.
"""
from __future__ import annotations

import os
import weakref
import zlib
from contextlib import suppress
from pathlib import Path

from ...fileio import READ_CHUNK, unlink_quietly
from ...models import STATUSES, valid_job_id

Position = tuple[int, int]  # (segment number, byte offset)
Where = tuple[str, int]  # (status, version) of the record a line announces

SEGMENT_BYTES = 1 << 20


class JournalGap(Exception):
    """The segment a reader was in has been removed: it must rebuild from the files."""


class JournalDamaged(JournalGap):
    """A complete line that does not parse: which job it announced cannot be known, so the reader
    must rebuild from the files (as after a gap)."""


class Journal:
    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.dir = directory
        self.segment_bytes = segment_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._last: int | None = None  # the newest segment seen (a hint for head)
        self._prefix = os.path.join(directory, "")
        self._open: tuple[int, int, int] | None = None  # (pid, segment, descriptor) kept open
        self._closer: weakref.finalize | None = None

    def _fd(self, segment: int) -> int:
        """A descriptor of the segment (FileNotFoundError when it is gone), kept open between
        calls: the journal is read at every turn of the store lock and written at every change,
        and opening it each time cost as much as the reads and writes. Only the holder of the
        store lock uses it (the watcher's :meth:`end` goes by path). A forked child opens its own."""
        kept = self._open
        if kept is not None and kept[0] == os.getpid() and kept[1] == segment:
            if os.fstat(kept[2]).st_nlink:
                return kept[2]
            # removed since (others wrote a segment's worth meanwhile): reading on from the kept
            # descriptor would look like the end of the journal and miss every later segment
        fd = os.open(self._path(segment), os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        if self._closer is not None:
            self._closer()  # the previous segment's descriptor (or the parent's copy, after a fork)
        self._open = (os.getpid(), segment, fd)
        self._closer = weakref.finalize(self, os.close, fd)
        return fd

    def _path(self, segment: int) -> str:
        """The segment's path, as a string: every request that takes the store lock reads the
        journal, and building it as a ``Path`` cost more than the read."""
        return f"{self._prefix}{segment:012d}.log"

    def _segments(self) -> list[int]:
        return sorted(int(name[:-4]) for name in os.listdir(self.dir)
                      if name.endswith(".log") and name[:-4].isdigit())

    def head(self) -> Position:
        """Where the journal ends now (creating the first segment if there is none)."""
        end = self.end()
        if end is None:
            _touch(self._path(1))
            self._last = 1
            return (1, 0)
        return end

    def end(self) -> Position | None:
        """Where the journal ends now (None when it has no segment yet); changes nothing.

        Two stats in the common case: the segment found last time, and that no newer one exists
        (a segment is created before older ones are removed); a listing only when that changed.
        """
        last = self._last
        if last is not None:
            try:
                size = os.stat(self._path(last)).st_size
            except FileNotFoundError:
                size = None
            if size is not None and not os.path.exists(self._path(last + 1)):
                return (last, size)
        segments = self._segments()
        if not segments:
            return None
        self._last = segments[-1]
        return (self._last, os.stat(self._path(self._last)).st_size)

    def append(self, job_ids: list[str], where: Where | None = None) -> Position:
        """Log ``job_ids`` (caller holds the exclusive store lock), with the status and version of
        the record about to be written when ``where`` is given; returns the new end.

        All or nothing: when the write fails part-way (ENOSPC after part of the line), the segment
        is cut back to where it ended before the error is raised; a fragment some earlier writer
        left (killed mid-write) is cut off first, so no line is ever glued to it."""
        kept = self._open
        if (kept is not None and kept[0] == os.getpid() and not os.path.exists(self._path(kept[1] + 1))
                and os.fstat(kept[2]).st_nlink):
            segment = kept[1]  # still the newest segment: no need to look for the end
        else:
            segment, _ = self.head()
        data = "".join(map(encode_line, job_ids, [where] * len(job_ids))).encode()
        fd = self._fd(segment)
        before = os.lseek(fd, 0, os.SEEK_END)
        if before and os.pread(fd, 1, before - 1) != b"\n":
            before = _cut_fragment(fd, before)
        view = memoryview(data)
        try:
            while view:  # O_APPEND: every write lands at the end
                view = view[os.write(fd, view):]
        except BaseException:
            # part of it may have been written (a short write, then ENOSPC): nobody may read it
            with suppress(OSError):  # if even this fails, the next append cuts it off
                os.ftruncate(fd, before)
            raise
        end = before + len(data)
        if end >= self.segment_bytes:
            _touch(self._path(segment + 1))
            for old in self._segments():
                if old < segment:
                    unlink_quietly(self._path(old))
            return (segment + 1, 0)
        return (segment, end)

    def rotate(self) -> Position:
        """Start a new segment and remove every older one (fsck, past a damaged line: readers that
        were before it rebuild, as after any removed segment). Caller holds the exclusive lock."""
        segment, _ = self.head()
        _touch(self._path(segment + 1))
        for old in self._segments():
            if old <= segment:
                unlink_quietly(self._path(old))
        self._last = segment + 1
        return (segment + 1, 0)

    def read_since(self, position: Position) -> tuple[list[str], Position]:
        """The ids logged after ``position`` and the new position; JournalGap when it is gone."""
        changes, end = self.changes_since(position)
        return [job_id for job_id, _ in changes], end

    def changes_since(self, position: Position) -> tuple[list[tuple[str, Where | None]], Position]:
        """The ids logged after ``position``, each with the status and version its line announced
        (None when it names none), and the new position; JournalGap when the segment is gone."""
        segment, offset = position
        changes: list[tuple[str, Where | None]] = []
        while True:
            try:
                chunk = _read_from(self._fd(segment), offset)
            except FileNotFoundError:
                raise JournalGap(f"segment {segment} removed") from None
            complete = chunk.rfind(b"\n") + 1
            for number, line in enumerate(chunk[:complete].split(b"\n")[:-1]):
                change = parse_line(line)
                if change is None:
                    raise JournalDamaged(f"segment {segment}: line {number + 1} after offset {offset} "
                                         "does not parse")
                changes.append(change)
            offset += complete
            if not os.path.exists(self._path(segment + 1)):
                return changes, (segment, offset)
            segment, offset = segment + 1, 0

    def signature(self) -> Position | None:
        """A cheap token that changes whenever anything is appended (for long-poll watchers); it
        creates nothing, so a watcher never recreates a journal that is being removed."""
        return self.end()


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o666))


def _read_from(fd: int, offset: int) -> bytes:
    """The bytes of the segment from ``offset`` to its end. The caller holds the store lock, so no
    line is being appended: a read shorter than asked has reached the end."""
    chunks = []
    while True:
        chunk = os.pread(fd, READ_CHUNK, offset)
        chunks.append(chunk)
        if len(chunk) < READ_CHUNK:
            return b"".join(chunks)
        offset += len(chunk)


def _cut_fragment(fd: int, end: int) -> int:
    """Cut the segment back to its last newline (the caller holds the exclusive lock and found it
    ending in a fragment); returns the new end."""
    cut = end
    while cut > 0:
        start = max(cut - READ_CHUNK, 0)
        newline = os.pread(fd, cut - start, start).rfind(b"\n")
        if newline >= 0:
            cut = start + newline + 1
            break
        cut = start
    os.ftruncate(fd, cut)
    return cut


def _crc(body: str) -> str:
    return f"{zlib.crc32(body.encode()):08x}"


def encode_line(job_id: str, where: Where | None = None) -> str:
    body = f"{job_id} {where[0]} {where[1]}" if where is not None else job_id
    return f"{body} {_crc(body)}\n"


def parse_line(raw: bytes) -> tuple[str, Where | None] | None:
    """The id and announced record of one line (without its newline); None when it does not parse.

    A line of this version ends with the checksum of the rest; a line without one (written by the
    version before, during a rolling restart) is read as it was then."""
    try:
        line = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = line.split(" ")
    if len(parts) in (2, 4):
        body, _, crc = line.rpartition(" ")
        if crc != _crc(body):
            return None
        parts.pop()
    if not valid_job_id(parts[0]):
        return None
    if len(parts) == 1:
        return parts[0], None
    if len(parts) == 3 and parts[1] in STATUSES and parts[2].isdigit():
        return parts[0], (parts[1], int(parts[2]))
    return None


def check_segment(data: bytes) -> tuple[list[int], int]:
    """fsck's view of one segment's bytes: the offsets of the complete lines that do not parse, and
    how many bytes follow the last newline (a torn line)."""
    bad, offset = [], 0
    complete = data.rfind(b"\n") + 1
    for line in data[:complete].split(b"\n")[:-1]:
        if parse_line(line) is None:
            bad.append(offset)
        offset += len(line) + 1
    return bad, len(data) - complete
