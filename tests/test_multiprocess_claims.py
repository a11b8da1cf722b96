"""Claims are exclusive across OS processes: 8 processes drain one store of 1,000 pending jobs
through the service, as 8 gunicorn workers would."""
from __future__ import annotations

import json
import multiprocessing
import random
from collections import Counter
from pathlib import Path

import pytest

from morag_remote.models import RemoteJob

from support.jobs import file_service, source_file

PROCESSES = 8
JOBS = 1000


def _claimer(data_dir: str, source_root: str, worker_id: str, types: list[str], start, out: str) -> None:
    """Runs in a child process: poll until nothing is left, then write what was claimed."""
    service = file_service(data_dir, source_root)
    rng = random.Random(worker_id)
    start.wait(120)  # a barrier: every process is ready before any claims
    claimed: list[str] = []
    for _ in range(JOBS + 1):  # bounded: each round claims at least one job or ends the loop
        jobs = service.poll(worker_id, types, max_jobs=rng.randint(1, 4))
        if not jobs:
            break
        claimed += [job.id for job in jobs]
    Path(out).write_text(json.dumps(claimed))


@pytest.mark.slow
def test_eight_processes_claim_each_of_1000_jobs_exactly_once(tmp_path):
    data_dir, sources = tmp_path / "remote_jobs", tmp_path / "sources"
    service = file_service(str(data_dir), str(sources))
    clip = source_file(service, "clip.bin")
    created = [service.create(source_file_path=clip, ingestion_task_id=f"t{i}",
                              content_type="audio" if i % 2 else "video").id for i in range(JOBS)]

    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(PROCESSES)
    procs = []
    for n in range(PROCESSES):
        types = ["audio", "video"] if n % 2 else (["audio"] if n % 4 == 0 else ["video"])
        proc = ctx.Process(target=_claimer, args=(str(data_dir), str(sources), f"w{n}", types, start,
                                                  str(tmp_path / f"claimed-{n}.json")))
        proc.start()
        procs.append(proc)
    for proc in procs:
        proc.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * PROCESSES

    by_worker = {f"w{n}": json.loads((tmp_path / f"claimed-{n}.json").read_text()) for n in range(PROCESSES)}
    counts = Counter(job_id for ids in by_worker.values() for job_id in ids)
    assert sorted(counts) == sorted(created), "a job was lost or an unknown id was claimed"
    assert max(counts.values()) == 1, "a job was claimed twice"
    assert sum(1 for ids in by_worker.values() if ids) > 1, "only one process got to claim"

    owner = {job_id: worker for worker, ids in by_worker.items() for job_id in ids}
    placed = Counter()
    for path in data_dir.glob("*/*.json"):
        job = RemoteJob.from_dict(json.loads(path.read_text()))
        placed[job.id] += 1
        assert path.parent.name == "processing" == job.status
        assert (job.worker_id, job.attempt) == (owner[job.id], 1)
    assert placed == Counter(created), "a job is in two status directories, or none"
    assert not list(data_dir.glob("*/.tmp-*"))
