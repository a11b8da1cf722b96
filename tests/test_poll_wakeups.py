"""A change wakes only as many waiting long polls as it can satisfy, per content type and
requirement set, oldest first (``service/polling.py``); a waiter woken for nothing waits again; a
caller whose check says it has gone is let go within about a second, and one whose socket hangs up
at once. Every test runs on both backends."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from datetime import timedelta

import pytest

from morag_remote.api.http import ClientConnection
from morag_remote.routing import Capabilities
from support.gunicorn import wait_for
from support.polls import Waiter, source_file

GPU = Capabilities(frozenset({"gpu"}), {})


def _waiting(service, n: int) -> None:
    wait_for(lambda: service.polls.waiting == n, 15, f"{n} waiting poll(s)", interval=0.01)


def _create(service, source: str, content_type: str = "audio", **extra) -> str:
    return service.create(source_file_path=source, content_type=content_type, ingestion_task_id="t", **extra).id


def _settled(service, seconds: float = 0.4) -> None:
    """Give the dispatcher time to wake more waiters than it should, if it would."""
    time.sleep(seconds)


def test_one_job_wakes_one_of_many_waiters(service, instance_path):
    source = source_file(instance_path)
    waiters = []
    for i in range(5):
        waiters.append(Waiter(service, f"w{i}", ["audio"]))
        _waiting(service, i + 1)  # one at a time: their order is the order they came in
    before = service.polls.wakeups

    job_id = _create(service, source)

    wait_for(lambda: service.polls.waiting == 4, 15, "the first waiter to take the job")
    _settled(service)
    assert service.polls.wakeups - before == 1
    assert waiters[0].done() and waiters[0].jobs[0].id == job_id  # the oldest waiter has it
    assert service.polls.waiting == 4
    for _ in range(4):
        _create(service, source)
    assert sorted(len(w.done()) for w in waiters[1:]) == [1, 1, 1, 1]
    assert service.polls.wakeups - before == 5


def test_a_job_wakes_none_of_the_waiters_for_other_types(service, instance_path):
    source = source_file(instance_path)
    video = [Waiter(service, f"v{i}", ["video"]) for i in range(3)]
    _waiting(service, 3)
    audio = Waiter(service, "a", ["audio", "document"])
    _waiting(service, 4)
    before = service.polls.wakeups

    job_id = _create(service, source, "audio")

    assert audio.done()[0].id == job_id
    _settled(service)
    assert service.polls.wakeups - before == 1
    assert service.polls.waiting == 3 and all(w.thread.is_alive() for w in video)
    for _ in video:
        _create(service, source, "video")
    assert all(len(w.done()) == 1 for w in video)


def test_a_job_needing_a_gpu_goes_to_the_waiter_that_has_one_past_an_older_one_that_has_not(service, instance_path):
    source = source_file(instance_path)
    plain = Waiter(service, "plain", ["audio"])
    _waiting(service, 1)
    gpu = Waiter(service, "gpu", ["audio"], capabilities=GPU)
    _waiting(service, 2)
    before = service.polls.wakeups

    job_id = _create(service, source, requires={"labels": ["gpu"]})

    assert gpu.done()[0].id == job_id
    _settled(service)
    assert service.polls.wakeups - before == 1  # the older waiter, who cannot take it, was not woken
    assert plain.thread.is_alive()
    plain_job = _create(service, source)
    assert plain.done()[0].id == plain_job


def test_a_poll_for_several_jobs_is_woken_for_as_many(service, instance_path):
    source = source_file(instance_path)
    many = Waiter(service, "many", ["audio"], max_jobs=3)
    _waiting(service, 1)
    other = Waiter(service, "other", ["audio"])
    _waiting(service, 2)

    first = _create(service, source)

    assert [j.id for j in many.done()] == [first]
    assert other.thread.is_alive()  # one job: one waiter woken, the one that could take three
    _create(service, source)
    assert len(other.done()) == 1


def test_a_waiter_woken_for_a_job_that_expired_meanwhile_waits_again_and_takes_the_next(service, clock,
                                                                                        instance_path):
    """The job becomes available a second after its create and expires a second later; the
    service's clock (the test's) is already past both when the dispatcher looks. The file store
    counts the job (and wakes the waiter, whose claim times it out), PostgreSQL does not: either
    way the waiter goes on waiting, and takes the next job."""
    source = source_file(instance_path)
    waiter = Waiter(service, "w", ["audio"], wait=20)
    _waiting(service, 1)
    expiring = _create(service, source, available_at=(clock() + timedelta(seconds=1)).isoformat(),
                       expires_at=(clock() + timedelta(seconds=2)).isoformat())
    clock.advance(3)
    _settled(service, 2.5)
    assert waiter.thread.is_alive()
    assert service.get(expiring).status in ("pending", "timeout")
    job_id = _create(service, source)
    assert waiter.done()[0].id == job_id


def test_a_caller_whose_check_says_gone_is_let_go_within_about_a_second(service):
    gone = threading.Event()
    waiter = Waiter(service, "w", ["audio"], wait=20, client_gone=gone.is_set)
    _waiting(service, 1)
    gone.set()
    started = time.monotonic()
    assert waiter.done(5) == []
    assert time.monotonic() - started < 3


def test_a_caller_whose_socket_hangs_up_is_let_go_at_once(service, instance_path):
    ours, theirs = socket.socketpair()
    try:
        served = Waiter(service, "w", ["audio"], wait=20, client_gone=ClientConnection(ours))
        _waiting(service, 1)
        job_id = _create(service, source_file(instance_path))
        assert served.done()[0].id == job_id  # the same connection's next poll, as keep-alive has it:
        waiter = Waiter(service, "w", ["audio"], wait=20, client_gone=ClientConnection(ours))
        _waiting(service, 1)
        started = time.monotonic()
        theirs.close()
        assert waiter.done(5) == []
        assert time.monotonic() - started < 1.5
    finally:
        ours.close()


def test_a_caller_that_half_closes_after_a_pipelined_request_is_still_served(service, instance_path):
    """Its socket says the peer shut down, but a request is still to be read: it is there."""
    ours, theirs = socket.socketpair()
    try:
        waiter = Waiter(service, "w", ["audio"], wait=20, client_gone=ClientConnection(ours))
        _waiting(service, 1)
        theirs.sendall(b"GET /next HTTP/1.1\r\n\r\n")
        theirs.shutdown(socket.SHUT_WR)
        _settled(service, 1.5)  # watched, then asked each second
        assert waiter.thread.is_alive()
        job_id = _create(service, source_file(instance_path))
        assert waiter.done()[0].id == job_id
    finally:
        ours.close()
        theirs.close()


@pytest.mark.files_only
def test_a_long_poll_whose_store_breaks_while_it_waits_ends_empty_and_says_why(app, service, log_output):
    waiter = Waiter(service, "w", ["audio"], wait=3)
    _waiting(service, 1)
    shutil.rmtree(app.config["JOBS_DATA_DIR"])
    assert waiter.done(15) == []
    events = [json.loads(line)["event"] for line in log_output.getvalue().splitlines() if line.startswith("{")]
    assert "poll.look_failed" in events


def test_jobs_claimed_for_a_caller_gone_meanwhile_go_back_even_when_one_cannot(service, instance_path):
    source = source_file(instance_path)
    kept = service.create(source_file_path=source, content_type="audio", ingestion_task_id="t").id
    cancelled = service.create(source_file_path=source, content_type="audio", ingestion_task_id="t").id

    def gone() -> bool:  # asked once the jobs are claimed: one was cancelled meanwhile
        if service.get(cancelled).status == "processing":
            service.cancel(cancelled)
        return True

    assert service.poll("w", ["audio"], max_jobs=2, client_gone=gone) == []
    assert service.get(kept).status == "pending" and service.get(kept).retry_count == 0
    assert service.get(cancelled).status == "cancelled"
