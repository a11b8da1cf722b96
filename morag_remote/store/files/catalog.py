"""A process's in-memory index of the job files: what a claim, a list or a stats call needs to know
without opening every file.

The files stay the truth. The index is rebuilt from them when a process first uses the store and is
kept current through the change journal (``journal.py``), so the cost of a claim does not grow with
the number of pending jobs, nor with the number pending of other content types.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Iterator

from sortedcontainers import SortedList

from ...models import ANNOUNCED, RemoteJob, Status
from ...routing import Requirements, requirement_key


@dataclass(slots=True)
class Entry:
    status: str
    content_type: str
    priority: int
    created: float
    available: float
    timeout: float | None
    finished: float | None
    ingestion_task_id: str
    worker_id: str | None
    seen: float | None
    version: int
    req: str | None = None        # the requirement set's key (routing.requirement_key); None: none
    expires: float | None = None  # expires_at of a pending job

    @classmethod
    def of(cls, job: RemoteJob) -> "Entry":
        created = _ts(job.created_at) or 0.0
        return cls(
            status=job.status,
            content_type=job.content_type,
            priority=job.priority,
            created=created,
            available=_ts(job.available_at) or created,
            timeout=_ts(job.timeout_at),
            finished=_ts(job.completed_at) or _ts(job.updated_at),
            ingestion_task_id=job.ingestion_task_id,
            worker_id=job.worker_id,
            seen=_ts(job.heartbeat_at) or _ts(job.started_at),
            version=job.version,
            req=requirement_key(job.requires),
            expires=_ts(job.expires_at),
        )


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


class Catalog:
    """Sorted views of the jobs by what each query orders on; every view changes in ``_index``."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self._all = SortedList()
        self._by_status: dict[str, SortedList] = {s.value: SortedList() for s in Status}
        self._counts: dict[tuple[str, str], int] = {}
        # content type -> requirement key (None: no requirement) -> (-priority, created, id): a claim
        # tests each distinct requirement set once and walks only the lists its poller can take
        self._ready: dict[str, dict[str | None, SortedList]] = {}
        self.requirements: dict[str, Requirements] = {}  # every requirement key seen -> its rule
        self._expiring = SortedList()                # (expires, id) of pending jobs with expires_at
        self._delayed: dict[str, SortedList] = {}    # content type -> (available, id)
        self._pending_age = SortedList()             # (created, id)
        self._pending_since = SortedList()           # (available, id): claimable since, for the TTL
        self._completed: dict[str, SortedList] = {}  # content type -> (finished, id) of completed jobs
        self._leases = SortedList()                  # (timeout, id) of processing jobs
        self._finished = SortedList()                # (finished, id) of terminal and held jobs
        self.worker_seen: dict[str, float] = {}
        # job id -> statuses other than its entry's whose folder may still hold an older copy of it
        # (a move whose writer has not removed the old file yet, or died before it could)
        self.elsewhere: dict[str, set[str]] = {}

    def clear(self) -> None:
        self.__init__()

    def apply(self, job_id: str, job: RemoteJob | None) -> None:
        """Make the index say what the store now holds for ``job_id`` (None: no such job)."""
        old = self.entries.pop(job_id, None)
        if old is not None:
            self._index(job_id, old, add=False)
        if job is None:
            self.elsewhere.pop(job_id, None)
        elif old is not None and old.status != job.status:
            self.elsewhere.setdefault(job_id, set()).add(old.status)
        if job is not None:
            entry = Entry.of(job)
            if entry.req is not None and entry.req not in self.requirements:
                self.requirements[entry.req] = Requirements.of(job.requires)
            self.entries[job_id] = entry
            self._index(job_id, entry, add=True)
            if entry.worker_id and entry.seen is not None:
                if entry.seen > self.worker_seen.get(entry.worker_id, 0.0):
                    self.worker_seen[entry.worker_id] = entry.seen

    def _index(self, job_id: str, e: Entry, add: bool) -> None:
        def op(sl: SortedList, key: tuple) -> None:
            if add:
                sl.add(key)
            else:
                sl.discard(key)

        op(self._all, job_id)
        op(self._by_status[e.status], job_id)
        count_key = (e.status, e.content_type)
        self._counts[count_key] = self._counts.get(count_key, 0) + (1 if add else -1)
        if e.status == Status.PENDING.value:
            delayed = self._delayed.setdefault(e.content_type, SortedList())
            if add:  # every pending job enters as delayed; candidates() promotes it when due
                delayed.add((e.available, job_id))
            else:
                groups = self._ready.get(e.content_type)
                ready = groups.get(e.req) if groups else None
                if ready is not None:
                    ready.discard((-e.priority, e.created, job_id))
                    if not ready:  # no empty lists: a claim walks only the sets that have jobs
                        del groups[e.req]
                delayed.discard((e.available, job_id))
            op(self._pending_age, (e.created, job_id))
            op(self._pending_since, (e.available, job_id))
            if e.expires is not None:
                op(self._expiring, (e.expires, job_id))
        elif e.status == Status.PROCESSING.value and e.timeout is not None:
            op(self._leases, (e.timeout, job_id))
        elif Status(e.status) in ANNOUNCED and e.finished is not None:
            op(self._finished, (e.finished, job_id))
            if e.status == Status.COMPLETED.value:
                op(self._completed.setdefault(e.content_type, SortedList()), (e.finished, job_id))

    def _promote(self, content_types: set[str], now: float) -> None:
        """Move jobs whose backoff has ended from the delayed view to the ready one."""
        for ct in content_types:
            delayed = self._delayed.get(ct)
            if not delayed or delayed[0][0] > now:
                continue
            # in bulk: after a start every pending job is due at once (50,000 one by one took the
            # first claim a quarter of a second, under the store lock)
            due = delayed.bisect_right((now, "\U0010ffff"))
            moving: dict[str | None, list[tuple]] = {}
            for _, job_id in delayed.islice(0, due):
                e = self.entries[job_id]
                moving.setdefault(e.req, []).append((-e.priority, e.created, job_id))
            del delayed[:due]
            groups = self._ready.setdefault(ct, {})
            for req, keys in moving.items():
                ready = groups.get(req)
                if ready is None:
                    groups[req] = SortedList(keys)
                else:
                    ready.update(keys)

    def requirement_keys(self, content_types: Iterable[str], now: float) -> set[str]:
        """The distinct requirement sets of the jobs of these types available at ``now``."""
        wanted = set(content_types)
        self._promote(wanted, now)
        return {key for ct in wanted for key in self._ready.get(ct, ()) if key is not None}

    def candidates(self, content_types: Iterable[str], now: float,
                   keys: Iterable[str | None] | None = None) -> Iterator[str]:
        """Pending ids available at ``now`` in claim order (priority, then age), across the types;
        with ``keys``, only jobs of those requirement sets (None in it: jobs without any)."""
        wanted = set(content_types)
        self._promote(wanted, now)
        if keys is None:
            lists = [sl for ct in wanted for sl in self._ready.get(ct, {}).values() if sl]
        else:
            keys = set(keys)
            lists = [sl for ct in wanted for key, sl in self._ready.get(ct, {}).items() if key in keys and sl]
        positions = [0] * len(lists)
        while True:
            best = None
            for i, sl in enumerate(lists):
                if positions[i] < len(sl) and (best is None or sl[positions[i]] < lists[best][positions[best]]):
                    best = i
            if best is None:
                return
            key = lists[best][positions[best]]
            positions[best] += 1
            yield key[2]

    def next_available(self, content_types: Iterable[str]) -> float | None:
        times = [self._delayed[ct][0][0] for ct in set(content_types) if self._delayed.get(ct)]
        return min(times) if times else None

    def ready_counts(self, content_type: str, now: float) -> dict[str | None, int]:
        """How many jobs of the type are available at ``now``, per requirement key (None: none)."""
        self._promote({content_type}, now)
        return {key: len(sl) for key, sl in self._ready.get(content_type, {}).items() if sl}

    def lapsed(self, now: float, limit: int) -> list[str]:
        out = []
        for timeout, job_id in self._leases:
            if timeout > now or len(out) >= limit:
                break
            out.append(job_id)
        return out

    def next_lease_end(self) -> float:
        """When the first lease ends (infinity when no job is processing)."""
        return self._leases[0][0] if self._leases else float("inf")

    def expired_pending(self, now: float, limit: int) -> list[str]:
        out = []
        for expires, job_id in self._expiring:
            if expires > now or len(out) >= limit:
                break
            out.append(job_id)
        return out

    def next_expiry(self) -> float:
        """When the first pending job expires (infinity when none has an expires_at)."""
        return self._expiring[0][0] if self._expiring else float("inf")

    def count(self, status: str, content_type: str) -> int:
        return self._counts.get((status, content_type), 0)

    def pending_available_before(self, cutoff: float, limit: int) -> list[str]:
        out = []
        for available, job_id in self._pending_since:
            if available >= cutoff or len(out) >= limit:
                break
            out.append(job_id)
        return out

    def recently_completed(self, content_type: str, limit: int) -> list[str]:
        """Ids of the ``limit`` most recently completed jobs of ``content_type``, newest first."""
        done = self._completed.get(content_type)
        if not done:
            return []
        return [job_id for _, job_id in done.islice(max(len(done) - limit, 0), reverse=True)]

    def finished_before(self, cutoff: float, limit: int) -> list[str]:
        """Terminal jobs only: a held job is in the view (for reconciliation) but is not finished."""
        out = []
        for finished, job_id in self._finished:
            if finished >= cutoff or len(out) >= limit:
                break
            if self.entries[job_id].status != Status.HELD.value:
                out.append(job_id)
        return out

    def finished_since(self, cutoff: float, limit: int, after_id: str | None = None) -> list[str]:
        if after_id is None:
            keys = self._finished.irange(minimum=(cutoff,))
        else:
            keys = self._finished.irange(minimum=(cutoff, after_id), inclusive=(False, True))
        out = []
        for _, job_id in keys:
            if len(out) >= limit:
                break
            out.append(job_id)
        return out

    def ids(self, status: str | None, after: str | None) -> Iterator[str]:
        """Ids in creation order (ids are time-ordered) after the cursor, optionally of one status."""
        sl = self._by_status[status] if status else self._all
        start = sl.bisect_right(after) if after else 0
        yield from sl.islice(start)

    def pending_types(self) -> frozenset[str]:
        """The content types of which at least one job is pending (available now or later)."""
        return frozenset(ct for (status, ct), n in self._counts.items() if n and status == Status.PENDING.value)

    def counts(self) -> dict[tuple[str, str], int]:
        return {key: n for key, n in self._counts.items() if n}

    def oldest_pending(self) -> float | None:
        return self._pending_age[0][0] if self._pending_age else None
