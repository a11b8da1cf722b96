"""Crash safety of the JSON-file store, for real: a child process works the queue (create, claim,
heartbeat, result, cancel, retry, lapse) through the service and is killed with SIGKILL at a random
moment, again and again. No job may be lost, none may end up in two states once fsck has repaired
what a kill left half-moved, and no file may be unreadable."""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import random
import select
import signal
import time
from pathlib import Path

import pytest
import structlog

from support.jobs import source_file
from morag_remote.models import STATUSES
from morag_remote.service import Caller, JobService
from morag_remote.store.files.jobs import FileJobStore

pytestmark = pytest.mark.files_only  # damage and crashes of the JSON files themselves

KILLS = 200
READY_TIMEOUT = 30.0


@pytest.fixture
def app_config():
    # Leases and backoffs this short make lapses and delayed re-claims happen within a child's life.
    return {"LEASE_SECONDS": {"default": 0.05}, "RETRY_BACKOFF_SECONDS": 0.01,
            "RETRY_BACKOFF_MAX_SECONDS": 0.05, "MAX_RETRIES": 2}


def _churn(service: JobService, source: str, ids_path: str, ready_fd: int, seed: int) -> None:
    """The child: work the queue until killed. Reports each created id once create has returned."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))
    rng = random.Random(seed)
    report = os.open(ids_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    finished: list[str] = []
    for i in range(100_000):
        job = service.create(source_file_path=source, content_type="audio", ingestion_task_id="crash")
        os.write(report, f"{job.id}\n".encode())  # one write(2) of a few bytes: all or nothing
        if i == 0:  # from here on every child has done work, however slow the machine
            os.write(ready_fd, b"r")
        if rng.random() < 0.1:
            service.cancel(job.id)
        for claimed in service.poll(f"w{os.getpid()}", ["audio"], max_jobs=2):
            # One child at a time acts on the store, so none of these can be refused: a refusal
            # (a ServiceError) ends the child early and fails the test.
            caller = Caller(lease_id=claimed.lease_id)
            service.heartbeat(claimed.id, caller, progress=rng.random())
            roll = rng.random()
            if roll < 0.55:
                service.submit_result(claimed.id, caller, success=True, content="text " * 50)
            elif roll < 0.85:
                outcome = service.submit_result(claimed.id, caller, success=False, error_message="flaky",
                                                retryable=rng.random() < 0.7)
                if outcome.job.status == "failed":
                    finished.append(claimed.id)
            # else: abandon the job; its lease lapses and a later poll re-queues it
        if finished and rng.random() < 0.3:
            service.retry(finished.pop())
        if rng.random() < 0.2:
            service.expire_due()


def _files_of(root: Path) -> dict[str, list[str]]:
    """Job id -> the status directories holding a file for it."""
    where: dict[str, list[str]] = {}
    for status in STATUSES:
        for entry in os.scandir(root / status):
            if entry.name.endswith(".json"):
                where.setdefault(entry.name[:-5], []).append(status)
    return where


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_no_job_and_leaves_each_in_one_state(service, runner, tmp_path):
    root = Path(service.store.root)
    source = source_file(service)
    ids_path = tmp_path / "created.log"
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(20240611)

    for i in range(KILLS):
        read_fd, write_fd = os.pipe()
        child = ctx.Process(target=_churn, args=(service, source, str(ids_path), write_fd, rng.randrange(1 << 30)))
        child.start()
        os.close(write_fd)
        try:
            poller = select.poll()  # not select(): the suite may hold more than FD_SETSIZE descriptors
            poller.register(read_fd, select.POLLIN)
            ready = poller.poll(READY_TIMEOUT * 1000)
            assert ready and os.read(read_fd, 1) == b"r", f"child {i} never became ready"
            time.sleep(rng.uniform(0.005, 0.05))  # the random moment of the kill
        finally:
            os.close(read_fd)
            os.kill(child.pid, signal.SIGKILL)  # always: a child left running would hang pytest's exit
        child.join(READY_TIMEOUT)
        assert child.exitcode == -signal.SIGKILL, f"child {i} died on its own (exit {child.exitcode})"

    reported = ids_path.read_text().split()
    assert len(reported) == len(set(reported)) >= KILLS  # each child created a job before its kill

    # Before any repair: every reported job is readable, by this process and by a fresh one.
    fresh = FileJobStore(root)
    for job_id in reported:
        assert fresh.get(job_id).id == job_id
        assert service.get(job_id).id == job_id

    check = runner.invoke(args=["remote-jobs", "fsck", "--json"])
    findings = json.loads(check.stdout)
    assert {f["kind"] for f in findings} <= {"temp", "duplicate"}, findings  # nothing corrupt, nothing misplaced

    repaired = runner.invoke(args=["remote-jobs", "fsck", "--repair"])
    assert repaired.exit_code == 0, repaired.stdout
    clean = runner.invoke(args=["remote-jobs", "fsck"])
    assert clean.exit_code == 0 and clean.stdout.strip() == "store is clean"

    where = _files_of(root)
    assert all(len(where.get(job_id, [])) == 1 for job_id in reported)
    assert all(len(dirs) == 1 for dirs in where.values())
    # An id can go unreported only when the kill came between create's commit and the report.
    assert len(set(where) - set(reported)) <= KILLS
    assert set(reported) <= set(where)

    # Every process's index agrees with the files after all those crashes.
    assert FileJobStore(root).stats().counts == service.stats().counts
    print(f"\ncrash test: {KILLS} kills, {len(reported)} jobs reported, {len(where)} on disk, "
          f"fsck found {len(findings)} ({', '.join(sorted({f['kind'] for f in findings})) or 'nothing'})")
