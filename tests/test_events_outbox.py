"""The events outbox, on JSON files and in PostgreSQL (every contract test runs on both, through the
``backend`` fixture): idempotent records, exclusive claims, crash leftovers, retention."""
from __future__ import annotations

import json
import os
import shutil
import threading
from datetime import datetime, timedelta

import pytest

from morag_remote.events.model import Event
from morag_remote.events.outbox import Checkpoint
from morag_remote.store.base import EventOutbox
from morag_remote.store.files.outbox import FileOutbox
from morag_remote.store.postgres.outbox import PostgresOutbox, claim_query
from morag_remote.models import RemoteJob, utcnow
from morag_remote.store.postgres.db import database

CLAIM = 12.0


def terminal_job(job_id: str = "job-1", status: str = "completed") -> RemoteJob:
    now = utcnow() - timedelta(seconds=1)
    return RemoteJob(id=job_id, ingestion_task_id="ingest-1", source_file_path="/x", content_type="audio",
                     task_options={}, status=status, created_at=now, completed_at=now, updated_at=now)


def open_outbox(backend: str, tmp_path, request) -> EventOutbox:
    """An outbox on this test's files or database; a second call is a second process's view of it."""
    if backend == "postgres":
        return PostgresOutbox(database(request.getfixturevalue("pg_url")))
    return FileOutbox(tmp_path / "events")


@pytest.fixture
def outbox(backend, tmp_path, request) -> EventOutbox:
    return open_outbox(backend, tmp_path, request)


@pytest.fixture
def other_outbox(backend, tmp_path, request, outbox) -> EventOutbox:
    """Another outbox on the same files or database (another process, another host)."""
    return open_outbox(backend, tmp_path, request)


def deliver_at(outbox: EventOutbox, event_id: str, when: datetime) -> None:
    """Mark the event delivered at ``when``: the database keeps ``delivered_at``; the files keep the
    delivered copy, aged by its modification time."""
    outbox.mark_delivered(event_id, when)
    if isinstance(outbox, FileOutbox):
        path = outbox.delivered_dir / f"{event_id}.json"
        os.utime(path, (when.timestamp(), when.timestamp()))


def event_for(job: RemoteJob, now=None) -> Event:
    return Event.for_job(job, None, now or job.completed_at)


def test_recording_the_same_event_twice_stores_it_once(outbox):
    job = terminal_job()
    first, claimed = outbox.record(event_for(job), utcnow(), CLAIM)
    again, claimed_again = outbox.record(event_for(job), utcnow(), CLAIM)
    assert claimed and not claimed_again
    assert again.id == first.id and again.attempts == 1
    assert outbox.counts() == {"pending": 1, "delivered": 0}


def test_the_event_id_is_stable_per_terminal_state():
    job = terminal_job()
    assert event_for(job).id == event_for(job.copy()).id
    later = job.copy()
    later.completed_at = job.completed_at + timedelta(seconds=1)
    assert event_for(later).id != event_for(job).id
    failed = job.copy()
    failed.status = "failed"
    assert event_for(failed).id != event_for(job).id


def test_a_claimed_event_is_not_handed_out_again_until_its_claim_lapses(outbox):
    now = utcnow()
    outbox.record(event_for(terminal_job()), now, None)
    [claimed] = outbox.claim(now, 10, CLAIM)
    assert claimed.attempts == 1
    assert outbox.claim(now, 10, CLAIM, due_only=False) == []
    [again] = outbox.claim(now + timedelta(seconds=CLAIM + 1), 10, CLAIM)
    assert again.id == claimed.id and again.attempts == 2


def test_a_failed_event_waits_for_its_next_attempt_unless_asked_for_now(outbox):
    now = utcnow()
    outbox.record(event_for(terminal_job()), now, None)
    [event] = outbox.claim(now, 1, CLAIM)
    outbox.mark_failed(event.id, "HTTP 503", now + timedelta(seconds=60))
    assert outbox.claim(now + timedelta(seconds=30), 1, CLAIM) == []
    assert len(outbox.claim(now + timedelta(seconds=30), 1, CLAIM, due_only=False)) == 1


def test_claims_skip_excluded_webhooks_and_come_oldest_first(outbox):
    now = utcnow()
    a = Event.for_job(terminal_job("a"), "http://127.0.0.1:9/hooks/a", now)
    b = Event.for_job(terminal_job("b"), None, now + timedelta(seconds=1))
    c = Event.for_job(terminal_job("c"), None, now + timedelta(seconds=2))
    for event in (c, a, b):
        outbox.record(event, now, None)
    outbox.mark_failed(c.id, "x", now - timedelta(seconds=5))  # due earliest
    claimed = outbox.claim(now + timedelta(seconds=5), 10, CLAIM, exclude_webhooks={"http://127.0.0.1:9/hooks/a"})
    assert [e.job_id for e in claimed] == ["c", "b"]


def test_a_delivered_event_is_never_claimed_again(outbox):
    now = utcnow()
    job = terminal_job()
    event, _ = outbox.record(event_for(job), now, CLAIM)
    outbox.mark_delivered(event.id, now)
    outbox.mark_delivered(event.id, now)
    outbox.mark_failed(event.id, "late failure report", now)
    assert outbox.claim(now + timedelta(hours=1), 10, CLAIM, due_only=False) == []
    stored = outbox.get(event.id)
    assert stored.delivered and stored.last_error is None
    assert outbox.record(event_for(job), now, CLAIM)[1] is False


@pytest.mark.files_only
def test_a_move_to_delivered_cut_short_by_a_crash_is_finished_by_the_next_claim(outbox):
    now = utcnow()
    event, _ = outbox.record(event_for(terminal_job()), now, None)
    pending = outbox.pending_dir / f"{event.id}.json"
    data = json.loads(pending.read_bytes())
    data.update(state="delivered", delivered_at=data["created_at"])
    (outbox.delivered_dir / pending.name).write_text(json.dumps(data))  # the first half of the move
    assert outbox.claim(now, 10, CLAIM, due_only=False) == []
    assert not pending.exists()
    assert outbox.get(event.id).delivered


@pytest.mark.files_only
def test_an_unreadable_pending_file_is_skipped(outbox):
    now = utcnow()
    outbox.record(event_for(terminal_job("good")), now, None)
    (outbox.pending_dir / "0000-bad.json").write_text("{not json")
    assert [e.job_id for e in outbox.claim(now, 10, CLAIM)] == ["good"]


def test_claims_see_changes_made_by_another_outbox_on_the_same_store(outbox, other_outbox):
    now = utcnow()
    outbox.record(event_for(terminal_job()), now, None)
    assert len(outbox.claim(now, 1, CLAIM)) == 1  # fills this process's cache (files)
    assert other_outbox.claim(now, 1, CLAIM, due_only=False) == []  # held by the first
    [event] = other_outbox.claim(now + timedelta(seconds=CLAIM + 1), 1, CLAIM)
    other_outbox.mark_delivered(event.id, now)
    assert outbox.claim(now + timedelta(hours=1), 1, CLAIM, due_only=False) == []
    assert outbox.get(event.id).delivered and outbox.counts() == {"pending": 0, "delivered": 1}


def test_purge_forgets_only_delivered_events_older_than_the_cutoff(outbox):
    now = utcnow()
    old, _ = outbox.record(event_for(terminal_job("old")), now, CLAIM)
    deliver_at(outbox, old.id, now - timedelta(days=3))
    fresh, _ = outbox.record(event_for(terminal_job("fresh")), now, CLAIM)
    deliver_at(outbox, fresh.id, now)
    waiting, _ = outbox.record(event_for(terminal_job("waiting")), now - timedelta(days=3), None)
    assert outbox.purge_delivered(now - timedelta(days=1), 100) == 1
    assert outbox.get(old.id) is None and outbox.get(fresh.id) and outbox.get(waiting.id)
    assert outbox.counts() == {"pending": 1, "delivered": 1}


def test_purge_forgets_at_most_its_limit_per_call(outbox):
    now = utcnow()
    ids = []
    for n in range(3):
        event, _ = outbox.record(event_for(terminal_job(f"job-{n}")), now, CLAIM)
        deliver_at(outbox, event.id, now - timedelta(days=5 - n))
        ids.append(event.id)
    assert outbox.purge_delivered(now - timedelta(days=1), 2) == 2
    assert outbox.counts()["delivered"] == 1
    assert outbox.purge_delivered(now - timedelta(days=1), 2) == 1
    assert all(outbox.get(event_id) is None for event_id in ids)


def test_the_checkpoint_never_moves_backwards(outbox):
    now = utcnow()
    assert outbox.checkpoint() is None
    outbox.set_checkpoint(Checkpoint(now, "job-b"))
    outbox.set_checkpoint(Checkpoint(now - timedelta(hours=1)))
    outbox.set_checkpoint(Checkpoint(now, "job-a"))
    assert outbox.checkpoint() == Checkpoint(now, "job-b")
    outbox.set_checkpoint(Checkpoint(now + timedelta(microseconds=1)))
    assert outbox.checkpoint() == Checkpoint(now + timedelta(microseconds=1))


def test_a_checkpoint_covers_what_came_before_it_in_finish_order():
    now = utcnow()
    assert Checkpoint(now).covers(now - timedelta(microseconds=1), "z")
    assert not Checkpoint(now).covers(now, "a")
    assert Checkpoint(now, "job-b").covers(now, "job-b") and Checkpoint(now, "job-b").covers(now, "job-a")
    assert not Checkpoint(now, "job-b").covers(now, "job-c")


@pytest.mark.parametrize("event_id", ["../../etc/passwd", "a\x00b", "", "x" * 65])
def test_malformed_event_ids_are_refused(outbox, event_id):
    with pytest.raises(ValueError):
        outbox.get(event_id)
    with pytest.raises(ValueError):
        outbox.mark_failed(event_id, "x", utcnow())


@pytest.mark.files_only
def test_the_outbox_survives_a_copy_of_its_folder(outbox, tmp_path):
    """Everything it knows is in its files: a copy (a backup restored) is the same outbox."""
    now = utcnow()
    event, _ = outbox.record(event_for(terminal_job()), now, None)
    shutil.copytree(outbox.root, tmp_path / "restored")
    assert FileOutbox(tmp_path / "restored").get(event.id).body == event.body


def test_an_event_recorded_without_a_claim_can_be_claimed_by_its_next_recorder(outbox):
    job = terminal_job()
    now = utcnow()
    outbox.record(event_for(job), now, None)
    event, claimed = outbox.record(event_for(job), now, CLAIM)
    assert claimed and event.attempts == 1


def test_claims_come_in_schedule_order_and_stop_at_the_limit(outbox):
    now = utcnow()
    events = [Event.for_job(terminal_job(f"job-{n}"), None, now + timedelta(seconds=n)) for n in range(5)]
    for event in reversed(events):
        outbox.record(event, now, None)
    outbox.mark_failed(events[0].id, "HTTP 500", now + timedelta(seconds=10))  # now due last
    later = now + timedelta(seconds=10)
    assert outbox.claim(later, 0, CLAIM) == []
    assert [e.job_id for e in outbox.claim(later, 2, CLAIM)] == ["job-1", "job-2"]
    assert [e.job_id for e in outbox.claim(later, 10, CLAIM)] == ["job-3", "job-4", "job-0"]
    assert outbox.claim(later, 10, CLAIM, due_only=False) == []


def test_claims_skip_events_not_due_yet_and_events_for_the_default_receiver_when_excluded(outbox):
    now = utcnow()
    hook = "http://127.0.0.1:9/hooks/a"
    default = Event.for_job(terminal_job("default"), None, now)
    own = Event.for_job(terminal_job("own"), hook, now)
    future = Event.for_job(terminal_job("future"), None, now + timedelta(seconds=30))
    for event in (default, own, future):
        outbox.record(event, now, None)
    assert [e.job_id for e in outbox.claim(now, 10, CLAIM, exclude_webhooks={None})] == ["own"]
    assert [e.job_id for e in outbox.claim(now, 10, CLAIM, exclude_webhooks=[hook])] == ["default"]
    assert [e.job_id for e in outbox.claim(now, 10, CLAIM, due_only=False)] == ["future"]


def test_an_event_keeps_every_field_through_the_outbox(outbox):
    now = utcnow()
    event = Event.for_job(terminal_job(), "http://127.0.0.1:9/hooks/a", now)
    stored, claimed = outbox.record(event, now, CLAIM)
    assert claimed and outbox.get(event.id) == stored
    retry_at = now + timedelta(seconds=60)
    outbox.mark_failed(event.id, "HTTP 500", retry_at)
    got = outbox.get(event.id)
    assert (got.id, got.type, got.job_id, got.body, got.webhook_url, got.created_at) == \
        (event.id, event.type, event.job_id, event.body, event.webhook_url, event.created_at)
    assert (got.state, got.attempts, got.last_attempt_at, got.claimed_until, got.last_error, got.next_attempt_at) == \
        ("pending", 1, now, None, "HTTP 500", retry_at)
    assert got.public_state()["state"] == "retrying"


def test_marking_an_unknown_event_changes_nothing(outbox):
    outbox.mark_delivered("0000-none", utcnow())
    outbox.mark_failed("0000-none", "x", utcnow())
    assert outbox.get("0000-none") is None and outbox.counts() == {"pending": 0, "delivered": 0}


def test_two_recorders_of_one_event_at_once_give_it_one_claim(outbox, other_outbox):
    job, now = terminal_job(), utcnow()
    start = threading.Barrier(2)
    results = []

    def record(box: EventOutbox) -> None:
        start.wait(10)
        results.append(box.record(event_for(job), now, CLAIM))

    threads = [threading.Thread(target=record, args=(box,)) for box in (outbox, other_outbox)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(claimed for _, claimed in results) == [False, True]
    assert {event.id for event, _ in results} == {event_for(job).id}
    assert outbox.get(event_for(job).id).attempts == 1


def test_concurrent_claimers_take_each_event_exactly_once(backend, tmp_path, request, outbox):
    now = utcnow()
    ids = set()
    for n in range(60):
        event, _ = outbox.record(Event.for_job(terminal_job(f"job-{n:02d}"), None, now), now, None)
        ids.add(event.id)
    start = threading.Barrier(4)
    taken: list[list[str]] = [[] for _ in range(4)]

    def claimer(i: int) -> None:
        box = open_outbox(backend, tmp_path, request)  # its own outbox, as another process has
        start.wait(10)
        for _ in range(100):  # bounded: 60 events need at most 60 claims
            got = box.claim(now, 1 + i % 3, CLAIM)
            if not got:
                return
            taken[i].extend(e.id for e in got)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    everything = [event_id for got in taken for event_id in got]
    assert sorted(everything) == sorted(ids)  # all of them, none twice
    assert all(outbox.get(event_id).attempts == 1 for event_id in ids)


# -- PostgreSQL: row locks and the claim index ---------------------------------------------------

@pytest.mark.postgres
def test_a_claim_skips_an_event_another_transaction_holds_without_waiting(pg_url):
    outbox = PostgresOutbox(database(pg_url))
    now = utcnow()
    first = Event.for_job(terminal_job("first"), None, now - timedelta(seconds=2))
    second = Event.for_job(terminal_job("second"), None, now - timedelta(seconds=1))
    for event in (first, second):
        outbox.record(event, now, None)
    got: list[Event] = []
    with outbox.db.connect() as holder:  # another deliverer, between its claim's SELECT and commit
        holder.execute("SELECT 1 FROM event_outbox WHERE id = %s FOR UPDATE", (first.id,))
        claimer = threading.Thread(target=lambda: got.extend(outbox.claim(now, 1, CLAIM)))
        claimer.start()
        claimer.join(10)
        waited = claimer.is_alive()
        holder.rollback()  # lets a claimer that waited go on
        claimer.join(10)
    assert not waited and [e.job_id for e in got] == ["second"]
    assert [e.job_id for e in outbox.claim(now, 5, CLAIM)] == ["first"]


@pytest.mark.postgres
@pytest.mark.parametrize("due_only", [True, False])
def test_claims_walk_the_claim_index_in_schedule_order(pg_url, due_only):
    outbox = PostgresOutbox(database(pg_url))
    now = utcnow()
    for n in range(200):
        outbox.record(Event.for_job(terminal_job(f"job-{n}"), None, now - timedelta(seconds=n)), now, None)
    with outbox.db.transaction() as conn:
        conn.execute("ANALYZE event_outbox")
        conn.execute("SET LOCAL enable_seqscan = off")  # a small table: judge the plan, not the size
        conn.execute("SET LOCAL enable_sort = off")
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN " + claim_query(due_only, {None, "http://x/"}),
            {"now": now, "limit": 1, "excluded": ["http://x/"]}).fetchall())
    assert "Index Scan using event_outbox_claim" in plan and "LockRows" in plan
    assert "Sort" not in plan
    if due_only:
        assert "Index Cond: (due_at <=" in plan  # the scan stops at the first event not due


@pytest.mark.postgres
def test_error_text_postgresql_cannot_hold_is_stored_readably(pg_url):
    outbox = PostgresOutbox(database(pg_url))
    now = utcnow()
    event, _ = outbox.record(event_for(terminal_job()), now, CLAIM)
    outbox.mark_failed(event.id, "bad\x00 byte \udcff", now)
    assert outbox.get(event.id).last_error == "bad byte ?"


def test_finished_since_pages_through_jobs_that_share_a_finish_time(tmp_path):
    from morag_remote.store.files.jobs import FileJobStore

    store = FileJobStore(tmp_path / "jobs")
    same = utcnow()
    for job_id in ("job-a", "job-b", "job-c"):
        job = terminal_job(job_id)
        job.completed_at = same
        store.create(job)
    assert store.finished_since(same, 2) == ["job-a", "job-b"]
    assert store.finished_since(same, 2, after_id="job-b") == ["job-c"]
    assert store.finished_since(same + timedelta(microseconds=1), 10) == []
