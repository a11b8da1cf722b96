"""Fill a data directory with pending jobs fast: the job files written directly, without fsync.

The files are the store's truth and each gunicorn worker builds its catalog from them when it
starts, so a seeded directory is exactly what a store that received these jobs one by one holds.
Durability of the seed does not matter (it is thrown away); what is measured afterwards is durable.
"""
from __future__ import annotations

import os
from pathlib import Path

from morag_remote.models import RemoteJob, new_job_id, utcnow
from morag_remote.store.files import FileJobStore, _encode


def seed_pending(data_dir: Path, source: Path, counts: dict[str, int]) -> int:
    """Write ``counts[content_type]`` pending jobs of each type; returns how many were written."""
    store = FileJobStore(data_dir)  # makes the layout
    folder = store.root / "pending"
    now = utcnow()
    written = 0
    for content_type, n in counts.items():
        for _ in range(n):
            job = RemoteJob(id=new_job_id(), ingestion_task_id="bench-seed", source_file_path=str(source),
                            content_type=content_type, task_options={}, created_at=now, updated_at=now,
                            available_at=now, version=1)
            fd = os.open(folder / f"{job.id}.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, _encode(job))
            finally:
                os.close(fd)
            written += 1
    return written
