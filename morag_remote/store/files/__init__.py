"""The JSON-file backend, the embedded default: every record a file under the instance folder.

``jobs.py`` (the job store: status folders, the lock, claims) is built from ``atomic.py`` (temp
file, fsync, rename; the file lock), ``catalog.py`` (the in-memory index), ``journal.py`` (changes
announced to the other processes), ``recycle.py`` (reused spare files) and ``stale.py`` (old copies
removed after the lock); ``keys.py``, ``idempotency.py``, ``outbox.py``, ``workers.py`` and
``throughput.py`` keep the other records; ``fsck.py`` checks and repairs what a crash can leave.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from ...config import store_lock_timeout
from ..base import Backend
from .fsck import fsck, fsck_keys
from .idempotency import FileIdempotencyRecords
from .jobs import FileJobStore
from .keys import FileKeyStore
from .outbox import FileOutbox
from .throughput import FileThroughputSeries
from .workers import FileWorkerRegistry


def open_backend(config: Mapping[str, Any], instance_path: str) -> Backend:
    """Jobs, idempotency records and events under ``JOBS_DATA_DIR``; API keys in the instance folder."""
    data_dir = config["JOBS_DATA_DIR"]
    bound = store_lock_timeout(config)  # every lock of the store gives up after it (StoreBusy, 503)
    jobs = FileJobStore(data_dir, lock_timeout=bound)
    keys = FileKeyStore(os.path.join(instance_path, "api_keys.json"))
    return Backend(
        name="files",
        jobs=jobs,
        keys=keys,
        idempotency=FileIdempotencyRecords(os.path.join(data_dir, "idempotency"), bound),
        outbox=FileOutbox(os.path.join(data_dir, "events"), bound),
        workers=FileWorkerRegistry(os.path.join(data_dir, "workers"), bound),
        throughput=FileThroughputSeries(os.path.join(data_dir, "throughput"), bound),
        fsck=lambda repair: fsck(jobs, repair=repair) + fsck_keys(keys, repair=repair),
    )
