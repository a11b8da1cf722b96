"""cleanup-old deletes only what is still old and finished when it gets to it: a job re-opened by a
retry (in another process) after cleanup-old listed it stays, and the repository's conditional
delete checks its predicate against the stored job."""
from __future__ import annotations

import json
import multiprocessing
from datetime import datetime, timezone
from pathlib import Path

import pytest

from morag_remote.exceptions import InvalidTransition, JobNotFound
from morag_remote.models import RemoteJob, Status, new_job_id
from morag_remote.store.files.jobs import FileJobStore

from support.jobs import file_service, source_file

JOBS = 200


def _retrier(data_dir: str, source_root: str, ids: list[str], started, out: str) -> None:
    """Runs in a child process: re-open every job, newest first, and write which retries succeeded.
    ``started`` is set once the first retry is done, so cleanup-old runs while the retries go on."""
    service = file_service(data_dir, source_root)
    reopened = []
    for job_id in reversed(ids):
        try:
            service.retry(job_id)
        except (JobNotFound, InvalidTransition):
            continue
        reopened.append(job_id)
        started.set()
    Path(out).write_text(json.dumps(reopened))


@pytest.mark.slow
def test_cleanup_old_keeps_jobs_a_retry_in_another_process_reopened(tmp_path):
    data_dir, sources = tmp_path / "remote_jobs", tmp_path / "sources"
    service = file_service(str(data_dir), str(sources))
    clip = source_file(service, "clip.bin")
    ids = []
    for i in range(JOBS):
        job = service.create(source_file_path=clip, ingestion_task_id=f"t{i}",
                             content_type="audio")
        service.cancel(job.id)
        ids.append(job.id)

    ctx = multiprocessing.get_context("spawn")
    started = ctx.Event()
    out = tmp_path / "reopened.json"
    child = ctx.Process(target=_retrier, args=(str(data_dir), str(sources), ids, started, str(out)))
    child.start()
    assert started.wait(120), "the retrying process did not start"
    deleted = service.cleanup_old(0)
    child.join(timeout=120)
    assert child.exitcode == 0

    reopened = json.loads(out.read_text())
    survivors = {path.stem for path in data_dir.glob("*/*.json")}
    assert set(reopened) <= survivors, "a job re-opened by a retry was deleted by cleanup-old"
    assert all(service.get(job_id).status == Status.PENDING.value for job_id in reopened)
    assert deleted == JOBS - len(survivors), "cleanup-old counted a job it did not delete"


def _job(store: FileJobStore, status: str) -> RemoteJob:
    now = datetime.now(timezone.utc)
    job = RemoteJob(id=new_job_id(), ingestion_task_id="t", source_file_path="/src/a", content_type="audio",
                    task_options={}, created_at=now, updated_at=now, available_at=now, status=status)
    return store.create(job)


def test_conditional_delete_keeps_the_job_when_the_predicate_refuses_its_stored_state(tmp_path):
    store = FileJobStore(tmp_path / "remote_jobs")
    job = _job(store, Status.PENDING.value)
    seen = []

    def only_if_finished(current: RemoteJob) -> bool:
        seen.append(current.status)
        return Status(current.status).is_terminal

    assert store.delete(job.id, only_if=only_if_finished) is False
    assert seen == [Status.PENDING.value]
    assert store.get(job.id).status == Status.PENDING.value


def test_conditional_delete_removes_the_job_when_the_predicate_accepts(tmp_path):
    store = FileJobStore(tmp_path / "remote_jobs")
    job = _job(store, Status.CANCELLED.value)
    assert store.delete(job.id, only_if=lambda current: Status(current.status).is_terminal) is True
    with pytest.raises(JobNotFound):
        store.get(job.id)
