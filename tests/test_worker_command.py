"""The ``morag-remote-worker`` command against a real gunicorn: jobs done once each with the
handler's content, the two handler kinds, their output rules, and the refusals at start."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from gunicorn_harness import wait_for
from worker_support import WORKER_BIN, WorkerProcess, all_terminal, handler_script, served

pytestmark = pytest.mark.slow


@pytest.fixture
def workers():
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        w.stop()


def test_twenty_jobs_with_concurrency_four_each_completed_once_with_its_content(tmp_path, workers):
    with served(tmp_path) as srv:
        template = handler_script(tmp_path, (
            "time.sleep(0.2)\n"
            "data = open(input_path).read()\n"
            "open(os.path.join(output_dir, 'content.txt'), 'w').write('converted ' + data)\n"
            "json.dump({'job': job_id}, open(os.path.join(output_dir, 'metadata.json'), 'w'))\n"))
        producer = srv.client()
        jobs = {producer.create(srv.source(f"s{i}.txt", f"source number {i}".encode()), "document",
                                f"ingest-{i}").job_id: i for i in range(20)}
        worker = WorkerProcess(srv.url, srv.keys["worker"], tmp_path / "w", "--exec", template,
                               "--concurrency", "4", content_types="document").start()
        workers.append(worker)
        wait_for(lambda: all_terminal(producer, list(jobs)), 120, "every job to finish")
        for job_id, i in jobs.items():
            job = producer.get(job_id)
            assert job.status == "completed", job
            assert job.content == f"converted source number {i}"
            assert job.result_data["metadata"] == {"job": job_id}
            assert job.retry_count == 0 and job.raw["attempt"] == 1
        claimed = [e["job_id"] for e in worker.named("job.claimed")]
        assert sorted(claimed) == sorted(jobs)  # each claimed exactly once
        assert len(worker.named("result.sent")) == 20
        running = [e for e in worker.events() if e.get("event") == "handler.started"]
        assert len(running) == 20
