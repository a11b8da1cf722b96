"""The PostgreSQL job repository: the scale-out backend, for several API hosts sharing one database.

One row per job: the columns that queries filter and order on, plus the whole record as JSONB
(``doc``), which is what reads return. Semantics are the JSON-file store's (``files.py``):

- ``update``: ``SELECT ... FOR UPDATE`` of the row, the service's mutator applied to the job in
  Python, ``UPDATE``, all in one transaction. A mutator that raises rolls the transaction back and
  the exception propagates (the service refuses or skips that way).
- ``claim``: per wanted content type, the best pending jobs in claim order are locked with
  ``FOR UPDATE SKIP LOCKED`` over the partial index ``remote_jobs_claim``; the best ``limit`` of
  them are mutated and written. Concurrent claims never wait on each other and never get the same
  job; the cost does not grow with the number of pending jobs.
- A change that leaves a job pending (create, retry, re-queue) sends ``NOTIFY`` in the same
  transaction, which wakes long polls on every host (``pgdb.Database.wait``).
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator

from psycopg.types.json import Jsonb

from ...exceptions import InvalidRequest, JobNotFound, StoreUnavailable
from ...models import ANNOUNCED, RemoteJob, Status, valid_job_id
from ...routing import Requirements, requirement_key
from ..base import Availability, Claimable, ClaimRoute, JobFilter, Mutator, StoreStats, TypeControl
from .db import Database

_PENDING = Status.PENDING.value

WRITE_COLUMNS = ("status", "content_type", "priority", "created_at", "available_at", "timeout_at",
                  "completed_at", "finished_at", "seen_at", "worker_id", "ingestion_task_id", "version", "doc",
                  "requires_key", "expires_at")
_INSERT = (f"INSERT INTO remote_jobs (id, {', '.join(WRITE_COLUMNS)}) "
           f"VALUES (%(id)s, {', '.join(f'%({c})s' for c in WRITE_COLUMNS)})")
_UPDATE = (f"UPDATE remote_jobs SET {', '.join(f'{c} = %({c})s' for c in WRITE_COLUMNS)} "
           "WHERE id = %(id)s")

# Per wanted content type and requirement set the poller meets, up to that type's room of jobs: each
# branch an ordered walk of the claim index (content_type, requires_key, priority, created_at, id)
# that skips rows another transaction holds; the caller keeps the best ``limit`` overall (Python's
# sort, same key as the index) within each type's room, and the surplus locks end with the
# transaction. The sets are the rows of remote_job_requirements the capabilities meet (labels a
# subset, every minimum met), each tested once, plus '' (no requirement) for every poller.
_CLAIM = """
WITH sets AS (
    SELECT ''::text COLLATE "C" AS key
    UNION ALL
    SELECT r.key FROM remote_job_requirements r
     WHERE %(capable)s AND r.labels <@ %(labels)s::text[]
       AND NOT EXISTS (SELECT 1 FROM jsonb_each(r.minimums) AS m(name, need)
                        WHERE NOT (%(resources)s::jsonb ? m.name)
                           OR (%(resources)s::jsonb ->> m.name)::numeric < (m.need #>> '{}')::numeric))
SELECT j.version, j.doc, j.content_type
  FROM unnest(%(types)s::text[], %(room)s::int[]) AS t(content_type, room)
  CROSS JOIN sets s
  CROSS JOIN LATERAL (
        SELECT version, doc, priority, created_at, id, content_type
          FROM remote_jobs
         WHERE status = 'pending' AND content_type = t.content_type AND requires_key = s.key
           AND available_at <= %(now)s AND (expires_at IS NULL OR expires_at > %(now)s)
         ORDER BY priority DESC, created_at, id
         LIMIT t.room
           FOR UPDATE SKIP LOCKED) AS j
 ORDER BY j.priority DESC, j.created_at, j.id
 LIMIT %(limit)s
"""
# What waiting long polls could claim: per wanted type and requirement set (every row of
# remote_job_requirements, and '' for none), how many jobs are available now, counted up to %(cap)s
# (no more waiters than that could be woken) along the claim index; then when the next delayed job
# becomes available and when the first lease ends.
_AVAILABLE = """
SELECT t.content_type, s.key, s.labels, s.minimums, c.n
  FROM unnest(%(types)s::text[]) AS t(content_type)
  CROSS JOIN (SELECT ''::text COLLATE "C" AS key, NULL::text[] AS labels, NULL::jsonb AS minimums
              UNION ALL SELECT key, labels, minimums FROM remote_job_requirements) AS s
  CROSS JOIN LATERAL (
        SELECT count(*) AS n FROM (
            SELECT 1 FROM remote_jobs
             WHERE status = 'pending' AND content_type = t.content_type AND requires_key = s.key
               AND available_at <= %(now)s AND (expires_at IS NULL OR expires_at > %(now)s)
             LIMIT %(cap)s) AS up_to_cap) AS c
 WHERE c.n > 0
"""
_NEXT_AT = """
SELECT (SELECT min(available_at) FROM remote_jobs
         WHERE status = 'pending' AND content_type = ANY(%(types)s) AND available_at > %(now)s),
       (SELECT min(timeout_at) FROM remote_jobs WHERE status = 'processing')
"""
_CONTROLS = "SELECT content_type, paused, max_processing, updated_at FROM remote_job_types"
_SET_CONTROL = ("INSERT INTO remote_job_types (content_type, paused, max_processing, updated_at) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (content_type) DO UPDATE SET paused = EXCLUDED.paused, "
                "max_processing = EXCLUDED.max_processing, updated_at = EXCLUDED.updated_at")


def type_lock_key(content_type: str) -> int:
    """The advisory lock (a signed 64-bit key) a claim of a type with a limit holds until it commits:
    claims of that type take turns between counting and committing, so the count is exact."""
    digest = hashlib.sha256(f"morag_remote.max_processing:{content_type}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def job_from_row(version: int, doc: dict[str, Any]) -> RemoteJob:
    job = RemoteJob.from_dict(doc)
    job.version = version
    return job


def _check_id(job_id: str) -> None:
    """The file store's rule for ids (a NUL, for one, is no id and PostgreSQL text cannot hold it)."""
    if not valid_job_id(job_id):
        raise JobNotFound(f"no job with id {job_id!r}")


def utf8_document(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` (JSON-ready data), refused (422) when it holds text PostgreSQL cannot store.

    Python keeps a file name that is not UTF-8 (or a lone surrogate sent as ``"\\ud800"``) as
    surrogates; the file store writes them escaped, but PostgreSQL's text and jsonb are UTF-8 only.
    """
    try:
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("the job holds text that is not valid UTF-8 (a file name in another "
                             "encoding?), which the PostgreSQL backend cannot store") from None
    return doc


def row_params(job: RemoteJob) -> dict[str, Any]:
    created = job.created_at
    if created is None:
        raise ValueError(f"job {job.id} has no created_at")
    announced = Status(job.status) in ANNOUNCED  # held jobs too: reconciliation sends job.held
    return {
        "id": job.id,
        "status": job.status,
        "content_type": job.content_type,
        "priority": job.priority,
        "created_at": created,
        "available_at": job.available_at or created,
        "timeout_at": job.timeout_at,
        "completed_at": job.completed_at,
        "finished_at": (job.completed_at or job.updated_at) if announced else None,
        "seen_at": job.heartbeat_at or job.started_at,
        "worker_id": job.worker_id,
        "ingestion_task_id": job.ingestion_task_id,
        "version": job.version,
        "doc": Jsonb(utf8_document(job.to_dict())),
        "requires_key": requirement_key(job.requires) or "",
        "expires_at": job.expires_at,
    }


class PostgresJobStore:
    def __init__(self, db: Database, batch_size: int = 1000) -> None:
        self.db = db
        self.batch_size = batch_size
        self._limited: frozenset[str] = frozenset()  # types that had a limit at this process's last claim

    # -- writes ----------------------------------------------------------------------------------

    def _announce(self, conn, job: RemoteJob) -> None:
        if job.status == _PENDING:
            self.db.notify(conn, job.content_type)

    @staticmethod
    def _register_requirements(conn, job: RemoteJob) -> None:
        """Make the job's requirement set one of those claims test (once per distinct set)."""
        requirements = Requirements.of(job.requires)
        if requirements is not None:
            conn.execute("INSERT INTO remote_job_requirements (key, labels, minimums) VALUES (%s, %s, %s) "
                         "ON CONFLICT (key) DO NOTHING",
                         (requirements.key, sorted(requirements.labels), Jsonb(dict(requirements.minimums))))

    def create(self, job: RemoteJob) -> RemoteJob:
        job.version = 1
        params = row_params(job)
        with self.db.transaction() as conn:
            self._register_requirements(conn, job)
            inserted = conn.execute(_INSERT + " ON CONFLICT (id) DO NOTHING", params).rowcount
            if not inserted:
                raise ValueError(f"job {job.id} exists")
            self._announce(conn, job)
        self._changed(job)
        return job

    def put(self, job: RemoteJob) -> RemoteJob:
        with self.db.transaction() as conn:
            row = conn.execute("SELECT version FROM remote_jobs WHERE id = %s FOR UPDATE", (job.id,)).fetchone()
            job.version = row[0] + 1 if row else max(job.version, 1)
            self._register_requirements(conn, job)
            conn.execute(_UPDATE if row else _INSERT, row_params(job))
            self._announce(conn, job)
        self._changed(job)
        return job

    @staticmethod
    def _lock_row(conn, job_id: str) -> RemoteJob:
        """The job's row, locked until the transaction ends; JobNotFound when there is none."""
        row = conn.execute("SELECT version, doc FROM remote_jobs WHERE id = %s FOR UPDATE",
                           (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return job_from_row(*row)

    def update(self, job_id: str, mutate: Mutator) -> RemoteJob:
        _check_id(job_id)
        with self.db.transaction() as conn:
            current = self._lock_row(conn, job_id)
            new = mutate(current.copy())
            new.version = current.version + 1
            conn.execute(_UPDATE, row_params(new))
            self._announce(conn, new)
            if (current.status == Status.PROCESSING.value != new.status and new.content_type in self._limited):
                self.db.notify(conn, new.content_type)  # a slot of a limited type is free: pollers look again
        self._changed(new)
        return new

    def claim(self, content_types: Iterable[str], limit: int, now: datetime,
              mutate: Mutator, route: ClaimRoute | None = None) -> list[RemoteJob]:
        """See the module docstring. Paused types are left out and each limited type's room is its
        limit less the jobs processing, counted after taking the type's advisory lock in this
        transaction (READ COMMITTED: the count sees every claim committed before the lock was
        granted, and no other claim of the type can commit until this one does)."""
        route = route or ClaimRoute()
        types = sorted(set(content_types))
        self.db.mark_seen()
        if not types or limit <= 0:
            return []
        claimed: list[RemoteJob] = []
        with self.db.transaction() as conn:
            controls = {row[0]: TypeControl(*row) for row in
                        conn.execute(_CONTROLS + " WHERE content_type = ANY(%s)", (types,)).fetchall()}
            types = [t for t in types if not (t in controls and controls[t].paused)]
            limits = {t: most for t in types if (most := route.limit_for(t, controls.get(t))) is not None}
            if not set(limits) <= self._limited:
                self._limited = self._limited | frozenset(limits)
            room = {t: limit for t in types}
            if limits:
                for t in sorted(limits):  # one order for every claim: no deadlock between them
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (type_lock_key(t),))
                busy = dict(conn.execute("SELECT content_type, count(*) FROM remote_jobs WHERE status = 'processing' "
                                         "AND content_type = ANY(%s) GROUP BY content_type",
                                         (sorted(limits),)).fetchall())
                for t, most in limits.items():
                    room[t] = min(limit, max(most - busy.get(t, 0), 0))
                types = [t for t in types if room[t] > 0]
            if not types:
                return []
            caps = route.capabilities
            rows = conn.execute(_CLAIM, {
                "types": types, "room": [room[t] for t in types], "now": now, "limit": limit,
                "capable": caps is not None, "labels": sorted(caps.labels) if caps else [],
                "resources": Jsonb(dict(caps.resources) if caps else {})}).fetchall()
            for version, doc, content_type in rows:
                if room[content_type] <= 0:
                    continue  # a type's room is shared by its requirement sets
                room[content_type] -= 1
                current = job_from_row(version, doc)
                new = mutate(current.copy())
                new.version = current.version + 1
                conn.execute(_UPDATE, row_params(new))
                claimed.append(new)
        return claimed

    def controls(self) -> dict[str, TypeControl]:
        with self.db.transaction() as conn:
            return {row[0]: TypeControl(*row) for row in conn.execute(_CONTROLS).fetchall()}

    def set_control(self, content_type: str, change: Callable[[TypeControl], TypeControl],
                    now: datetime) -> TypeControl:
        with self.db.transaction() as conn:
            row = conn.execute(_CONTROLS + " WHERE content_type = %s FOR UPDATE", (content_type,)).fetchone()
            new = change(TypeControl(*row) if row else TypeControl(content_type))
            new = TypeControl(content_type, new.paused, new.max_processing, now)
            conn.execute(_SET_CONTROL, (content_type, new.paused, new.max_processing, now))
            self.db.notify(conn, content_type)  # a resumed type or a raised limit frees jobs: look again
        self.db.wake_local()
        return new

    def expired_pending(self, now: datetime, limit: int) -> list[str]:
        return self._ids("SELECT id FROM remote_jobs WHERE status = 'pending' AND expires_at <= %s "
                         "ORDER BY expires_at, id LIMIT %s", now, limit)

    def delete(self, job_id: str, only_if: Callable[[RemoteJob], bool] | None = None) -> bool:
        """Delete the job; with ``only_if``, only when the predicate holds for the locked row."""
        _check_id(job_id)
        with self.db.transaction() as conn:
            current = self._lock_row(conn, job_id)
            if only_if is not None and not only_if(current):
                return False
            conn.execute("DELETE FROM remote_jobs WHERE id = %s", (job_id,))
        return True

    def _changed(self, job: RemoteJob) -> None:
        if job.status == _PENDING:
            self.db.wake_local()  # this process's waiters need not wait for the round trip

    # -- reads -----------------------------------------------------------------------------------

    def get(self, job_id: str) -> RemoteJob:
        _check_id(job_id)
        with self.db.transaction() as conn:
            row = conn.execute("SELECT version, doc FROM remote_jobs WHERE id = %s", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job with id {job_id!r}")
        return job_from_row(*row)

    def list(self, filters: JobFilter, after: str | None, limit: int) -> tuple[list[RemoteJob], str | None]:
        where, params = [], []
        for column in ("status", "content_type", "ingestion_task_id", "worker_id"):
            value = getattr(filters, column)
            if value is not None:
                where.append(f"{column} = %s")
                params.append(value)
        if after:
            after = after.replace("\x00", "")  # a cursor is compared, never stored: drop what text cannot hold
            where.append("id > %s")
            params.append(after)
        query = ("SELECT version, doc FROM remote_jobs"
                 + (" WHERE " + " AND ".join(where) if where else "")
                 + " ORDER BY id LIMIT %s")
        with self.db.transaction() as conn:
            rows = conn.execute(query, [*params, limit + 1]).fetchall()
        jobs = [job_from_row(*row) for row in rows[:limit]]
        return jobs, (jobs[-1].id if len(rows) > limit and jobs else None)

    def _ids(self, query: str, *params: Any) -> list[str]:
        with self.db.transaction() as conn:
            return [row[0] for row in conn.execute(query, params).fetchall()]

    def lapsed(self, now: datetime, limit: int) -> list[str]:
        return self._ids("SELECT id FROM remote_jobs WHERE status = 'processing' AND timeout_at <= %s "
                         "ORDER BY timeout_at, id LIMIT %s", now, limit)

    def pending_available_before(self, cutoff: datetime, limit: int) -> list[str]:
        return self._ids("SELECT id FROM remote_jobs WHERE status = 'pending' AND available_at < %s "
                         "ORDER BY available_at, id LIMIT %s", cutoff, limit)

    def recently_completed(self, content_type: str, limit: int) -> list[RemoteJob]:
        with self.db.transaction() as conn:
            rows = conn.execute("SELECT version, doc FROM remote_jobs WHERE status = 'completed' "
                                "AND content_type = %s ORDER BY completed_at DESC, id DESC LIMIT %s",
                                (content_type, limit)).fetchall()
        return [job_from_row(*row) for row in rows]

    def finished_since(self, cutoff: datetime, limit: int, after_id: str | None = None) -> list[str]:
        if after_id is None:
            return self._ids("SELECT id FROM remote_jobs WHERE finished_at >= %s "
                             "ORDER BY finished_at, id LIMIT %s", cutoff, limit)
        return self._ids("SELECT id FROM remote_jobs WHERE finished_at IS NOT NULL "
                         "AND (finished_at, id) > (%s, %s) ORDER BY finished_at, id LIMIT %s",
                         cutoff, after_id.replace("\x00", ""), limit)

    def finished_before(self, cutoff: datetime, limit: int) -> list[str]:
        return self._ids("SELECT id FROM remote_jobs WHERE finished_at < %s AND status <> 'held' "
                         "ORDER BY finished_at, id LIMIT %s", cutoff, limit)

    def stats(self) -> StoreStats:
        with self.db.transaction() as conn:
            counts = conn.execute("SELECT status, content_type, count(*) FROM remote_jobs "
                                  "GROUP BY status, content_type").fetchall()
            oldest = conn.execute("SELECT min(created_at) FROM remote_jobs WHERE status = 'pending'").fetchone()[0]
            seen = conn.execute("SELECT worker_id, max(seen_at) FROM remote_jobs "
                                "WHERE worker_id IS NOT NULL AND seen_at IS NOT NULL "
                                "GROUP BY worker_id").fetchall()
        return StoreStats(counts={(s, ct): n for s, ct, n in counts},
                          oldest_pending_created_at=oldest,
                          worker_last_seen=dict(seen))

    def availability(self, content_types: Iterable[str], now: datetime,
                     route: ClaimRoute | None = None, cap: int = 10_000) -> Availability:
        """See :class:`~..base.Availability`; each count stops at ``cap``. Marks this thread's
        changes seen first (:meth:`Database.wait`): a NOTIFY after this read wakes it again."""
        route = route or ClaimRoute()
        types = sorted(set(content_types))
        self.db.mark_seen()
        with self.db.transaction() as conn:
            controls = {row[0]: TypeControl(*row) for row in
                        conn.execute(_CONTROLS + " WHERE content_type = ANY(%s)", (types,)).fetchall()}
            room: dict[str, int | None] = {}
            for t in types:
                control = controls.get(t)
                if not (control is not None and control.paused):
                    room[t] = route.limit_for(t, control)
            limited = sorted(t for t, most in room.items() if most is not None)
            if limited:
                busy = dict(conn.execute("SELECT content_type, count(*) FROM remote_jobs WHERE status = 'processing' "
                                         "AND content_type = ANY(%s) GROUP BY content_type", (limited,)).fetchall())
                for t in limited:
                    room[t] = room[t] - busy.get(t, 0)
            wanted = sorted(t for t, left in room.items() if left is None or left > 0)
            rows = conn.execute(_AVAILABLE, {"types": wanted, "now": now, "cap": cap}).fetchall() if wanted else []
            next_available, lease_end = conn.execute(_NEXT_AT, {"types": types, "now": now}).fetchone()
        ready = []
        for content_type, key, labels, minimums, n in rows:
            requirements = Requirements.of({"labels": labels, "min": minimums}) if key else None
            left = room[content_type]
            ready.append(Claimable(content_type, requirements, n if left is None else min(n, left)))
        times = [t for t in (next_available, lease_end) if t is not None and t > now]
        return Availability(tuple(ready), min(times) if times else None,
                            lapsed=lease_end is not None and lease_end <= now)

    def iter_all(self) -> Iterator[RemoteJob]:
        """Every job in id order, read in batches (no transaction is held between batches)."""
        after = ""
        while True:
            with self.db.transaction() as conn:
                rows = conn.execute("SELECT version, doc FROM remote_jobs WHERE id > %s ORDER BY id LIMIT %s",
                                    (after, self.batch_size)).fetchall()
            for row in rows:
                yield job_from_row(*row)
            if len(rows) < self.batch_size:
                return
            after = rows[-1][1]["id"]

    # -- health and long polls -------------------------------------------------------------------

    def check_writable(self) -> None:
        with self.db.transaction() as conn:
            recovery, read_only = conn.execute(
                "SELECT pg_is_in_recovery(), current_setting('transaction_read_only')").fetchone()
        if recovery or read_only == "on":
            raise StoreUnavailable("the job database is read-only (a standby, or in read-only mode)")

    def change_marker(self) -> None:
        """None: a waiter is woken by the NOTIFY of any change made after it started waiting."""
        return None

    def wait_for_change(self, timeout: float, since: int | None = None) -> bool:
        return self.db.wait(timeout)
