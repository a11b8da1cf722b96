"""The per-minute throughput series behind the dashboard's charts: the storage contract both backends
keep (``store.base.ThroughputSeries``), and the observer that counts transitions in memory and
flushes them (``throughput.py``)."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from morag_remote.context import BACKEND, THROUGHPUT
from morag_remote.exceptions import StoreUnavailable
from morag_remote.models import Action, RemoteJob
from morag_remote.throughput import RETENTION, Throughput, minute_of

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def series(app):
    return app.extensions[BACKEND].throughput


def test_adds_sum_per_minute_and_read_starts_at_since(series):
    series.add({T0: (1, 2, 3), T0 + timedelta(minutes=1): (1, 0, 0)})
    series.add({T0: (1, 1, 1), T0 + timedelta(minutes=59): (0, 0, 5), T0 + timedelta(minutes=61): (2, 0, 0)})
    assert series.read(T0) == {T0: (2, 3, 4), T0 + timedelta(minutes=1): (1, 0, 0),
                               T0 + timedelta(minutes=59): (0, 0, 5), T0 + timedelta(minutes=61): (2, 0, 0)}
    assert set(series.read(T0 + timedelta(minutes=59))) == {T0 + timedelta(minutes=59), T0 + timedelta(minutes=61)}
    series.add({})
    assert series.read(T0 + timedelta(hours=5)) == {}


def test_concurrent_adds_lose_no_count(series):
    def add() -> None:
        for _ in range(20):
            series.add({T0: (1, 1, 1)})

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert series.read(T0) == {T0: (80, 80, 80)}


def test_prune_forgets_what_is_before_the_cutoff_and_keeps_the_rest(series):
    series.add({T0 - timedelta(hours=3): (1, 0, 0), T0 - timedelta(minutes=1): (0, 1, 0), T0: (0, 0, 1)})
    assert series.prune(T0) >= 1
    left = series.read(T0 - timedelta(days=1))
    assert T0 - timedelta(hours=3) not in left and left[T0] == (0, 0, 1)


class _Series:
    def __init__(self) -> None:
        self.added: list[dict] = []
        self.fail = False
        self.pruned: list[datetime] = []

    def add(self, counts):
        if self.fail:
            raise StoreUnavailable("down")
        self.added.append(dict(counts))

    def read(self, since):
        out: dict = {}
        for batch in self.added:
            for minute, c in batch.items():
                if minute >= since:
                    out[minute] = tuple(a + b for a, b in zip(out.get(minute, (0, 0, 0)), c))
        return out

    def prune(self, before):
        self.pruned.append(before)
        return 0


def _job() -> RemoteJob:
    return RemoteJob(id="j", ingestion_task_id="i", source_file_path="/x", content_type="audio", task_options={})


def test_the_observer_counts_claims_completions_and_failures_and_flushes_once_per_interval():
    now = [T0 + timedelta(seconds=30)]
    series = _Series()
    counter = Throughput(series, clock=lambda: now[0], flush_seconds=3600)
    for action in (Action.CLAIM, Action.CLAIM, Action.COMPLETE, Action.FAIL, Action.FAIL_RETRY, Action.LAPSE,
                   Action.LAPSE_RETRY, Action.HEARTBEAT, Action.CANCEL, Action.RETRY, Action.RELEASE):
        counter.job_changed(action, _job())
    assert series.added == []  # nothing written until the flush
    counter.flush()
    assert series.added == [{T0: (2, 1, 4)}]
    counter.flush()
    assert len(series.added) == 1  # nothing new: no write
    assert series.pruned == [T0 - RETENTION]


def test_the_timer_flushes_without_a_reader():
    series = _Series()
    counter = Throughput(series, clock=lambda: T0, flush_seconds=0.05)
    counter.job_changed(Action.CLAIM, _job())
    deadline = threading.Event()
    for _ in range(100):
        if series.added:
            break
        deadline.wait(0.05)
    assert series.added == [{T0: (1, 0, 0)}]


def test_a_refused_write_keeps_the_counts_for_the_next_flush(log_output):
    series = _Series()
    counter = Throughput(series, clock=lambda: T0, flush_seconds=3600)
    counter.job_changed(Action.CLAIM, _job())
    series.fail = True
    counter.flush()
    assert "throughput.not_recorded" in log_output.getvalue()
    series.fail = False
    counter.job_changed(Action.COMPLETE, _job())
    counter.flush()
    assert series.read(T0) == {T0: (1, 1, 0)}


def test_buckets_are_dense_oldest_first_and_sum_their_minutes():
    now = T0 + timedelta(minutes=59, seconds=10)
    series = _Series()
    series.added.append({T0: (1, 0, 0), T0 + timedelta(minutes=4): (2, 1, 0), T0 + timedelta(minutes=5): (0, 0, 7),
                         T0 - timedelta(minutes=1): (100, 0, 0)})
    buckets = Throughput(series, clock=lambda: now).buckets(60, 5)
    assert len(buckets) == 12 and buckets[0].start == T0 and buckets[-1].start == T0 + timedelta(minutes=55)
    assert (buckets[0].claims, buckets[0].completions, buckets[0].failures) == (3, 1, 0)
    assert buckets[1].failures == 7 and sum(b.claims for b in buckets[2:]) == 0


def test_the_service_counts_into_the_store_on_both_backends(app, producer, worker, own_minutes):
    job_id = producer.create_id()
    assert worker.claim()["job_id"] == job_id
    assert worker.result(job_id).status_code == 200
    app.extensions[THROUGHPUT].flush()
    stored = app.extensions[BACKEND].throughput.read(minute_of(own_minutes()) - timedelta(minutes=2))
    assert tuple(map(sum, zip(*stored.values()))) == (1, 1, 0)
