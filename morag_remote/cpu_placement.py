"""Which CPU each gunicorn worker process runs on: gunicorn.conf.py's ``pre_fork`` and ``post_fork``.

Each worker runs on a CPU of its own (``MORAG_REMOTE_PIN_WORKERS``, default true). The master
picks, for each worker it forks, the allowed CPU that the fewest live workers use, so a replacement
takes the CPU of the worker it replaces and more workers than CPUs share them evenly; the worker
pins itself to it before the app is loaded and any thread started (threads inherit it). A
process's threads then hand the GIL to each other on one core, and the thread holding the job
store's lock is not left waiting for a core while its sibling threads run on both (README,
"Performance", has the measurements).
"""
from __future__ import annotations

import os
from typing import Any

ENV = "MORAG_REMOTE_PIN_WORKERS"


def enabled() -> bool:
    value = os.environ.get(ENV, "true").strip().lower()
    return value not in ("0", "false", "no", "off") and hasattr(os, "sched_setaffinity")


def pre_fork(server: Any, worker: Any) -> None:
    """In the master, before the fork: choose the worker's CPU (``worker.cpu``)."""
    if not enabled():
        return
    used = [getattr(w, "cpu", None) for w in server.WORKERS.values()]  # the live workers, not this one
    worker.cpu = min(sorted(os.sched_getaffinity(0)), key=used.count)


def post_fork(server: Any, worker: Any) -> None:
    """In the new worker: run on the CPU the master chose."""
    cpu = getattr(worker, "cpu", None)
    if cpu is None:
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:  # the CPU was taken from this process meanwhile: run where the kernel likes
        worker.log.warning("could not pin the worker to CPU %s: %s", cpu, exc)
