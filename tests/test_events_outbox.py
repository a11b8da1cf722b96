"""The JSON-file events outbox: idempotent records, exclusive claims, crash leftovers, retention."""
from __future__ import annotations

import json
import os
import shutil
from datetime import timedelta

import pytest

from morag_remote.events.model import Event
from morag_remote.events.outbox import Checkpoint, FileOutbox
from morag_remote.models import RemoteJob, utcnow

CLAIM = 12.0


def terminal_job(job_id: str = "job-1", status: str = "completed") -> RemoteJob:
    now = utcnow() - timedelta(seconds=1)
    return RemoteJob(id=job_id, ingestion_task_id="ingest-1", source_file_path="/x", content_type="audio",
                     task_options={}, status=status, created_at=now, completed_at=now, updated_at=now)


@pytest.fixture
def outbox(tmp_path) -> FileOutbox:
    return FileOutbox(tmp_path / "events")


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


def test_an_unreadable_pending_file_is_skipped(outbox):
    now = utcnow()
    outbox.record(event_for(terminal_job("good")), now, None)
    (outbox.pending_dir / "0000-bad.json").write_text("{not json")
    assert [e.job_id for e in outbox.claim(now, 10, CLAIM)] == ["good"]


def test_claims_see_changes_made_by_another_outbox_on_the_same_files(outbox, tmp_path):
    other = FileOutbox(tmp_path / "events")
    now = utcnow()
    outbox.record(event_for(terminal_job()), now, None)
    assert len(outbox.claim(now, 1, CLAIM)) == 1  # fills this process's cache
    [event] = other.claim(now + timedelta(seconds=CLAIM + 1), 1, CLAIM)
    other.mark_delivered(event.id, now)
    assert outbox.claim(now + timedelta(hours=1), 1, CLAIM, due_only=False) == []


def test_purge_forgets_only_delivered_events_older_than_the_cutoff(outbox):
    now = utcnow()
    old, _ = outbox.record(event_for(terminal_job("old")), now, CLAIM)
    outbox.mark_delivered(old.id, now)
    path = outbox.delivered_dir / f"{old.id}.json"
    os.utime(path, (path.stat().st_atime - 3 * 86400, path.stat().st_mtime - 3 * 86400))
    fresh, _ = outbox.record(event_for(terminal_job("fresh")), now, CLAIM)
    outbox.mark_delivered(fresh.id, now)
    waiting, _ = outbox.record(event_for(terminal_job("waiting")), now, None)
    assert outbox.purge_delivered(now - timedelta(days=1), 100) == 1
    assert outbox.get(old.id) is None and outbox.get(fresh.id) and outbox.get(waiting.id)


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


def test_event_ids_that_could_escape_the_folder_are_refused(outbox):
    with pytest.raises(ValueError):
        outbox.get("../../etc/passwd")


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


def test_finished_since_pages_through_jobs_that_share_a_finish_time(tmp_path):
    from morag_remote.store.files import FileJobStore

    store = FileJobStore(tmp_path / "jobs")
    same = utcnow()
    for job_id in ("job-a", "job-b", "job-c"):
        job = terminal_job(job_id)
        job.completed_at = same
        store.create(job)
    assert store.finished_since(same, 2) == ["job-a", "job-b"]
    assert store.finished_since(same, 2, after_id="job-b") == ["job-c"]
    assert store.finished_since(same + timedelta(microseconds=1), 10) == []
