"""The JSON-file job repository: ``<data>/<status>/<id>.json``, the seed's layout, made crash-safe.

- Every state change happens under one exclusive ``flock`` on ``<data>/.lock`` (and a mutex for the
  threads of a process), so a claim is exclusive across every gunicorn process and thread.
- A job is written to its new status directory first (temp file, fsync, rename, fsync of the
  directory) and only then removed from the old one: at every instant it exists in at least one
  directory. If a crash leaves it in two, the copy with the higher ``version`` is the job; readers
  pick it and fsck removes the other.
- Each process keeps a :class:`~.catalog.Catalog` of the jobs, kept current through the
  :class:`~.journal.Journal`, so claims, lists and stats read only the files they return.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import threading
import time
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

import structlog

from ..exceptions import JobNotFound, JobUnreadable, StoreUnavailable
from ..models import STATUSES, RemoteJob
from .atomic import TEMP_PREFIX, FileLock, fsync_dir, read_json, unlink_quietly, write_atomic
from .base import JobFilter, Mutator, StoreStats
from .catalog import Catalog
from .journal import Journal, JournalGap, Position

log = structlog.get_logger(__name__)

CORRUPT_DIR = "corrupt"
# Failures that say what sits at a job file's path is no readable record (a directory, no
# permission, a symlink loop, a special file). Any other OSError (EMFILE, ENFILE, EIO, ENOMEM...) is
# the system's trouble, not the file's: it propagates, and the job is neither reported corrupt nor
# left out of a catalog.
_UNREADABLE_ERRNOS = frozenset({errno.EISDIR, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENXIO})


class CorruptJobFile(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path.name}: {reason}")
        self.path = path
        self.reason = reason


def load_job_file(path: Path) -> RemoteJob:
    """Parse one job file; CorruptJobFile when it is not a readable job record.

    FileNotFoundError passes through (the job moved or never was), and so does an OSError of the
    system (too many open files, an I/O error); a failure that is about what sits at the path (a
    directory in its place, no permission) makes it as unreadable as bad JSON.
    """
    try:
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        job = RemoteJob.from_dict(data)
        if job.id != path.stem:
            raise ValueError(f"id {job.id!r} does not match the file name")
        return job
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno not in _UNREADABLE_ERRNOS:
            raise
        raise CorruptJobFile(path, exc.strerror or type(exc).__name__) from None
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise CorruptJobFile(path, str(exc)) from None


class FileJobStore:
    def __init__(self, data_dir: str | os.PathLike, *, journal_segment_bytes: int | None = None,
                 watch_interval: float = 0.02) -> None:
        self.root = Path(data_dir)
        for status in STATUSES:
            (self.root / status).mkdir(parents=True, exist_ok=True)
        (self.root / CORRUPT_DIR).mkdir(exist_ok=True)
        self.lock = FileLock(self.root / ".lock")
        self.journal = Journal(self.root / "journal", **(
            {"segment_bytes": journal_segment_bytes} if journal_segment_bytes else {}))
        self.catalog = Catalog()
        self._position: Position | None = None
        self._pid = os.getpid()
        self._watch_interval = watch_interval
        self._changed = threading.Condition()
        self._watcher: threading.Thread | None = None

    # -- paths and raw reads -------------------------------------------------------------------

    def path(self, status: str, job_id: str) -> Path:
        return self.root / status / f"{job_id}.json"

    def _copies(self, job_id: str) -> list[tuple[RemoteJob, Path]]:
        """Every readable copy of the job, newest version first (more than one only after a crash)."""
        found = []
        for status in STATUSES:
            p = self.path(status, job_id)
            try:
                found.append((load_job_file(p), p))
            except FileNotFoundError:
                continue
            except CorruptJobFile as exc:
                log.warning("store.corrupt_file", file=f"{status}/{p.name}", reason=exc.reason)
        found.sort(key=lambda item: item[0].version, reverse=True)
        return found

    def _read(self, job_id: str) -> RemoteJob | None:
        copies = self._copies(job_id)
        return copies[0][0] if copies else None

    def _absent(self, job_id: str) -> JobNotFound:
        """The error for a job with no readable copy (unreadable when a file of it is there); the
        catalog forgets the job, so a damaged file does not come back in every lapse or claim."""
        self.catalog.apply(job_id, None)
        if any(os.path.lexists(self.path(status, job_id)) for status in STATUSES):
            return JobUnreadable(f"the record of job {job_id} is damaged; an operator must run "
                                 "'flask remote-jobs fsck --repair'", job_id=job_id)
        return JobNotFound(f"no job with id {job_id!r}")

    # -- the lock and the catalog --------------------------------------------------------------

    def _sync(self) -> None:
        """Bring this process's catalog up to date (caller holds the lock)."""
        if self._pid != os.getpid():  # forked: the parent's catalog is not ours to trust
            self._pid = os.getpid()
            self._position = None
            self._watcher = None
            self._changed = threading.Condition()
        if self._position is not None:
            try:
                ids, position = self.journal.read_since(self._position)
            except JournalGap:
                self._position = None
            else:
                for job_id in dict.fromkeys(ids):
                    self.catalog.apply(job_id, self._read(job_id))
                self._position = position  # only now: a read that failed is done again next time
                return
        self._rebuild()

    def _rebuild(self) -> None:
        started = time.monotonic()
        self._position = None  # until every job is indexed: a rebuild that failed is done again
        head = self.journal.head()
        self.catalog.clear()
        for job_id in self._scan_ids():
            self.catalog.apply(job_id, self._read(job_id))
        self._position = head
        log.info("store.catalog_rebuilt", jobs=len(self.catalog.entries),
                 duration_ms=round((time.monotonic() - started) * 1000, 1))

    def _scan_ids(self) -> set[str]:
        ids: set[str] = set()
        for status in STATUSES:
            with os.scandir(self.root / status) as it:
                ids.update(e.name[:-5] for e in it if e.name.endswith(".json"))
        return ids

    def _locked(self, exclusive: bool = True):
        return _Locked(self, exclusive)

    # -- writes ----------------------------------------------------------------------------------

    def _write(self, job: RemoteJob, previous: list[Path]) -> RemoteJob:
        """Commit ``job`` (caller holds the exclusive lock), then drop every older copy."""
        self._position = self.journal.append([job.id])
        target = self.path(job.status, job.id)
        write_atomic(target, _encode(job))
        for old in previous:
            if old != target and unlink_quietly(old):
                fsync_dir(old.parent)
        self.catalog.apply(job.id, job)
        self.notify_local()
        return job

    def create(self, job: RemoteJob) -> RemoteJob:
        with self._locked():
            if self._copies(job.id):
                raise ValueError(f"job {job.id} exists")
            job.version = 1
            return self._write(job, [])

    def put(self, job: RemoteJob) -> RemoteJob:
        with self._locked():
            copies = self._copies(job.id)
            job.version = (copies[0][0].version + 1) if copies else max(job.version, 1)
            return self._write(job, [p for _, p in copies])

    def get(self, job_id: str) -> RemoteJob:
        if not _valid_id(job_id):
            raise JobNotFound(f"no job with id {job_id!r}")
        job = self._read(job_id)
        if job is None:  # a move may have been under way; look again while no writer can act
            with self._locked(exclusive=False):
                job = self._read(job_id)
                if job is None:
                    raise self._absent(job_id)
        return job

    def update(self, job_id: str, mutate: Mutator) -> RemoteJob:
        if not _valid_id(job_id):
            raise JobNotFound(f"no job with id {job_id!r}")
        with self._locked():
            copies = self._copies(job_id)
            if not copies:
                raise self._absent(job_id)
            current = copies[0][0]
            new = mutate(current.copy())
            new.version = current.version + 1
            return self._write(new, [p for _, p in copies])

    def claim(self, content_types: Iterable[str], limit: int, now: datetime,
              mutate: Mutator) -> list[RemoteJob]:
        claimed: list[RemoteJob] = []
        types = list(content_types)
        with self._locked():
            # Take candidates a few at a time: each one handled leaves the ready view (claimed, or
            # re-indexed from its file if the catalog was behind), so the loop always advances.
            while len(claimed) < limit:
                batch = list(islice(self.catalog.candidates(types, now.timestamp()), limit - len(claimed)))
                if not batch:
                    break
                try:
                    for job_id in batch:
                        copies = self._copies(job_id)
                        if not copies or copies[0][0].status != "pending":
                            self.catalog.apply(job_id, copies[0][0] if copies else None)
                            continue
                        current = copies[0][0]
                        new = mutate(current.copy())
                        new.version = current.version + 1
                        claimed.append(self._write(new, [p for _, p in copies]))
                except Exception as exc:
                    if not claimed:
                        raise
                    # the jobs claimed so far are the caller's now: hand them over, or their
                    # leases would run out with no one working on them
                    log.error("store.claim_stopped", claimed=len(claimed), error=str(exc))
                    break
        return claimed

    def delete(self, job_id: str, only_if: Callable[[RemoteJob], bool] | None = None) -> bool:
        if not _valid_id(job_id):
            raise JobNotFound(f"no job with id {job_id!r}")
        with self._locked():
            copies = self._copies(job_id)
            if not copies:
                raise self._absent(job_id)
            if only_if is not None and not only_if(copies[0][0]):
                return False
            self._position = self.journal.append([job_id])
            for _, p in copies:
                unlink_quietly(p)
                fsync_dir(p.parent)
            self.catalog.apply(job_id, None)
        return True

    # -- queries from the catalog --------------------------------------------------------------

    def list(self, filters: JobFilter, after: str | None, limit: int) -> tuple[list[RemoteJob], str | None]:
        jobs: list[RemoteJob] = []
        with self._locked(exclusive=False):
            for job_id in self.catalog.ids(filters.status, after):
                e = self.catalog.entries[job_id]
                if not filters.matches(e.status, e.content_type, e.ingestion_task_id, e.worker_id):
                    continue
                if len(jobs) == limit:
                    return jobs, jobs[-1].id
                job = self._read(job_id)
                if job is not None:
                    jobs.append(job)
        return jobs, None

    def lapsed(self, now: datetime, limit: int) -> list[str]:
        with self._locked(exclusive=False):
            return self.catalog.lapsed(now.timestamp(), limit)

    def pending_available_before(self, cutoff: datetime, limit: int) -> list[str]:
        with self._locked(exclusive=False):
            return self.catalog.pending_available_before(cutoff.timestamp(), limit)

    def recently_completed(self, content_type: str, limit: int) -> list[RemoteJob]:
        with self._locked(exclusive=False):
            ids = self.catalog.recently_completed(content_type, limit)
            return [job for job in map(self._read, ids) if job is not None]

    def finished_before(self, cutoff: datetime, limit: int) -> list[str]:
        with self._locked(exclusive=False):
            return self.catalog.finished_before(cutoff.timestamp(), limit)

    def finished_since(self, cutoff: datetime, limit: int, after_id: str | None = None) -> list[str]:
        with self._locked(exclusive=False):
            return self.catalog.finished_since(cutoff.timestamp(), limit, after_id)

    def stats(self) -> StoreStats:
        with self._locked(exclusive=False):
            oldest = self.catalog.oldest_pending()
            return StoreStats(
                counts=self.catalog.counts(),
                oldest_pending_created_at=_dt(oldest),
                worker_last_seen={w: _dt(t) for w, t in self.catalog.worker_seen.items()},
            )

    def has_available(self, content_types: Iterable[str], now: datetime) -> bool:
        with self._locked(exclusive=False):
            return self.catalog.has_available(content_types, now.timestamp())

    def next_available_at(self, content_types: Iterable[str]) -> datetime | None:
        with self._locked(exclusive=False):
            return _dt(self.catalog.next_available(content_types))

    def iter_all(self) -> Iterator[RemoteJob]:
        for job_id in sorted(self._scan_ids()):
            job = self._read(job_id)
            if job is not None:
                yield job

    def check_writable(self) -> None:
        # a name per call: threads probing at once must not replace or remove each other's file
        probe = self.root / f"{TEMP_PREFIX}health.{os.getpid()}.{secrets.token_hex(8)}"
        try:
            write_atomic(probe, b"ok", sync_dir=False)
            unlink_quietly(probe)
        except OSError as exc:
            raise StoreUnavailable(f"the job store is not writable: {exc.strerror}") from None

    # -- change notification (long polls) ------------------------------------------------------

    def wait_for_change(self, timeout: float) -> bool:
        """Wait until another request or process changes the store, or ``timeout`` passes.

        One watcher thread per process looks at the journal's end every ``watch_interval`` seconds
        and wakes every waiting request, so idle long polls cost one stat per interval per process.
        """
        self._ensure_watcher()
        with self._changed:
            return self._changed.wait(timeout)

    def _ensure_watcher(self) -> None:
        if self._watcher is not None and self._watcher.is_alive() and self._pid == os.getpid():
            return
        with self.lock.hold(exclusive=False):
            self._sync()
            if self._watcher is None or not self._watcher.is_alive():
                self._watcher = threading.Thread(target=self._watch, name="store-watcher", daemon=True)
                self._watcher.start()

    def _watch(self) -> None:
        last = self.journal.signature()
        while True:
            time.sleep(self._watch_interval)
            try:
                current = self.journal.signature()
            except OSError:  # pragma: no cover - store removed under us (tests' tmp dirs)
                return
            if current != last:
                last = current
                with self._changed:
                    self._changed.notify_all()

    def notify_local(self) -> None:
        """Wake this process's waiting long polls now (a change made by this process)."""
        with self._changed:
            self._changed.notify_all()


class _Locked:
    """Context manager: take the store lock, then sync the catalog."""

    def __init__(self, store: FileJobStore, exclusive: bool) -> None:
        self.store = store
        self.cm = store.lock.hold(exclusive)

    def __enter__(self) -> None:
        self.cm.__enter__()
        try:
            self.store._sync()
        except BaseException:
            self.cm.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        self.cm.__exit__(*exc)


def _encode(job: RemoteJob) -> bytes:
    return json.dumps(job.to_dict(), separators=(",", ":"), sort_keys=True).encode()


def _dt(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, timezone.utc) if ts is not None else None


def _valid_id(job_id: str) -> bool:
    """Ids name files: refuse anything that is not a plain ASCII token (no '/', '..', NUL, and no
    non-ASCII letters or digits, whose UTF-8 bytes can make a name too long for the file system)."""
    return 0 < len(job_id) <= 64 and all(c.isascii() and (c.isalnum() or c in "-_") for c in job_id)
