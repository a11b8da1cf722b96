"""The completion-events outbox in PostgreSQL, beside the PostgreSQL job store: any API host
records, reads and sends any event, and ``remote-jobs deliver`` on any host sends what any other
host recorded.

One row per event in ``event_outbox`` (migration 0004): the columns that claims, purges and counts
filter and order on, and the whole :class:`~morag_remote.events.model.Event` as JSONB (``doc``),
which is what reads return. The semantics are ``events.outbox.FileOutbox``'s, with its rules
(``claimable``, ``start_attempt``, ``schedule``) applied in Python to rows locked in the same
transaction:

- ``record``: one ``INSERT ... ON CONFLICT DO UPDATE`` that inserts the event or locks the existing
  row; a second recorder of the same id waits for the first one's commit, then gets its row and
  claims it only when it is pending, due and not held.
- ``claim``: ``SELECT ... FOR UPDATE SKIP LOCKED`` walking the partial index ``event_outbox_claim``
  in schedule order (``due_at``, ``created_at``, ``id``), then the claim is written in the same
  transaction: two deliverers never wait on each other and never take the same event.
- the reconciliation checkpoint is one row, moved only forward by a conditional upsert.
"""
from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, Callable, Collection

import structlog
from psycopg.types.json import Jsonb

from ...events.model import DELIVERED, PENDING, Event
from ...events.outbox import Checkpoint, claimable, start_attempt, valid_event_id
from .db import Database

log = structlog.get_logger(__name__)

_COLUMNS = ("id", "state", "webhook_url", "created_at", "next_attempt_at", "claimed_until", "delivered_at", "doc")
# The new row, or the existing one locked (ON CONFLICT DO UPDATE locks it, so it cannot be claimed or
# purged before this transaction ends), and whether it is new: a row this statement inserted has no
# xmax yet, one it locked has this transaction's.
_RECORD = (f"INSERT INTO event_outbox ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join(f'%({c})s' for c in _COLUMNS)}) "
           "ON CONFLICT (id) DO UPDATE SET id = EXCLUDED.id RETURNING doc, xmax = 0")
_UPDATE = (f"UPDATE event_outbox SET {', '.join(f'{c} = %({c})s' for c in _COLUMNS[1:])} "
           "WHERE id = %(id)s")
_CLAIM = """
SELECT doc FROM event_outbox
 WHERE state = 'pending' AND (claimed_until IS NULL OR claimed_until <= %(now)s){due}{webhooks}
 ORDER BY due_at, created_at, id
 LIMIT %(limit)s
   FOR UPDATE SKIP LOCKED
"""
_SET_CHECKPOINT = """
INSERT INTO event_checkpoint (only_row, reconciled_through, after_id) VALUES (true, %s, %s)
    ON CONFLICT (only_row) DO UPDATE
   SET reconciled_through = EXCLUDED.reconciled_through, after_id = EXCLUDED.after_id
 WHERE (event_checkpoint.reconciled_through, coalesce(event_checkpoint.after_id, ''))
     < (EXCLUDED.reconciled_through, coalesce(EXCLUDED.after_id, ''))
"""


def claim_query(due_only: bool, exclude_webhooks: Collection[str | None]) -> str:
    """The claim statement: each variant its own text, so every prepared plan can bound the index
    range by ``due_at`` (a flag inside one statement would leave a generic plan without the bound)."""
    due = " AND due_at <= %(now)s" if due_only else ""
    webhooks = ""
    if any(url is not None for url in exclude_webhooks):
        webhooks += " AND (webhook_url IS NULL OR webhook_url <> ALL(%(excluded)s))"
    if None in exclude_webhooks:
        webhooks += " AND webhook_url IS NOT NULL"
    return _CLAIM.format(due=due, webhooks=webhooks)


def _params(event: Event) -> dict[str, Any]:
    return {"id": event.id, "state": event.state, "webhook_url": event.webhook_url,
            "created_at": event.created_at, "next_attempt_at": event.next_attempt_at,
            "claimed_until": event.claimed_until, "delivered_at": event.delivered_at,
            "doc": Jsonb(event.to_dict())}


def _storable(text: str) -> str:
    """``text`` as PostgreSQL's jsonb can hold it (no NUL, valid UTF-8): an error message may quote
    whatever the failure carried."""
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


class PostgresOutbox:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, event: Event, now: datetime, claim_seconds: float | None) -> tuple[Event, bool]:
        valid_event_id(event.id)
        new = dataclasses.replace(event)
        if claim_seconds is not None:
            start_attempt(new, now, claim_seconds)
        with self.db.transaction() as conn:
            doc, inserted = conn.execute(_RECORD, _params(new)).fetchone()
            if inserted:
                log.info("event.recorded", event_id=new.id, job_id=new.job_id, event_type=new.type)
                return new, claim_seconds is not None
            existing = Event.from_dict(doc)
            if claim_seconds is None or existing.delivered or not claimable(existing, now, due_only=True):
                return existing, False
            start_attempt(existing, now, claim_seconds)
            conn.execute(_UPDATE, _params(existing))
            return existing, True

    def get(self, event_id: str) -> Event | None:
        valid_event_id(event_id)
        with self.db.transaction() as conn:
            row = conn.execute("SELECT doc FROM event_outbox WHERE id = %s", (event_id,)).fetchone()
        return Event.from_dict(row[0]) if row is not None else None

    def claim(self, now: datetime, limit: int, claim_seconds: float, *, due_only: bool = True,
              exclude_webhooks: Collection[str | None] = ()) -> list[Event]:
        if limit <= 0:
            return []
        excluded = [url for url in exclude_webhooks if url is not None]
        claimed: list[Event] = []
        with self.db.transaction() as conn:
            rows = conn.execute(claim_query(due_only, exclude_webhooks),
                                {"now": now, "limit": limit, "excluded": excluded}).fetchall()
            for (doc,) in rows:
                event = Event.from_dict(doc)
                start_attempt(event, now, claim_seconds)
                conn.execute(_UPDATE, _params(event))
                claimed.append(event)
        return claimed

    def _update_pending(self, event_id: str, change: Callable[[Event], None]) -> None:
        """Apply ``change`` to the event while it is pending (locked row); nothing when it is not."""
        valid_event_id(event_id)
        with self.db.transaction() as conn:
            row = conn.execute("SELECT doc FROM event_outbox WHERE id = %s AND state = %s FOR UPDATE",
                               (event_id, PENDING)).fetchone()
            if row is None:
                return
            event = Event.from_dict(row[0])
            change(event)
            conn.execute(_UPDATE, _params(event))

    def mark_delivered(self, event_id: str, now: datetime) -> None:
        def delivered(event: Event) -> None:
            event.state = DELIVERED
            event.delivered_at = now
            event.claimed_until = None
            event.last_error = None

        self._update_pending(event_id, delivered)

    def mark_failed(self, event_id: str, error: str, next_attempt_at: datetime) -> None:
        def failed(event: Event) -> None:
            event.last_error = _storable(error)
            event.next_attempt_at = next_attempt_at
            event.claimed_until = None

        self._update_pending(event_id, failed)

    def checkpoint(self) -> Checkpoint | None:
        with self.db.transaction() as conn:
            row = conn.execute("SELECT reconciled_through, after_id FROM event_checkpoint").fetchone()
        return Checkpoint(*row) if row is not None else None

    def set_checkpoint(self, checkpoint: Checkpoint) -> None:
        with self.db.transaction() as conn:
            conn.execute(_SET_CHECKPOINT, (checkpoint.when, checkpoint.after_id))

    def purge_delivered(self, before: datetime, limit: int) -> int:
        with self.db.transaction() as conn:
            return conn.execute("""DELETE FROM event_outbox WHERE id IN (
                                       SELECT id FROM event_outbox
                                        WHERE state = 'delivered' AND delivered_at < %s
                                        ORDER BY delivered_at LIMIT %s)""", (before, limit)).rowcount

    def counts(self) -> dict[str, int]:
        with self.db.transaction() as conn:
            rows = conn.execute("SELECT state, count(*) FROM event_outbox GROUP BY state").fetchall()
        return {PENDING: 0, DELIVERED: 0, **dict(rows)}
