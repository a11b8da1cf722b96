"""The JSON-file job repository: ``<data>/<status>/<id>.json``, the seed's layout, made crash-safe.

- Every state change happens under one exclusive ``flock`` on ``<data>/.lock`` (and a mutex for the
  threads of a process), so a claim is exclusive across every gunicorn process and thread.
- A job is written to its new status directory first (a temp file renamed into place under the
  lock), the new file and the directory are fsynced (after the lock is released, so the fsyncs of
  concurrent requests overlap instead of queueing behind the lock) and only then is the job removed
  from the old directory (under the lock again): at every instant it exists durably in at least one
  directory, and a request is answered only once its change is durable. If a crash leaves a job in
  two directories, the copy with the higher ``version`` is the job; readers pick it and fsck
  removes the other.
- Creates and results write and fsync their new file before they take the lock (they know what
  they will write); a claim, and a change decided under the lock, writes its file under the lock
  and fsyncs it after. A power loss in between can leave that new file empty or damaged, next to
  the old copy, which is still there and durable (it is removed only after the fsyncs): readers
  skip the damaged file (a warning), so the job is as it was before the unanswered request, and
  fsck moves the damaged file aside; a later change of the job replaces it.
- Each process keeps a :class:`~.catalog.Catalog` of the jobs, kept current through the
  :class:`~.journal.Journal`, so claims, lists and stats read only the files they return.
- A catalog is built (at a process's first use, or after a gap in the journal) without holding the
  lock writers need: the journal's end is noted under a short shared hold (no change is half-done
  then), every folder is scanned and every file read without the lock (as lockless reads do,
  :func:`~morag_remote.fileio.read_committed`), and the catalog then catches up under the lock from
  the journal lines written since, which name every job that changed while the scan ran. A worker
  that starts, or one stopped half-way through its build, holds up no write.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

import structlog

from ...exceptions import JobNotFound, JobUnreadable, StoreUnavailable
from ...models import STATUSES, RemoteJob, from_iso, to_iso, valid_job_id
from ...fileio import (TEMP_PREFIX, fsync_dir, read_bytes, read_committed, stage, stage_open,
                     unlink_quietly, write_all, write_atomic)
from ..base import (Availability, Claimable, ClaimRoute, JobFilter, Mutator, StoreStats, TypeControl,
                    is_pure)
from .catalog import Catalog
from .journal import Journal, JournalDamaged, JournalGap, Position
from .locks import bounded_lock
from .recycle import SPARE_DIR, recycler_for
from .stale import StaleCopies

log = structlog.get_logger(__name__)

CORRUPT_DIR = "corrupt"
# Failures that say what sits at a job file's path is no readable record (a directory, no
# permission, a symlink loop, a special file). Any other OSError (EMFILE, ENFILE, EIO, ENOMEM...) is
# the system's trouble, not the file's: it propagates, and the job is neither reported corrupt nor
# left out of a catalog.
_UNREADABLE_ERRNOS = frozenset({errno.EISDIR, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENXIO})
INCOMING_DIR = ".incoming"  # temp files of new records, renamed into place (never a job)
CONTROLS_FILE = "types.json"  # the operators' pause and limit per content type (TypeControl)
CONTROLS_JOURNAL_ID = ".types"  # the journal line a control change writes (no job has this id)


class CorruptJobFile(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path.name}: {reason}")
        self.path = path
        self.reason = reason


def load_job_file(path: str | os.PathLike, job_id: str | None = None, *, locked: bool = False) -> RemoteJob:
    """Parse one job file; CorruptJobFile when it is not a readable job record.

    ``locked``: the caller holds the store lock, so no writer can retire the file while it is read
    and the check of :func:`~.atomic.read_committed` (two more system calls) is left out.

    FileNotFoundError passes through (the job moved or never was), and so does an OSError of the
    system (too many open files, an I/O error); a failure that is about what sits at the path (a
    directory in its place, no permission) makes it as unreadable as bad JSON. ``job_id`` is the id
    its name says (taken from the name when not given).
    """
    try:
        data = json.loads(read_bytes(path) if locked else read_committed(path))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        job = RemoteJob.from_dict(data)
        expected = job_id if job_id is not None else Path(path).stem
        if job.id != expected:
            raise ValueError(f"id {job.id!r} does not match the file name")
        return job
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno not in _UNREADABLE_ERRNOS:
            raise
        raise CorruptJobFile(Path(path), exc.strerror or type(exc).__name__) from None
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
        raise CorruptJobFile(Path(path), str(exc)) from None


class FileJobStore:
    def __init__(self, data_dir: str | os.PathLike, *, journal_segment_bytes: int | None = None,
                 watch_interval: float = 0.02, watch_linger: float = 5.0,
                 lock_timeout: float | None = None) -> None:
        self.root = Path(data_dir)
        self._folders = tuple(str(self.root / status) for status in STATUSES)
        self._incoming = str(self.root / INCOMING_DIR)
        for status in STATUSES:
            (self.root / status).mkdir(parents=True, exist_ok=True)
        (self.root / CORRUPT_DIR).mkdir(exist_ok=True)
        (self.root / INCOMING_DIR).mkdir(exist_ok=True)
        (self.root / SPARE_DIR).mkdir(exist_ok=True)
        self._recycler = recycler_for(self.root / SPARE_DIR)
        self._recycler.adopt()  # now, not at the first move, which holds the store lock
        # every hold gives up after lock_timeout seconds (StoreBusy, a 503), None: waits for ever
        self.lock = bounded_lock(self.root / ".lock", lock_timeout)
        self.journal = Journal(self.root / "journal", **(
            {"segment_bytes": journal_segment_bytes} if journal_segment_bytes else {}))
        self.catalog = Catalog()
        self._position: Position | None = None
        self._pid = os.getpid()
        self._watch_interval = watch_interval
        self._watch_linger = watch_linger
        self._changed = threading.Condition()
        self._changes = 0   # see change_marker
        self._waiting = 0   # requests in wait_for_change
        self._watcher: threading.Thread | None = None
        self._stale: StaleCopies | None = None
        self._first_lease_end = float("-inf")  # unknown until the catalog is first synced
        self._first_expiry = float("-inf")     # likewise, the first expires_at of a pending job
        self._controls_file = f"{self.root}/{CONTROLS_FILE}"
        self._controls: tuple[tuple | None, dict[str, TypeControl]] = (None, {})  # (signature, parsed)
        self._pending_types: frozenset[str] = frozenset()  # as of the last turn of the lock
        self._stale_pid: int | None = None
        self._prebuilt: tuple[int, Position, Catalog] | None = None  # (pid, journal end, catalog)
        self._build_mutex: tuple[int, threading.Lock] = (os.getpid(), threading.Lock())
        self._scanning = False  # a thread of this process is scanning the folders for a catalog

    # -- paths and raw reads -------------------------------------------------------------------

    def path(self, status: str, job_id: str) -> Path:
        return self.root / status / f"{job_id}.json"

    def _file(self, status: str, job_id: str) -> str:
        """:meth:`path` as a string. The store's own reads and writes build their paths as strings:
        they run several times per request, and pathlib cost more than the system calls."""
        return f"{self.root}/{status}/{job_id}.json"

    def _copies(self, job_id: str) -> list[tuple[RemoteJob, str]]:
        """Every readable copy of the job, newest version first (more than one only after a crash,
        or for the moment a move takes to settle)."""
        found = []
        locked = self.lock.held()
        for folder in self._folders:
            name = f"{folder}/{job_id}.json"
            try:
                found.append((load_job_file(name, job_id, locked=locked), name))
            except FileNotFoundError:
                continue
            except CorruptJobFile as exc:
                log.warning("store.corrupt_file", file=f"{os.path.basename(folder)}/{job_id}.json",
                            reason=exc.reason)
        if len(found) > 1:
            found.sort(key=lambda item: item[0].version, reverse=True)
        return found

    def _read(self, job_id: str) -> RemoteJob | None:
        copies = self._copies(job_id)
        return copies[0][0] if copies else None

    def _known_copies(self, job_id: str,
                      current: tuple[RemoteJob, str] | None = None) -> list[tuple[RemoteJob, str]]:
        """:meth:`_copies` from what the catalog knows (caller holds the lock, so the catalog is in
        sync): the file of the entry's status, which holds the newest version, and the folders the
        job moved out of where an older copy may still be (a folder found without one is not looked
        in again). Every directory when the catalog does not know the job or that file is not the
        entry's version. ``current``: that file, already read at the entry's version."""
        entry = self.catalog.entries.get(job_id)
        if entry is None:
            return self._copies(job_id)
        if current is None:
            current = self._load_at(entry.status, job_id)
        if current is None or current[0].version != entry.version:
            return self._copies(job_id)
        found = [current]
        moved_from = self.catalog.elsewhere.get(job_id)
        for status in sorted(moved_from or ()):
            older = self._load_at(status, job_id)
            if older is None:
                moved_from.discard(status)
            else:
                found.append(older)
        if moved_from is not None and not moved_from:
            del self.catalog.elsewhere[job_id]
        found.sort(key=lambda item: item[0].version, reverse=True)
        return found

    def _load_at(self, status: str, job_id: str) -> tuple[RemoteJob, str] | None:
        """The job's file in ``status``'s folder and where it is; None when there is none or it
        cannot be read (:meth:`_copies` says why)."""
        name = self._file(status, job_id)
        try:
            return load_job_file(name, job_id, locked=self.lock.held()), name
        except (FileNotFoundError, CorruptJobFile):
            return None

    def _read_announced(self, job_id: str, where: tuple[str, int] | None) -> RemoteJob | None:
        """The job as the journal's last line about it announced it (status and version), read from
        that one file; :meth:`_read` (every directory) when the line announced nothing or the file
        is not that version: its writer died before the rename. Caller holds the lock, and every
        later change of the job would have a later line, so a file at the announced version is the
        newest copy."""
        if where is not None and where[0] in STATUSES:
            try:
                job = load_job_file(self._file(where[0], job_id), job_id, locked=self.lock.held())
            except (FileNotFoundError, CorruptJobFile):
                job = None
            if job is not None and (job.status, job.version) == where:
                return job
        return self._read(job_id)

    def _absent(self, job_id: str) -> JobNotFound:
        """The error for a job with no readable copy (unreadable when a file of it is there); the
        catalog forgets the job, so a damaged file does not come back in every lapse or claim."""
        self.catalog.apply(job_id, None)
        if any(os.path.lexists(self.path(status, job_id)) for status in STATUSES):
            return JobUnreadable(f"the record of job {job_id} is damaged; an operator must run "
                                 "'flask remote-jobs fsck --repair'", job_id=job_id)
        return JobNotFound(f"no job with id {job_id!r}")

    # -- the lock and the catalog --------------------------------------------------------------

    def _sync(self, rebuild: bool = True) -> bool:
        """Bring this process's catalog up to date (caller holds the lock). When that needs a
        rebuild and ``rebuild`` is False, returns False instead: the caller lets go of the lock,
        builds the catalog outside it (:meth:`_build_outside_lock`) and comes back."""
        if self._pid != os.getpid():  # forked: the parent's catalog is not ours to trust
            self._pid = os.getpid()
            self._position = None
            self._watcher = None
            self._changed = threading.Condition()
            self._waiting = 0
        prebuilt, self._prebuilt = self._prebuilt, None
        if self._position is None and prebuilt is not None and prebuilt[0] == os.getpid():
            _, self._position, self.catalog = prebuilt  # caught up below
        if self._position is not None:
            try:
                changes, position = self.journal.changes_since(self._position)
            except JournalDamaged as exc:  # which job the line announced is unknown: read them all
                log.warning("store.journal_damaged", detail=str(exc))
                self._position = None
            except JournalGap:
                self._position = None
            else:
                for job_id, where in dict(changes).items():  # the last line of each job
                    self.catalog.apply(job_id, self._read_announced(job_id, where))
                self._position = position  # only now: a read that failed is done again next time
                self._first_lease_end = self.catalog.next_lease_end()
                self._first_expiry = self.catalog.next_expiry()
                return True
        if not rebuild:
            return False
        self._rebuild()
        self._first_lease_end = self.catalog.next_lease_end()
        self._first_expiry = self.catalog.next_expiry()
        return True

    def _build_outside_lock(self) -> None:
        """When this process has no catalog yet, build one without holding the lock (see the
        module's docstring); :meth:`_sync` catches it up under the lock. One thread per process
        builds, the others wait for it."""
        if self._position is not None and self._pid == os.getpid():
            return
        pid, mutex = self._build_mutex
        if pid != os.getpid():  # forked
            self._build_mutex = (os.getpid(), threading.Lock())
            mutex = self._build_mutex[1]
        started = time.monotonic()
        bound = self.lock.timeout
        # another thread builds: wait for it while it scans (that ends), but only within the lock's
        # bound while it waits for the lock (a frozen holder: that thread gives up then too)
        while not mutex.acquire(timeout=-1 if bound is None else bound):
            if not self._scanning:
                self.lock.timed_out(False, started)
        try:
            if (self._position is not None and self._pid == os.getpid()) or (
                    self._prebuilt is not None and self._prebuilt[0] == os.getpid()):
                return
            with self.lock.hold(exclusive=False):  # no change is half-done: every later one is logged
                start = self.journal.head()
            started = time.monotonic()
            self._scanning = True
            try:
                catalog = Catalog()
                for job_id, folders in self._scan_folders().items():
                    self._index_found(catalog, job_id, folders)
            finally:
                self._scanning = False
            self._prebuilt = (os.getpid(), start, catalog)
            log.info("store.catalog_rebuilt", jobs=len(catalog.entries), outside_lock=True,
                     duration_ms=round((time.monotonic() - started) * 1000, 1))
        finally:
            mutex.release()

    def _rebuild(self) -> None:
        started = time.monotonic()
        self._position = None  # until every job is indexed: a rebuild that failed is done again
        head = self.journal.head()
        self.catalog.clear()
        for job_id, folders in self._scan_folders().items():
            # the lock is held, so nothing moves: a job found in one directory is read there only
            self._index_found(self.catalog, job_id, folders)
        self._position = head
        log.info("store.catalog_rebuilt", jobs=len(self.catalog.entries),
                 duration_ms=round((time.monotonic() - started) * 1000, 1))

    def _index_found(self, catalog: Catalog, job_id: str, folders: list[str]) -> None:
        """Index a job found on disk in ``folders``: the newest copy, and where the older ones are."""
        if len(folders) == 1:
            catalog.apply(job_id, self._read_in(folders[0], job_id))
            return
        catalog.apply(job_id, self._read(job_id))
        entry = catalog.entries.get(job_id)
        if entry is not None:
            catalog.elsewhere[job_id] = {os.path.basename(f) for f in folders} - {entry.status}

    def _scan_folders(self) -> dict[str, list[str]]:
        """Every job id on disk and the status directories that hold a file of it."""
        found: dict[str, list[str]] = {}
        for folder in self._folders:
            with os.scandir(folder) as it:
                for e in it:
                    if e.name.endswith(".json"):
                        found.setdefault(e.name[:-5], []).append(folder)
        return found

    def _read_in(self, folder: str, job_id: str) -> RemoteJob | None:
        """The job from its file in ``folder`` (None when unreadable, as :meth:`_copies` says)."""
        try:
            return load_job_file(f"{folder}/{job_id}.json", job_id, locked=self.lock.held())
        except FileNotFoundError:
            return self._read(job_id)
        except CorruptJobFile as exc:
            log.warning("store.corrupt_file", file=f"{os.path.basename(folder)}/{job_id}.json", reason=exc.reason)
            return None

    def _scan_ids(self) -> set[str]:
        ids: set[str] = set()
        for status in STATUSES:
            with os.scandir(self.root / status) as it:
                ids.update(e.name[:-5] for e in it if e.name.endswith(".json"))
        return ids

    def _locked(self, exclusive: bool = True):
        return _Locked(self, exclusive)

    # -- writes ----------------------------------------------------------------------------------

    def _stage(self, job: RemoteJob) -> str:
        """The job's bytes in a fsynced temp file (a spare one when there is one), written before
        the lock is taken."""
        return stage(self._incoming, f"{job.id}.json", encode_job(job), reuse=self._recycler)

    def _place(self, job: RemoteJob, copies: list[tuple[RemoteJob, str]], staged: str | None = None,
               spare: tuple[str, int] | None = None) -> _Commit:
        """Put ``job`` in place (caller holds the exclusive lock); what is left to do is returned.

        The journal line comes first, then the new file (``staged``: a temp file written and
        fsynced before the lock was taken; else one written now, into ``spare`` when given (an
        empty temp file and its descriptor, made before the lock was taken), to be fsynced by
        :meth:`_settle`), renamed into place: from here on every reader and every later writer sees
        this version. Making it durable and removing the older copies is :meth:`_settle`'s work,
        after the lock is released. The caller must pass the commit to :meth:`_settle`, which
        closes its descriptor; ``spare`` is this call's to close or hand over, whatever happens.
        """
        fd = None
        if staged is None and spare is not None:
            staged, fd = spare
        try:
            self._position = self.journal.append([job.id], where=(job.status, job.version))
            target = self._file(job.status, job.id)
            if fd is not None:
                write_all(fd, encode_job(job))
            elif staged is None:
                staged, fd = stage_open(self._incoming, f"{job.id}.json", encode_job(job), sync=False)
            os.replace(staged, target)
        except BaseException:
            if staged is not None:
                unlink_quietly(staged)
            if fd is not None:
                os.close(fd)
            raise
        self.catalog.apply(job.id, job)
        self.notify_local()
        return _Commit(target, [(p, old.version) for old, p in copies if p != target], fd)

    def _settle(self, commits: list[_Commit]) -> None:
        """Make committed writes durable, then drop the copies they replaced (lock not held).

        The fsyncs run outside the lock, so the fsyncs of concurrent requests overlap (the
        filesystem commits them together) instead of queueing behind the lock: first the new files
        written under the lock, then their directories. An older copy goes only once the new one
        is durable, so the job is on disk in at least one directory at every instant.
        """
        try:
            for c in commits:
                if c.fd is not None:
                    os.fsync(c.fd)
        finally:
            for c in commits:
                if c.fd is not None:
                    os.close(c.fd)
                    c.fd = None
        for folder in dict.fromkeys(os.path.dirname(c.target) for c in commits):
            fsync_dir(folder)
        stale = [item for c in commits for item in c.stale]
        if stale:
            self._stale_copies().remove(stale)

    def _stale_copies(self) -> StaleCopies:
        if self._stale is None or self._stale_pid != os.getpid():
            self._stale, self._stale_pid = StaleCopies(self.lock, self._recycler), os.getpid()
        return self._stale

    def create(self, job: RemoteJob) -> RemoteJob:
        job.version = 1
        staged = self._stage(job)
        try:
            with self._locked():
                if job.id in self.catalog.entries or os.path.exists(self._file(job.status, job.id)):
                    raise ValueError(f"job {job.id} exists")
                commit = self._place(job, [], staged)
        except BaseException:
            unlink_quietly(staged)
            raise
        self._settle([commit])
        return job

    def put(self, job: RemoteJob) -> RemoteJob:
        with self._locked():
            copies = self._known_copies(job.id)
            job.version = (copies[0][0].version + 1) if copies else max(job.version, 1)
            commit = self._place(job, copies)
        self._settle([commit])
        return job

    def get(self, job_id: str) -> RemoteJob:
        if not valid_job_id(job_id):
            raise JobNotFound(f"no job with id {job_id!r}")
        job = self._read(job_id)
        if job is None:  # a move may have been under way; look again while no writer can act
            with self._locked(exclusive=False):
                job = self._read(job_id)
                if job is None:
                    raise self._absent(job_id)
        return job

    def update(self, job_id: str, mutate: Mutator) -> RemoteJob:
        if not valid_job_id(job_id):
            raise JobNotFound(f"no job with id {job_id!r}")
        if is_pure(mutate):
            done = self._update_staged(job_id, mutate)
            if done is not None:
                return done
        with self._locked():
            copies = self._known_copies(job_id)
            if not copies:
                raise self._absent(job_id)
            current = copies[0][0]
            new = mutate(current.copy())
            new.version = current.version + 1
            commit = self._place(new, copies)
        self._settle([commit])
        return new

    def _update_staged(self, job_id: str, mutate: Mutator) -> RemoteJob | None:
        """Apply a pure mutator to the job as it is now and write the result before taking the lock;
        under the lock only check that the job is still that version and rename. None when the job
        changed meanwhile or the mutator refused: the caller then decides again under the lock, on
        the current version (so a refusal is never based on an old one)."""
        hint = self.catalog.entries.get(job_id)  # read without the lock: checked under it below
        read = self._load_at(hint.status, job_id) if hint is not None else None
        if read is None:
            copies = self._copies(job_id)
            if not copies:
                return None
            read = copies[0]
        current = read[0]
        try:
            new = mutate(current.copy())
        except Exception:
            return None
        new.version = current.version + 1
        staged: str | None = self._stage(new)
        try:
            with self._locked():
                entry = self.catalog.entries.get(job_id)
                if entry is None or entry.version != current.version or entry.status != current.status:
                    return None
                commit = self._place(new, self._known_copies(job_id, read), staged)
                staged = None
        finally:
            if staged is not None:
                unlink_quietly(staged)
        self._settle([commit])
        return new

    def claim(self, content_types: Iterable[str], limit: int, now: datetime,
              mutate: Mutator, route: ClaimRoute | None = None) -> list[RemoteJob]:
        """Take the best ``limit`` pending jobs. The catalog names them in claim order; each is
        read again under the lock (the files are the truth) before it is taken, and a catalog entry
        the file contradicts is corrected, so the loop ends: every turn claims or drops the head.

        When this process last saw pending jobs of these types, an empty temp file for the first
        claim's record is made before the lock is taken (creating a file costs more than writing
        it); it is removed if nothing is claimed.

        Routing, under the same lock: paused types are left out; the requirement sets of the
        available jobs are each tested once against the route's capabilities and only the lists of
        the sets it meets are walked (so pending jobs this poller cannot take cost nothing); a type
        with a limit is claimed only while fewer than that many of its jobs are processing, which
        the catalog counts exactly once synced under the exclusive lock."""
        route = route or ClaimRoute()
        claimed: list[RemoteJob] = []
        commits: list[_Commit] = []
        types = list(content_types)
        ts = now.timestamp()
        spare = None
        if not self._pending_types.isdisjoint(types):
            spare = stage_open(self._incoming, "claim.json", b"", sync=False)
        try:
            with self._locked():
                controls = self._read_controls()
                room: dict[str, int] = {}
                for ct in list(types):
                    control = controls.get(ct)
                    most = route.limit_for(ct, control)
                    if control is not None and control.paused:
                        types.remove(ct)
                    elif most is not None:
                        room[ct] = most - self.catalog.count("processing", ct)
                types = [ct for ct in types if room.get(ct, 1) > 0]
                keys: set[str | None] = {None}
                if route.capabilities is not None and types:
                    keys |= {k for k in self.catalog.requirement_keys(types, ts)
                             if self.catalog.requirements[k].met_by(route.capabilities)}
                seen: set[str] = set()
                while len(claimed) < limit and types:
                    job_id = next((j for j in self.catalog.candidates(types, ts, keys) if j not in seen), None)
                    if job_id is None:
                        break
                    seen.add(job_id)
                    entry = self.catalog.entries[job_id]
                    if entry.expires is not None and entry.expires <= ts:
                        continue  # expired: expire_due times it out; never handed to a worker
                    try:
                        copies = self._known_copies(job_id)
                        if not copies or copies[0][0].status != "pending":
                            self.catalog.apply(job_id, copies[0][0] if copies else None)
                            continue
                        current = copies[0][0]
                        new = mutate(current.copy())
                        new.version = current.version + 1
                        used, spare = spare, None  # _place closes it or hands it on
                        commits.append(self._place(new, copies, spare=used))
                    except Exception as exc:
                        if not claimed:
                            raise
                        # the jobs claimed so far are the caller's now: hand them over, or their
                        # leases would run out with no one working on them
                        log.error("store.claim_stopped", claimed=len(claimed), error=str(exc))
                        break
                    claimed.append(new)
                    if new.content_type in room:
                        room[new.content_type] -= 1
                        if room[new.content_type] <= 0:
                            types.remove(new.content_type)
        finally:
            if spare is not None:  # nothing claimed, or made before a claim that failed
                os.close(spare[1])
                unlink_quietly(spare[0])
        if commits:
            self._settle(commits)
        return claimed

    # -- type controls (pause, limit) ----------------------------------------------------------

    def _read_controls(self) -> dict[str, TypeControl]:
        """The stored controls, read again only when the file changed (a stat per call)."""
        try:
            st = os.stat(self._controls_file)
        except FileNotFoundError:
            self._controls = (None, {})
            return {}
        signature = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._controls[0] != signature:
            try:
                raw = json.loads(read_bytes(self._controls_file))
                parsed = {}
                for ct, v in raw.items():
                    most = v.get("max_processing")
                    if most is not None and (isinstance(most, bool) or not isinstance(most, int) or most < 0):
                        raise ValueError(f"{ct}: max_processing {most!r} is not a whole number, 0 or more")
                    parsed[ct] = TypeControl(ct, paused=v.get("paused") is True, max_processing=most,
                                             updated_at=from_iso(v.get("updated_at")))
            except (ValueError, TypeError, AttributeError) as exc:
                # an unreadable file pauses nothing and limits nothing beyond the configuration;
                # the next change writes it whole again
                log.error("store.controls_unreadable", file=CONTROLS_FILE, reason=str(exc))
                parsed = {}
            self._controls = (signature, parsed)
        return self._controls[1]

    def controls(self) -> dict[str, TypeControl]:
        with self.lock.hold(exclusive=False):
            return dict(self._read_controls())

    def set_control(self, content_type: str, change: Callable[[TypeControl], TypeControl],
                    now: datetime) -> TypeControl:
        with self._locked():
            current = dict(self._read_controls())
            new = change(current.get(content_type) or TypeControl(content_type))
            new = TypeControl(content_type, new.paused, new.max_processing, now)
            current[content_type] = new
            body = {ct: {"paused": c.paused, "max_processing": c.max_processing, "updated_at": to_iso(c.updated_at)}
                    for ct, c in sorted(current.items())}
            write_atomic(self._controls_file, json.dumps(body, sort_keys=True).encode())
            # a journal line, so that every process's long polls look again (a resume frees jobs)
            self._position = self.journal.append([CONTROLS_JOURNAL_ID])
            self.notify_local()
        return new

    def expired_pending(self, now: datetime, limit: int) -> list[str]:
        """Asked by every poll, so without a lock when nothing can have expired (see lapsed)."""
        if (now.timestamp() < self._first_expiry and self._pid == os.getpid()
                and self.journal.end() == self._position):
            return []
        with self._locked(exclusive=False):
            return self.catalog.expired_pending(now.timestamp(), limit)

    def delete(self, job_id: str, only_if: Callable[[RemoteJob], bool] | None = None) -> bool:
        if not valid_job_id(job_id):
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
                fsync_dir(os.path.dirname(p))
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
        """Every poll asks this first, so the common answer (nothing lapsed) takes no lock: when no
        process changed anything since this one last synced (the journal ends where it did) and the
        first lease this process knows of ends after ``now``, nothing lapsed."""
        if (now.timestamp() < self._first_lease_end and self._pid == os.getpid()
                and self.journal.end() == self._position):
            return []
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

    def availability(self, content_types: Iterable[str], now: datetime,
                     route: ClaimRoute | None = None) -> Availability:
        """From the catalog, under a shared hold: the counts per type and requirement set, the
        controls (paused types left out, limited ones capped by their room) as a claim reads them."""
        route = route or ClaimRoute()
        ts = now.timestamp()
        types = set(content_types)
        ready: list[Claimable] = []
        with self._locked(exclusive=False):
            controls = self._read_controls()
            for ct in sorted(types):
                control = controls.get(ct)
                if control is not None and control.paused:
                    continue
                most = route.limit_for(ct, control)
                room = None if most is None else most - self.catalog.count("processing", ct)
                if room is not None and room <= 0:
                    continue
                for key, n in self.catalog.ready_counts(ct, ts).items():
                    ready.append(Claimable(ct, None if key is None else self.catalog.requirements[key],
                                           n if room is None else min(n, room)))
            lease_end = self.catalog.next_lease_end()
            times = [t for t in (self.catalog.next_available(types), lease_end)
                     if t is not None and ts < t < float("inf")]
        return Availability(tuple(ready), _dt(min(times)) if times else None, lapsed=lease_end <= ts)

    def iter_all(self) -> Iterator[RemoteJob]:
        for job_id in sorted(self._scan_ids()):
            job = self._read(job_id)
            if job is not None:
                yield job

    def check_writable(self) -> None:
        """A file can be written, and the lock writers take can be had (within the bound: a
        process stopped while it holds the lock stops every write, StoreBusy says so)."""
        # a name per call: threads probing at once must not replace or remove each other's file
        probe = self.root / f"{TEMP_PREFIX}health.{os.getpid()}.{secrets.token_hex(8)}"
        try:
            write_atomic(probe, b"ok", sync_dir=False)
            unlink_quietly(probe)
        except OSError as exc:
            raise StoreUnavailable(f"the job store is not writable: {exc.strerror}") from None
        with self.lock.hold(exclusive=True):
            pass

    # -- change notification (long polls) ------------------------------------------------------

    def change_marker(self) -> int:
        """A number that grows with every change this process makes or notices. Take it before
        looking for work, pass it to :meth:`wait_for_change`: a change in between is not missed."""
        return self._changes

    def wait_for_change(self, timeout: float, since: int | None = None) -> bool:
        """Wait until the store changes (after ``since``, a :meth:`change_marker`), or ``timeout``
        passes; True when it changed.

        A change made by this process wakes its waiters at once; one watcher thread per process
        notices the changes of other processes (the journal's end moves) within ``watch_interval``
        seconds. The watcher runs only while someone waits (it stops ``watch_linger`` seconds after
        the last one left), so idle long polls cost two stats per interval per process.
        """
        with self._changed:
            self._waiting += 1
        try:
            self._ensure_watcher()
            with self._changed:
                if since is None:
                    return self._changed.wait(timeout)
                return self._changed.wait_for(lambda: self._changes != since, timeout)
        finally:
            with self._changed:
                self._waiting -= 1

    def _ensure_watcher(self) -> None:
        if self._watcher is not None and self._pid == os.getpid():
            return
        before = self._position if self._pid == os.getpid() else None
        with self._locked(exclusive=False):
            baseline = self._position
            with self._changed:
                if before != baseline:  # changes learnt here would reach no waiter otherwise
                    self._bump()
                if self._watcher is None:
                    self._watcher = threading.Thread(target=_watch, args=(weakref.ref(self), baseline),
                                                     name="store-watcher", daemon=True)
                    self._watcher.start()

    def _bump(self) -> None:
        """Count a change and wake every waiter (caller holds ``_changed``)."""
        self._changes += 1
        self._changed.notify_all()

    def notify_local(self) -> None:
        """Wake this process's waiting long polls now (a change made by this process)."""
        with self._changed:
            self._bump()


def _watch(ref: "weakref.ref[FileJobStore]", last: Position | None) -> None:
    """The watcher thread: wake the store's waiters when the journal's end moves. Holds the store
    only weakly, and ends when it is gone or nobody has waited for the store's ``watch_linger``."""
    idle_since = time.monotonic()
    while True:
        store = ref()
        if store is None:
            return
        interval = store._watch_interval
        try:
            current = store.journal.signature()
        except OSError:  # the store's directory was removed (tests' tmp dirs)
            current = None
        with store._changed:
            if current is None and not store.root.is_dir():
                store._watcher = None
                return
            if current != last:
                last = current
                store._bump()
            if store._waiting:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > store._watch_linger:
                store._watcher = None
                return
        del store
        time.sleep(interval)


@dataclass
class _Commit:
    """A write that is in place but not yet settled: where it went, and the copies it replaced."""

    target: str
    stale: list[tuple[str, int]]
    fd: int | None = None  # the new file, written under the lock: fsynced and closed by _settle


class _Locked:
    """Context manager: take the store lock, then sync the catalog (built outside the lock when
    this process has none: a build under the lock would stop every writer for as long as it takes)."""

    ATTEMPTS = 3  # builds outside the lock before one is made under it (a gap each time: rare)

    def __init__(self, store: FileJobStore, exclusive: bool) -> None:
        self.store = store
        self.exclusive = exclusive

    def __enter__(self) -> None:
        store = self.store
        nested = store.lock.held()  # a hold inside a hold cannot let go to build
        for attempt in range(self.ATTEMPTS):
            if not nested:
                store._build_outside_lock()
            self.cm = store.lock.hold(self.exclusive)
            self.cm.__enter__()
            try:
                if store._sync(rebuild=nested or attempt == self.ATTEMPTS - 1):
                    return
            except BaseException:
                self.cm.__exit__(None, None, None)
                raise
            self.cm.__exit__(None, None, None)

    def __exit__(self, *exc) -> None:
        self.store._first_lease_end = self.store.catalog.next_lease_end()
        self.store._first_expiry = self.store.catalog.next_expiry()
        self.store._pending_types = self.store.catalog.pending_types()
        self.cm.__exit__(*exc)


def encode_job(job: RemoteJob) -> bytes:
    return json.dumps(job.to_dict(), separators=(",", ":"), sort_keys=True).encode()


def _dt(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, timezone.utc) if ts is not None else None

