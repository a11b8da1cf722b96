"""Long polls: a poll that found nothing waits, in its request's thread, until a job it could take
is there, then tries again; at most ``max_waiters`` wait per process at once.

A waiter sleeps on an event of its own. One *dispatcher* thread per process decides whom to wake:
whenever the store changes (a *listener* thread waits for that, :meth:`JobRepository.wait_for_change`,
so a thousand waiters cost one wait), a delayed job becomes available or a lease ends (one timer,
``Availability.next_at``), it reads what is claimable per content type and requirement set
(:meth:`JobRepository.availability`) and wakes at most that many waiters that can take it, oldest
first, counting those already woken and still claiming. A woken waiter that claims nothing (another
process was quicker, or the count was higher than a claim finds) waits again in its place, and is
not woken again until something changes (a store change, a timer, the sweep): the job it could not
take goes to the next waiter that can, so a job is never left while a waiter that could take it
sleeps, and a waiter that cannot is not woken over and over. Every ``SWEEP_SECONDS`` the dispatcher
looks again as if the store had changed, the safety net of whatever a notification missed.

The same thread watches the waiters' client sockets (``select.poll``, for a hang-up): a caller who
went away is noticed at once, its waiter woken to leave without claiming. A check without a socket
(``client_gone`` without ``fileno``) is asked every ``CLIENT_CHECK_SECONDS``.
"""
from __future__ import annotations

import functools
import itertools
import os
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import structlog

from ..models import Clock, RemoteJob
from ..routing import Capabilities
from ..store.base import Availability, ClaimRoute, Claimable, JobRepository

log = structlog.get_logger(__name__)

SWEEP_SECONDS = 2.0  # the dispatcher looks again at least this often while anyone waits
CLIENT_CHECK_SECONDS = 1.0  # how often a check without a socket is asked whether its caller is there
RETRY_SECONDS = 0.5  # after a look that failed (the store is down), before the next
LISTEN_SECONDS = 5.0  # the listener's wait for a store change is renewed this often
_HANGUP = getattr(select, "POLLRDHUP", 0) | select.POLLHUP | select.POLLERR  # POLLIN would fire on pipelined bytes


class ClientCheck(Protocol):
    """Has the caller hung up? ``fileno`` (optional): the socket whose hang-up says so."""

    def __call__(self) -> bool: ...


class Claimed(list):
    """The jobs a long poll claimed; ``host_full``: none, because the process had its most waiters."""

    host_full: bool = False


@dataclass(eq=False)
class _Waiter:
    seq: int
    types: frozenset[str]
    capabilities: Capabilities | None
    max_jobs: int
    client_gone: ClientCheck | None
    fd: int | None
    event: threading.Event = field(default_factory=threading.Event)
    woken: bool = False   # the dispatcher woke it, and it has not waited again since
    epoch: int = -1       # the dispatcher's epoch of its last wake-up (not woken again before the next)
    gone: bool = False    # its caller hung up

    def can_take(self, item: Claimable) -> bool:
        return item.content_type in self.types and (
            item.requirements is None or item.requirements.met_by(self.capabilities))


class LongPolls:
    def __init__(self, store: JobRepository, max_waiters: int, clock: Clock,
                 route: Callable[[], ClaimRoute] = ClaimRoute) -> None:
        """``route``: the configured limits (no capabilities), as claims apply them."""
        self.store = store
        self.clock = clock
        self.max_waiters = max(max_waiters, 1)
        self._route = route
        # metrics (metrics.py sets them): how many waiters each look woke; a poll turned away
        self.on_wake: Callable[[int], None] = lambda woken: None
        self.on_full: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}  # in arrival order: the oldest is woken first
        self._seq = itertools.count()
        self._epoch = 0        # moves with every store change, timer or sweep the dispatcher sees
        self._dirty = True     # the dispatcher must look (again)
        self._pid: int | None = None
        self._pipe: tuple[int, int] | None = None
        self._has_waiters = threading.Event()
        self._looked: frozenset[str] = frozenset()  # the types of the dispatcher's last look
        self._poked = False    # a poke is in the pipe: no need for another (the pipe never fills)
        self.wakeups = 0       # waiters woken to claim, so far (this process)
        self.looks = 0         # times the dispatcher read the store's availability

    @property
    def waiting(self) -> int:
        """How many long polls of this process are waiting right now."""
        return len(self._waiters)

    def marker(self) -> int | None:
        """Taken before a poll's first claim (:meth:`JobRepository.change_marker`): when it has not
        moved by the time the poll waits, the dispatcher need not look for it."""
        return self.store.change_marker()

    def wait_for(self, claim: Callable[[], list[RemoteJob]], types: Sequence[str], wait: float,
                 worker_id: str, client_gone: ClientCheck | None = None,
                 capabilities: Capabilities | None = None, max_jobs: int = 1,
                 marker: int | None = None) -> Claimed:
        """Call ``claim`` whenever the dispatcher says a job of ``types`` that ``capabilities`` meet
        is there, until it returns jobs or ``wait`` seconds have passed. Turned away at once
        (``host_full``) when the process already has its most waiters. With ``client_gone``, the
        wait ends (claiming nothing) as soon as the caller hangs up; it is asked before every claim."""
        result = Claimed()
        waiter = self._register(types, capabilities, max_jobs, client_gone, marker)
        if waiter is None:
            log.warning("poll.waiters_full", worker_id=worker_id, max_waiters=self.max_waiters)
            self.on_full()
            result.host_full = True
            return result
        try:
            deadline = time.monotonic() + wait
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not waiter.event.wait(remaining):
                    break
                waiter.event.clear()
                if waiter.gone or (client_gone is not None and client_gone()):
                    log.info("poll.client_gone", worker_id=worker_id, detail="the caller hung up while waiting")
                    break
                jobs = claim()  # woken: the event is set only to wake it or to say its caller is gone
                if jobs:
                    result.extend(jobs)
                    break
                with self._lock:  # nothing after all: wait again in this place, and let another look
                    waiter.woken = False
                    self._dirty = True
                self._poke()
        finally:
            self._unregister(waiter)
        return result

    # -- the registry ----------------------------------------------------------------------------

    def _register(self, types: Iterable[str], capabilities: Capabilities | None, max_jobs: int,
                  client_gone: ClientCheck | None, marker: int | None) -> _Waiter | None:
        """The new waiter, in the registry (None: the process has its most). The dispatcher looks
        for it unless nothing changed since its claim (``marker``) and it waits only for types
        the dispatcher's last look covered (whose timer then holds for it too)."""
        fileno = getattr(client_gone, "fileno", None)
        with self._lock:
            if len(self._waiters) >= self.max_waiters:
                return None
            self._start()
            waiter = _Waiter(next(self._seq), frozenset(types), capabilities, max(max_jobs, 1), client_gone,
                             fileno() if fileno is not None else None)
            self._waiters[waiter.seq] = waiter
            self._has_waiters.set()
            if marker is not None and marker == self.store.change_marker() and waiter.types <= self._looked:
                return waiter
            self._dirty = True  # a job may have come between its claim and now: look
        self._poke()
        return waiter

    def _unregister(self, waiter: _Waiter) -> None:
        with self._lock:
            del self._waiters[waiter.seq]
            if not self._waiters:
                self._has_waiters.clear()
                self._looked = frozenset()  # no look covers what changes while nobody waits
            if waiter.woken:  # woken, then left (claimed, or its caller went): what it did not take is free
                self._dirty = True
            else:
                return
        self._poke()

    def _start(self) -> None:
        """The dispatcher and the listener of this process (again after a fork; caller holds the lock)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._marker = self.store.change_marker()
        self._poked = False
        self._waiters.clear()
        self._has_waiters = threading.Event()
        poller = select.poll()
        poller.register(self._pipe[0], select.POLLIN)
        turn = functools.partial(self._turn, self._pipe, poller, {}, _Timers(time.monotonic()))
        for step, name in ((turn, "poll-dispatcher"), (self._listen, "poll-listener")):
            threading.Thread(target=self._forever, args=(step,), name=name, daemon=True).start()

    def _forever(self, step: Callable[[], None]) -> None:
        """A thread of the long polls: ``step`` again and again, and again a moment after it failed."""
        while True:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - the store is down, a metric cannot be written...
                log.warning("poll.look_failed", error=f"{type(exc).__name__}: {exc}",
                            detail="looked at again in a moment; the waiters time out meanwhile")
                with self._lock:
                    self._dirty = True
                time.sleep(RETRY_SECONDS)

    def _poke(self) -> None:
        """Make the dispatcher turn now (from any thread; what it must do is in its state already)."""
        if not self._poked:
            self._poked = True
            os.write(self._pipe[1], b"!")

    # -- the listener: one wait on the store for every waiter ------------------------------------

    def _listen(self) -> None:
        """One wait for a store change, for every waiter of the process (none while nobody waits)."""
        if not self._has_waiters.wait(LISTEN_SECONDS):
            return
        marker = self._marker
        changed = self.store.wait_for_change(LISTEN_SECONDS, since=marker)
        self._marker = self.store.change_marker()
        if changed or self._marker != marker:
            with self._lock:
                self._epoch += 1
                self._dirty = True
            self._poke()

    # -- the dispatcher --------------------------------------------------------------------------

    def _turn(self, pipe: tuple[int, int], poller: "select.poll", watched: dict[int, "_Waiter"],
              timers: "_Timers") -> None:
        """One turn of the dispatcher: sleep until a poke, a hang-up or a timer, then look if needed."""
        self._watch(poller, watched)
        now = time.monotonic()
        if self._waiters:
            asking = timers.next_check if self._unwatched() else None
            due = min(t for t in (timers.next_at, timers.next_sweep, asking) if t is not None)
            timeout_ms = max(int((due - now) * 1000) + 1, 0)
        else:
            timeout_ms = -1  # nobody waits: sleep until a poke
        for fd, _ in poller.poll(timeout_ms):
            if fd == pipe[0]:
                # the pokes: a few bytes at most (written only when none is there). Read first, then
                # let the next poke write: a poke in between skips its write, but it set what it
                # wants done (dirty) before poking, and that is read below, after the reset.
                os.read(fd, 4096)
                self._poked = False
            else:
                self._hung_up(fd, watched, poller)
        now = time.monotonic()
        if not self._waiters:
            timers.next_at = None
            return
        if now >= timers.next_check:
            timers.next_check = now + CLIENT_CHECK_SECONDS
            self._ask_unwatched()
        with self._lock:
            if (timers.next_at is not None and now >= timers.next_at) or now >= timers.next_sweep:
                self._epoch += 1
                self._dirty = True
                timers.next_at = None
                # every SWEEP_SECONDS whatever else makes the dispatcher look: polls that come and go
                # (each a look on PostgreSQL) must not put off the one look that wakes everyone again
                timers.next_sweep = now + SWEEP_SECONDS
            if not self._dirty:
                return
            self._dirty = False
            epoch = self._epoch
            types = frozenset().union(*(w.types for w in self._waiters.values()))
        available = self.store.availability(types, self.clock(), self._route())
        with self._lock:
            self._looked = types if self._waiters else frozenset()
        self.looks += 1
        if available.next_at is not None:
            timers.next_at = now + max((available.next_at - self.clock()).total_seconds(), 0.0)
        woken = self._wake(available, epoch)
        if woken:
            self.on_wake(woken)

    def _wake(self, available: Availability, epoch: int) -> int:
        """Wake, oldest first, as many waiters as there are jobs they can take (those woken and
        not back yet count first); with a lapsed lease and nobody busy, one more (its claim hands
        the lapsed jobs back first). How many were woken."""
        left = {item: item.count for item in available.ready}
        woken = 0
        with self._lock:
            waiters = list(self._waiters.values())
            busy = [w for w in waiters if w.woken]
            for w in busy:
                _take(w, left)
            spare = available.lapsed and not busy
            for w in waiters:
                if not spare and not any(left.values()):
                    break
                if w.woken or w.gone or w.epoch >= epoch:
                    continue
                if _take(w, left):
                    woken += self._wake_one(w, epoch)
                elif spare:
                    spare = False
                    woken += self._wake_one(w, epoch)
            self.wakeups += woken
        return woken

    @staticmethod
    def _wake_one(waiter: _Waiter, epoch: int) -> int:
        waiter.woken, waiter.epoch = True, epoch
        waiter.event.set()
        return 1

    # -- the callers' sockets --------------------------------------------------------------------

    def _watch(self, poller: "select.poll", watched: dict[int, _Waiter]) -> None:
        """Make the poll set the sockets of the waiters there are now."""
        with self._lock:
            current = {w.fd: w for w in self._waiters.values() if w.fd is not None and not w.gone}
        for fd in [fd for fd, w in watched.items() if current.get(fd) is not w]:
            poller.unregister(fd)
            del watched[fd]
        for fd, w in current.items():
            if fd not in watched:
                poller.register(fd, _HANGUP)
                watched[fd] = w

    def _hung_up(self, fd: int, watched: dict[int, _Waiter], poller: "select.poll") -> None:
        """A watched socket's peer shut down: wake its waiter to leave if its check agrees (bytes
        still to read mean a pipelined request: it is there, and the socket is watched no more)."""
        waiter = watched.pop(fd)  # the poll set holds only the watched sockets (and the pipe)
        poller.unregister(fd)
        with self._lock:
            registered = self._waiters.get(waiter.seq) is waiter
        if registered and waiter.client_gone is not None and waiter.client_gone():
            waiter.gone = True
            waiter.fd = None
            waiter.event.set()
        else:
            waiter.fd = None

    def _unwatched(self) -> list[_Waiter]:
        """The waiters whose caller can be asked, but has no socket to watch."""
        with self._lock:
            return [w for w in self._waiters.values() if w.fd is None and w.client_gone is not None and not w.gone]

    def _ask_unwatched(self) -> None:
        for w in self._unwatched():
            if w.client_gone():
                w.gone = True
                w.event.set()


@dataclass
class _Timers:
    """The dispatcher's clock (monotonic seconds): when availability changes by itself (a delayed
    job, a lease end), the next sweep, the next ask of the checks without a socket."""

    now: float
    next_at: float | None = None
    next_sweep: float = 0.0
    next_check: float = 0.0

    def __post_init__(self) -> None:
        self.next_sweep = self.now + SWEEP_SECONDS
        self.next_check = self.now + CLIENT_CHECK_SECONDS


def _take(waiter: _Waiter, left: dict[Claimable, int]) -> bool:
    """Count up to ``waiter.max_jobs`` of the jobs left as the waiter's; whether it took any."""
    want = waiter.max_jobs
    for item, n in left.items():
        if want and n and waiter.can_take(item):
            got = min(n, want)
            left[item] = n - got
            want -= got
    return want < waiter.max_jobs

