"""gunicorn.conf.py pins each worker process to a CPU of its own (``morag_remote.cpu_placement``):
checked on a real gunicorn, by reading each worker's CPU affinity from the kernel."""
from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from support.gunicorn import Gunicorn, wait_for

CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

pytestmark = pytest.mark.skipif(len(CPUS) < 2, reason="needs at least two CPUs to place workers on")


def affinities(server: Gunicorn) -> dict[int, set[int]]:
    """The CPUs each live worker may run on."""
    live = {}
    for pid in server.booted_pids():
        try:
            live[pid] = os.sched_getaffinity(pid)
        except ProcessLookupError:  # a worker that was replaced
            continue
    return live


def started(tmp_path: Path, workers: int, **env: str) -> Gunicorn:
    instance = tmp_path / "instance"
    (instance / "sources").mkdir(parents=True)
    return Gunicorn(instance, workers=workers, env=env).start()


def test_each_worker_runs_on_a_cpu_of_its_own_and_a_replacement_takes_the_freed_one(tmp_path):
    server = started(tmp_path, workers=2)
    try:
        placed = affinities(server)
        assert sorted(len(cpus) for cpus in placed.values()) == [1, 1]
        first, second = (next(iter(cpus)) for cpus in placed.values())
        assert first != second and {first, second} <= set(CPUS)

        victim, survivor = list(placed)
        freed = placed[victim]
        os.kill(victim, signal.SIGKILL)
        def replaced() -> dict[int, set[int]] | None:
            # the boot line comes before the worker pins itself: wait until it has
            now = affinities(server)
            new = [pid for pid in now if pid not in placed]
            return now if len(now) == 2 and new and now[new[0]] == freed else None

        after = wait_for(replaced, 60, "the killed worker's replacement on the freed CPU")
        assert victim not in after and after[survivor] == placed[survivor]
    finally:
        server.stop()


@pytest.mark.skipif(len(CPUS) > 8, reason="one worker per CPU and one more: too many processes here")
def test_more_workers_than_cpus_share_them_evenly(tmp_path):
    workers = len(CPUS) + 1
    server = started(tmp_path, workers=workers)
    try:
        placed = affinities(server)
        assert len(placed) == workers and all(len(cpus) == 1 for cpus in placed.values())
        per_cpu = Counter(next(iter(cpus)) for cpus in placed.values())
        assert set(per_cpu) == set(CPUS) and max(per_cpu.values()) - min(per_cpu.values()) <= 1
    finally:
        server.stop()


def test_placement_can_be_turned_off(tmp_path):
    server = started(tmp_path, workers=2, MORAG_REMOTE_PIN_WORKERS="false")
    try:
        assert all(cpus == set(CPUS) for cpus in affinities(server).values())
    finally:
        server.stop()
