"""A claim of several jobs whose write fails part-way returns the jobs it did claim: the worker gets
them now, instead of their leases running out while no one works on them. A claim that claimed
nothing raises the failure."""
from __future__ import annotations

import errno
import json
import multiprocessing
import resource
import signal
from datetime import datetime, timezone
from pathlib import Path

from morag_remote.models import RemoteJob, new_job_id
from morag_remote.store.files.jobs import FileJobStore

# Job files larger than this cannot be written in the child (RLIMIT_FSIZE): the write fails with EFBIG.
FILE_SIZE_LIMIT = 4096


def _job(store: FileJobStore, priority: int, padding: int) -> str:
    now = datetime.now(timezone.utc)
    job = RemoteJob(id=new_job_id(), ingestion_task_id="t", source_file_path="/src/a", content_type="audio",
                    task_options={"pad": "x" * padding}, created_at=now, updated_at=now, available_at=now,
                    priority=priority)
    return store.create(job).id


def _claim_as_w1(job: RemoteJob) -> RemoteJob:
    job.status = "processing"
    job.worker_id = "w1"
    return job


def _claim_with_small_file_limit(data_dir: str, out: str) -> None:
    """Runs in another process: claim up to 3 jobs while no file may grow past FILE_SIZE_LIMIT."""
    store = FileJobStore(data_dir)
    store.stats()  # indexed before the limit applies
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, hard))
    outcome: dict = {}
    try:
        outcome["claimed"] = [job.id for job in store.claim(["audio"], 3, datetime.now(timezone.utc), _claim_as_w1)]
    except OSError as exc:
        outcome["error"] = exc.errno
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    Path(out).write_text(json.dumps(outcome))


def _run_claim(data_dir: Path, tmp_path: Path) -> dict:
    out = tmp_path / "outcome.json"
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_claim_with_small_file_limit, args=(str(data_dir), str(out)))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    return json.loads(out.read_text())


def test_a_write_failing_after_one_claim_returns_the_job_claimed(tmp_path):
    data_dir = tmp_path / "remote_jobs"
    store = FileJobStore(data_dir)
    small = _job(store, priority=9, padding=10)            # claimed first: its file fits
    large = _job(store, priority=5, padding=FILE_SIZE_LIMIT)  # its write fails

    outcome = _run_claim(data_dir, tmp_path)

    assert outcome == {"claimed": [small]}
    assert store.get(small).status == "processing" and store.get(small).worker_id == "w1"
    assert store.get(large).status == "pending"


def test_a_write_failing_before_any_claim_raises(tmp_path):
    data_dir = tmp_path / "remote_jobs"
    store = FileJobStore(data_dir)
    large = _job(store, priority=5, padding=FILE_SIZE_LIMIT)

    outcome = _run_claim(data_dir, tmp_path)

    assert outcome["error"] == errno.EFBIG
    assert store.get(large).status == "pending"
