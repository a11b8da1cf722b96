"""Helpers for the lifecycle tests: bring a job into any status through the service (as callers
would), and read the store's files exactly as they are on disk."""
from __future__ import annotations

from pathlib import Path

from morag_remote.config import Settings
from morag_remote.models import STATUSES, RemoteJob, Status
from morag_remote.service import Caller, JobService
from morag_remote.store.files.jobs import FileJobStore


def file_service(data_dir: str, source_root: str, **store_options) -> JobService:
    """A service on the JSON files in ``data_dir``, as each OS process of a concurrency test builds it
    (``store_options``: :class:`FileJobStore`'s keyword arguments)."""
    return JobService(FileJobStore(data_dir, **store_options), Settings(source_roots=(source_root,)))


def source_file(service: JobService, name: str = "input.bin") -> str:
    root = Path(service.settings.source_roots[0])
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    if not path.exists():
        path.write_bytes(b"source bytes")
    return str(path)


def new_job(service: JobService, content_type: str = "audio", **extra) -> RemoteJob:
    return service.create(source_file_path=source_file(service), content_type=content_type,
                          ingestion_task_id=extra.pop("ingestion_task_id", "ingest-1"), **extra)


def claimed_job(service: JobService, worker_id: str = "w1", content_type: str = "audio", **extra) -> RemoteJob:
    job = new_job(service, content_type, **extra)
    got = service.poll(worker_id, [content_type])
    assert [j.id for j in got] == [job.id]
    return got[0]


def lease_of(service: JobService, content_type: str = "audio") -> float:
    return service.settings.lease_for(content_type)


def job_in(service: JobService, clock, status: Status, max_retries: int = 3, **extra) -> RemoteJob:
    """A job brought into ``status`` the way the API would (``clock`` moves time for a timeout or a
    hold); ``extra`` goes to the create (``on_lapse``, ``requires``...)."""
    if status is Status.PENDING:
        return new_job(service, max_retries=max_retries, **extra)
    if status is Status.CANCELLED:
        return service.cancel(new_job(service, max_retries=max_retries, **extra).id)
    if status is Status.HELD:
        job = claimed_job(service, max_retries=max_retries, **dict(extra, on_lapse="hold"))
        clock.advance(lease_of(service) + 1)
        assert service.expire_due() == 1
        return service.get(job.id)
    if status is Status.TIMEOUT:
        job = claimed_job(service, max_retries=0, **dict(extra, on_lapse="fail"))
        clock.advance(lease_of(service) + 1)
        assert service.expire_due() == 1
        return service.get(job.id)
    job = claimed_job(service, max_retries=max_retries, **extra)
    if status is Status.COMPLETED:
        return service.submit_result(job.id, Caller(job.lease_id), success=True, content="text").job
    if status is Status.FAILED:
        return service.submit_result(job.id, Caller(job.lease_id), success=False,
                                     error_message="unsupported codec", retryable=False).job
    assert status is Status.PROCESSING
    return job


def disk_snapshot(root: Path) -> dict[str, bytes]:
    """Every file of every status directory, by relative path, with its bytes."""
    return {f"{status}/{p.name}": p.read_bytes()
            for status in STATUSES for p in sorted((root / status).iterdir())}


def directories_of(root: Path, job_id: str) -> list[str]:
    """The status directories that hold a file of ``job_id``."""
    return [status for status in STATUSES if (root / status / f"{job_id}.json").exists()]
