"""The long-poll dispatcher under races found in review: a poke arriving while the dispatcher reads its
pipe, polls coming and going at once, and the sweep while other polls keep the dispatcher looking."""
from __future__ import annotations

import linecache
import sys
import threading
import time

import pytest

from support.gunicorn import wait_for
from support.polls import Waiter, source_file


def _a_waiter_is_woken_for_a_new_job(service, source: str) -> None:
    waiter = Waiter(service, "w", ["audio"], wait=6)
    wait_for(lambda: service.polls.waiting == 1, 5, "the waiter", interval=0.01)
    job_id = service.create(source_file_path=source, content_type="audio", ingestion_task_id="t").id
    waiter.thread.join(3)
    assert not waiter.thread.is_alive(), "a waiting poll was not woken for a job it can take (3 s)"
    assert [j.id for j in waiter.jobs] == [job_id]


def test_a_poke_while_the_dispatcher_reads_its_pipe_is_not_lost(service, instance_path):
    """polling.py _turn drains its pipe, then clears ``_poked``. In the other order a _poke() from
    another thread in between (a poll registering, the listener seeing a change) sees _poked False, sets it
    True and writes a byte, which that os.read drains. _poked stays True with an empty pipe: every
    later _poke() is a no-op, for the life of the process. With nobody waiting the dispatcher sleeps
    in poll(-1), so from then on no waiter is ever woken (a job waits for the next re-poll).

    The interleaving is forced with a trace function on the dispatcher thread (no project code is
    replaced): when it reaches the os.read line, a second long poll arrives (real service.poll)."""
    source = source_file(instance_path)
    triggered = threading.Event()
    intruder: list[Waiter] = []

    def local(frame, event, arg):
        if triggered.is_set():
            return None
        if event == "line" and "os.read(fd" in linecache.getline(frame.f_code.co_filename, frame.f_lineno):
            triggered.set()
            before = service.polls.waiting
            intruder.append(Waiter(service, "intruder", ["audio"], wait=1))  # registers, pokes
            wait_for(lambda: service.polls.waiting > before, 5, "the intruder waiting", interval=0.005)
            time.sleep(0.2)  # its _poke (after its registration's lock) has written by now
        return local

    def tracer(frame, event, arg):
        if triggered.is_set():
            return None
        return local if frame.f_code.co_name == "_turn" else None

    threading.settrace(tracer)  # the dispatcher thread starts with the first waiter, below
    try:
        first = Waiter(service, "first", ["audio"], wait=1)
        assert triggered.wait(10), "the dispatcher never read its pipe"
    finally:
        threading.settrace(None)
    assert first.done() == [] and intruder[0].done() == []
    time.sleep(2.5)  # everyone gone: the dispatcher's next turn sleeps until a poke

    _a_waiter_is_woken_for_a_new_job(service, source)


def _poke_lost(polls) -> bool:
    """_poked is True but no byte is in the pipe, twice 50 ms apart: no poke will ever be written."""
    import select
    for _ in range(2):
        if not (polls._poked and polls._pipe and not select.select([polls._pipe[0]], [], [], 0)[0]):
            return False
        time.sleep(0.05)
    return True


def test_pokes_are_not_lost_when_polls_come_and_go_at_once(service, instance_path):
    """The same race as above, unforced: threads whose polls register (each pokes) while the
    dispatcher turns. Bounded: at most 10 s of churn, then a waiter must be woken for a job."""
    source = source_file(instance_path)
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            service.polls.wait_for(lambda: [], ["audio"], 0.001, "churn", marker=None)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=churn, daemon=True) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _poke_lost(service.polls):
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sys.setswitchinterval(old)
    time.sleep(2.5)
    _a_waiter_is_woken_for_a_new_job(service, source)


@pytest.mark.postgres
def test_the_sweep_still_comes_while_other_polls_keep_the_dispatcher_looking(service, instance_path):
    """polling.py _turn: ``timers.next_sweep = now + SWEEP_SECONDS`` is reset by every look, and
    the sweep is the only thing (besides a store change or a timer) that moves the epoch. On
    PostgreSQL change_marker() is None, so every poll's registration makes the dispatcher look:
    idle workers of another type re-polling (no store change at all) postpone the sweep for ever.
    A waiter that was woken in the current epoch and claimed nothing (here: another transaction
    held the job's row, as a failing admin update does, and rolled back: no NOTIFY) is then never
    woken again while the job it could take stays pending."""
    source = source_file(instance_path)
    job_id = service.create(source_file_path=source, content_type="audio", ingestion_task_id="t").id
    holder = service.store.db.connect()
    holder.execute("SELECT 1 FROM remote_jobs WHERE id = %s FOR UPDATE", (job_id,))  # row held
    stop = threading.Event()

    def idle_video_workers():  # nothing of theirs is ever there: they only wait and come back
        while not stop.is_set():
            service.poll("v", ["video"], wait=0.3)

    churn = threading.Thread(target=idle_video_workers, daemon=True)
    try:
        before = service.polls.wakeups
        waiter = Waiter(service, "a", ["audio"], wait=12)
        wait_for(lambda: service.polls.wakeups > before, 5, "the audio waiter woken", interval=0.01)
        churn.start()
        time.sleep(0.5)  # its claim skipped the held row: it waits again, woken in this epoch
        assert waiter.thread.is_alive()
    finally:
        holder.rollback()  # the row is free: the job is claimable, and nothing was written
        holder.close()
    try:
        waiter.thread.join(6)  # a sweep every 2 s would have woken it long before
        assert not waiter.thread.is_alive(), "the audio job stayed pending while its waiter slept"
        assert [j.id for j in waiter.jobs] == [job_id]
    finally:
        stop.set()
        churn.join(10)
