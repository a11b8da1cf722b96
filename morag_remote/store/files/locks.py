"""The file store's locks, bounded: a lock another process holds for longer than
``STORE_LOCK_TIMEOUT_SECONDS`` (a process stopped while it holds it) makes the request answer 503
(:class:`~morag_remote.exceptions.StoreBusy`, with Retry-After) instead of waiting with it, and the
log names the pid that holds it when the kernel says (``/proc/locks``)."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import structlog

from ...exceptions import StoreBusy
from ...fileio import FileLock, LockTimeout

log = structlog.get_logger(__name__)

LOG_EVERY_SECONDS = 1.0  # at most one store.lock_busy line per process and lock per second


class _Throttle:
    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._last = float("-inf")
        self._suppressed = 0

    def due(self) -> int | None:
        """The number of lines left out since the last one, when one is due now; else None."""
        with self._mutex:
            now = time.monotonic()
            if now - self._last < LOG_EVERY_SECONDS:
                self._suppressed += 1
                return None
            self._last, suppressed, self._suppressed = now, self._suppressed, 0
            return suppressed


def bounded_lock(path: Path, timeout: float | None) -> FileLock:
    """A :class:`FileLock` on ``path`` that gives up after ``timeout`` seconds (None: never)."""
    throttle = _Throttle()
    name = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))

    def busy(error: LockTimeout) -> StoreBusy:
        suppressed = throttle.due()
        if suppressed is not None:
            log.warning("store.lock_busy", lock=name, exclusive=error.exclusive,
                        waited_ms=round(error.waited * 1000), holder_pids=error.holders or None,
                        suppressed=suppressed or None,
                        detail="another process holds the store lock (stopped or stuck?); "
                               "requests answer 503 until it lets go or dies")
        return StoreBusy(f"the job store is busy: its lock could not be had within {error.waited:.1f} s "
                         "(another process holds it); try again shortly")

    return FileLock(path, timeout=timeout, on_timeout=busy)
