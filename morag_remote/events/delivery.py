"""Completion events from terminal transition to the receiver's 2xx: record, attempt, retry, reconcile.

How an event cannot be lost
---------------------------
The job and its event are two writes (two files; on PostgreSQL two transactions), so no single
commit covers both. The job is written first (by the service, under the store lock) and the event
is recorded right after, by :meth:`EventDelivery.job_finished`, before the first delivery attempt.
A crash (or a failed outbox write) between the two leaves a terminal job without an event; three
things put it back, none of which needs to know a crash happened, because event ids are derived
from the job (``model.event_id_for``) and recording is idempotent:

- :meth:`EventDelivery.reconcile` walks the terminal jobs that finished since the outbox's checkpoint
  (``JobRepository.finished_since``, an index lookup) and records any event that is missing; it runs
  from ``remote-jobs deliver`` and, throttled, after requests. The checkpoint trails the clock by
  ``RECONCILE_MARGIN`` so a job whose write was still in flight is looked at again next time.
- a job cannot leave its terminal state (``retry``) or disappear (``delete``, ``cleanup-old``)
  before :meth:`EventDelivery.job_leaving_terminal` has made sure its event exists: the only ways
  a not-yet-reconciled terminal state could vanish are closed.
- recording it first and attempting it second means a crash during an attempt leaves a pending
  event whose claim lapses; the next run sends it again (at least once; receivers dedup by id).

The alternative, recording the event inside the job's critical section before the job write, would
turn a crash into an event for a transition that never happened, which is worse than a late event.

Attempts
--------
The first attempt is made inline, in the request that finished the job, so ``ingestion_continued``
can say whether the receiver accepted it then. Failed attempts back off exponentially
(``CALLBACK_RETRY_SECONDS`` doubling up to ``CALLBACK_RETRY_MAX_SECONDS``, 10% jitter) and are retried
after later requests (:meth:`pump`, run once the response has been sent, at most one thread per
process, a few events per run, stopping at the first failure) and by ``remote-jobs deliver``. While a
receiver is failing, inline attempts to it are skipped in this process for ``CALLBACK_RETRY_SECONDS``,
so a dead receiver costs a request at most one timeout.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Mapping

import structlog

from ..exceptions import JobNotFound, StoreUnavailable
from ..models import RemoteJob, Status
from ..store.base import EventOutbox, JobRepository
from .destinations import job_webhook, normalize_prefixes, webhook_problem
from .model import Event, event_id_for, occurred_at
from .outbox import Checkpoint
from .transport import post_event

log = structlog.get_logger(__name__)

RECONCILE_MARGIN = timedelta(seconds=30)
RECONCILE_BATCH = 1000
PURGE_BATCH = 1000
CLAIM_MARGIN_SECONDS = 5.0


@dataclass(frozen=True)
class EventSettings:
    callback_url: str | None = None
    secret: str | None = None
    allowed_prefixes: tuple[str, ...] = ()
    connect_timeout: float = 2.0
    read_timeout: float = 5.0
    retry_seconds: float = 10.0
    retry_max_seconds: float = 3600.0
    pump_interval: float = 5.0
    pump_batch: int = 3
    reconcile_interval: float = 60.0
    retention_days: float = 7.0

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "EventSettings":
        return cls(
            callback_url=config.get("CALLBACK_URL") or None,
            secret=config.get("CALLBACK_SECRET") or None,
            allowed_prefixes=normalize_prefixes(config.get("CALLBACK_ALLOWED_PREFIXES")),
            connect_timeout=float(config["CALLBACK_CONNECT_TIMEOUT_SECONDS"]),
            read_timeout=float(config["CALLBACK_READ_TIMEOUT_SECONDS"]),
            retry_seconds=float(config["CALLBACK_RETRY_SECONDS"]),
            retry_max_seconds=float(config["CALLBACK_RETRY_MAX_SECONDS"]),
            pump_interval=float(config["CALLBACK_PUMP_INTERVAL_SECONDS"]),
            retention_days=float(config["CALLBACK_RETENTION_DAYS"]),
        )

    @property
    def enabled(self) -> bool:
        """Events are recorded when some job could have a receiver."""
        return bool(self.callback_url or self.allowed_prefixes)

    @property
    def claim_seconds(self) -> float:
        """How long an attempt in flight keeps others off the event (longer than any attempt)."""
        return self.connect_timeout + self.read_timeout + CLAIM_MARGIN_SECONDS


@dataclass
class DeliveryReport:
    delivered: int = 0
    failed: int = 0
    reconciled: int = 0
    purged: int = 0
    pending: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class EventDelivery:
    """The service's terminal listener and the outbox's courier."""

    def __init__(self, outbox: EventOutbox, store: JobRepository, settings: EventSettings,
                 clock: Callable[[], datetime], rng: Callable[[], float] = random.random) -> None:
        self.outbox = outbox
        self.store = store
        self.settings = settings
        self.clock = clock
        self.rng = rng
        self._down_until: dict[str | None, float] = {}
        self._pump_lock = threading.Lock()
        self._next_pump = 0.0
        self._next_reconcile = 0.0

    # -- the service's hooks ---------------------------------------------------------------------

    def job_finished(self, job: RemoteJob) -> bool:
        """Record the job's event, then attempt it once; True when the receiver accepted it now."""
        event = self._event_for(job)
        if event is None:
            return False
        inline = time.monotonic() >= self._down_until.get(event.webhook_url, 0.0)
        try:
            stored, claimed = self.outbox.record(event, self.clock(),
                                                 self.settings.claim_seconds if inline else None)
        except (OSError, StoreUnavailable) as exc:  # the job is committed; reconciliation records it later
            log.error("event.record_failed", event_id=event.id, job_id=job.id, error=str(exc))
            return False
        return self._attempt(stored) if claimed else False

    def job_leaving_terminal(self, job: RemoteJob) -> None:
        """Make sure the event of the terminal state ``job`` is leaving exists (see module doc)."""
        checkpoint = self.outbox.checkpoint()
        when = occurred_at(job)
        if checkpoint is not None and when is not None and checkpoint.covers(when, job.id):
            return  # reconciled already: its event was recorded (and may have been purged since)
        event = self._event_for(job)
        if event is not None:
            self.outbox.record(event, self.clock(), None)

    def job_accepted(self, job: RemoteJob) -> bool:
        """Whether the receiver has accepted the event of the job's terminal state."""
        state = self.delivery_state(job)
        return state is not None and state["state"] == "delivered"

    # -- reading ---------------------------------------------------------------------------------

    def delivery_state(self, job: RemoteJob) -> dict[str, Any] | None:
        """``event_delivery`` of a job: the state of its current terminal state's event, if any."""
        if not self.settings.enabled or not Status(job.status).is_announced:
            return None
        event = self.outbox.get(event_id_for(job))
        return event.public_state() if event is not None else None

    # -- delivery runs ---------------------------------------------------------------------------

    def deliver_pending(self, limit: int = 1000, due_only: bool = False) -> DeliveryReport:
        """Reconcile, then attempt up to ``limit`` pending events (``remote-jobs deliver``).

        Without ``due_only`` events still in backoff are sent now too. A receiver that fails once is
        not tried again in this run, so a dead one costs one timeout, not one per event.
        """
        report = DeliveryReport()
        if not self.settings.enabled:
            return report
        report.reconciled = self.reconcile()
        report.purged = self.purge()
        self._run(limit, due_only, report, stop_on_failure=False)
        report.pending = self.outbox.counts()["pending"]
        log.info("events.delivered", **report.as_dict())
        return report

    def pump_due(self) -> bool:
        return self.settings.enabled and time.monotonic() >= self._next_pump and not self._pump_lock.locked()

    def pump(self) -> None:
        """Bounded work after a response was sent: reconcile now and then, retry a few due events."""
        if not self._pump_lock.acquire(blocking=False):
            return
        try:
            self._next_pump = time.monotonic() + self.settings.pump_interval
            if time.monotonic() >= self._next_reconcile:
                self._next_reconcile = time.monotonic() + self.settings.reconcile_interval
                self.reconcile()
                self.purge()
            self._run(self.settings.pump_batch, True, DeliveryReport(), stop_on_failure=True)
        except Exception:  # a background chore must never take the server thread down
            log.exception("events.pump_failed")
        finally:
            self._pump_lock.release()

    def _run(self, limit: int, due_only: bool, report: DeliveryReport, stop_on_failure: bool) -> None:
        failed_webhooks: set[str | None] = set()
        for _ in range(limit):
            claimed = self.outbox.claim(self.clock(), 1, self.settings.claim_seconds, due_only=due_only,
                                        exclude_webhooks=failed_webhooks)
            if not claimed:
                return
            event = claimed[0]
            if self._attempt(event):
                report.delivered += 1
                continue
            report.failed += 1
            failed_webhooks.add(event.webhook_url)
            if stop_on_failure:
                return

    def reconcile(self, limit: int = RECONCILE_BATCH) -> int:
        """Record the events missing for terminal jobs finished since the checkpoint; returns how many."""
        now = self.clock()
        start = self.outbox.checkpoint() or Checkpoint(now - RECONCILE_MARGIN)
        ids = self.store.finished_since(start.when, limit, start.after_id)
        recorded = 0
        last: Checkpoint | None = None
        for job_id in ids:
            try:
                job = self.store.get(job_id)
            except JobNotFound:
                continue
            if not Status(job.status).is_announced:
                continue
            finished = occurred_at(job)
            if finished is not None:
                last = Checkpoint(finished, job.id)
            event = self._event_for(job)
            if event is not None and self.outbox.get(event.id) is None:
                self.outbox.record(event, now, None)
                recorded += 1
                log.warning("event.reconciled", event_id=event.id, job_id=job.id, job_status=job.status)
        if len(ids) < limit:
            self.outbox.set_checkpoint(Checkpoint(now - RECONCILE_MARGIN))
        elif last is not None:
            self.outbox.set_checkpoint(last)
        return recorded

    def purge(self) -> int:
        before = self.clock() - timedelta(days=self.settings.retention_days)
        return self.outbox.purge_delivered(before, PURGE_BATCH)

    # -- one attempt -----------------------------------------------------------------------------

    def _event_for(self, job: RemoteJob) -> Event | None:
        if not self.settings.enabled or not Status(job.status).is_announced:
            return None
        webhook = job_webhook(job.task_options, self.settings.allowed_prefixes)
        if webhook is None and not self.settings.callback_url:
            return None
        return Event.for_job(job, webhook, self.clock())

    def destination(self, event: Event) -> str | None:
        """Where ``event`` goes now: its job's webhook while still allowed, else the callback URL."""
        if event.webhook_url and webhook_problem(event.webhook_url, self.settings.allowed_prefixes) is None:
            return event.webhook_url
        return self.settings.callback_url

    def _attempt(self, event: Event) -> bool:
        """Send a claimed event once and record the outcome; True on a 2xx."""
        url = self.destination(event)
        if url is None:
            result_ok, error, status = False, "no callback URL is configured", None
        else:
            result = post_event(url, event.body.encode(), event.id, self.settings.secret,
                                connect_timeout=self.settings.connect_timeout,
                                read_timeout=self.settings.read_timeout)
            result_ok, error, status = result.ok, result.error, result.status
        now = self.clock()
        if result_ok:
            self.outbox.mark_delivered(event.id, now)
            self._down_until.pop(event.webhook_url, None)
            log.info("event.delivered", event_id=event.id, job_id=event.job_id, event_type=event.type,
                     attempts=event.attempts, status_code=status)
            return True
        delay = self.backoff(event.attempts)
        self.outbox.mark_failed(event.id, error or "failed", now + timedelta(seconds=delay))
        self._down_until[event.webhook_url] = time.monotonic() + self.settings.retry_seconds
        log.warning("event.delivery_failed", event_id=event.id, job_id=event.job_id, attempts=event.attempts,
                    status_code=status, error=error, retry_in_s=round(delay, 1))
        return False

    def backoff(self, attempts: int) -> float:
        """Delay after the n-th failed attempt: doubling from the base, capped, plus up to 10% jitter."""
        base = min(self.settings.retry_seconds * 2 ** min(max(attempts - 1, 0), 40), self.settings.retry_max_seconds)
        return base * (1 + 0.1 * self.rng())
