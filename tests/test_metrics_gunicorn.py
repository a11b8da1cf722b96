"""/metrics of a real gunicorn with 3 worker processes: after a known sequence of jobs, sent over
HTTP on a new connection per request, the counters add up exactly across the processes, including
those of a worker that was SIGKILLed half-way (its counts are in its files, not its memory)."""
from __future__ import annotations

import os
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

from support.gunicorn import Gunicorn, make_keys, wait_for
from support.metrics_text import parse_samples, value, values_of
from morag_remote import metrics_location

pytestmark = pytest.mark.slow

API = "/api/v1/remote-jobs"
ENV = {
    "MORAG_REMOTE_LEASE_SECONDS": '{"audio": 600, "video": 600, "document": 1, "default": 600}',
    "MORAG_REMOTE_RETRY_BACKOFF_SECONDS": "600",  # a failed job stays out of the queue during the test
}


class Http:
    """One call per new connection, so the kernel hands them to any of the worker processes."""

    def __init__(self, server: Gunicorn, keys: dict[str, str], sources: Path) -> None:
        self.server, self.keys, self.sources = server, keys, sources

    def call(self, method: str, path: str, role: str, expect: int = 200, **kwargs) -> dict:
        response = requests.request(method, self.server.url(path), timeout=30,
                                    headers={"Authorization": f"Bearer {self.keys[role]}"}, **kwargs)
        assert response.status_code == expect, (method, path, response.status_code, response.text)
        return response.json() if response.content and "json" in response.headers["Content-Type"] else {}

    def create(self, content_type: str, **extra) -> str:
        source = self.sources / f"{content_type}-{len(list(self.sources.iterdir()))}.bin"
        source.write_bytes(b"payload")
        body = {"source_file_path": str(source), "content_type": content_type, "ingestion_task_id": "t", **extra}
        return self.call("POST", f"{API}/", "producer", 201, json=body)["job_id"]

    def poll(self, worker_id: str, content_types: str, max_jobs: int = 1) -> list[dict]:
        return self.call("GET", f"{API}/poll", "worker", params={
            "worker_id": worker_id, "content_types": content_types, "max_jobs": max_jobs})["jobs"]

    def result(self, job_id: str, success: bool = True, **body) -> None:
        payload = {"success": success, **body}
        if success:
            payload.update(content="text", processing_time=0.5)
        self.call("PUT", f"{API}/{job_id}/result", "worker", json=payload)

    def scrape(self) -> dict:
        response = requests.get(self.server.url("/metrics"), timeout=30,
                                headers={"Authorization": f"Bearer {self.keys['worker']}"})
        assert response.status_code == 200, response.text
        return parse_samples(response.text)


@pytest.fixture
def served(tmp_path):
    instance = tmp_path / "instance"
    (instance / "sources").mkdir(parents=True)
    keys = make_keys(instance)
    server = Gunicorn(instance, workers=3, env=ENV).start()
    try:
        yield Http(server, keys, instance / "sources")
    finally:
        server.stop()


def _pids_with_counters(directory: Path) -> set[int]:
    return {int(p.stem.split("_")[-1]) for p in directory.glob("counter_*.db")}


def test_counters_add_up_exactly_across_three_gunicorn_workers(served):
    http, server = served, served.server
    started = time.time()
    prom_dir = Path(metrics_location.default_dir(str(server.instance)))  # in shared memory, off the disk
    assert server.instance not in prom_dir.parents

    # Phase 1: 11 jobs, 11 claims, 5 audio results.
    audio = [http.create("audio") for _ in range(5)]
    video = [http.create("video") for _ in range(3)]
    for _ in range(2):
        http.create("document")
    http.create("document", max_retries=0)
    assert [http.poll("w-audio", "audio")[0]["job_id"] for _ in audio] == audio
    assert [http.poll("w-video", "video")[0]["job_id"] for _ in video] == video
    documents = http.poll("w-doc", "document", max_jobs=3)  # one poll: none can lapse before the last claim
    assert len(documents) == 3
    for job_id in audio[:3]:
        http.result(job_id)
    http.result(audio[3], success=False, error_message="cuda oom")                   # re-queued
    http.result(audio[4], success=False, error_message="not audio", retryable=False)  # failed

    # A worker that counted some of that dies; its replacement boots.
    victims = _pids_with_counters(prom_dir) & set(server.booted_pids())
    assert victims, "no worker process has written counters"
    os.kill(sorted(victims)[0], signal.SIGKILL)
    wait_for(lambda: len(server.booted_pids()) == 4, 60, "gunicorn to replace the killed worker")

    # Phase 2, served by the other processes: video results, a cancel and a retry, and lapsed leases.
    http.result(video[0])
    http.call("POST", f"{API}/{video[1]}/cancel", "producer")
    http.call("POST", f"{API}/{video[1]}/retry", "producer")
    deadline = max(datetime.fromisoformat(d["timeout_at"].replace("Z", "+00:00")) for d in documents)
    wait_for(lambda: datetime.now(timezone.utc) > deadline, 30, "the document leases to lapse")
    assert http.poll("w-image", "image") == []  # claims nothing; handles the three lapsed leases
    elapsed = time.time() - started

    assert len(_pids_with_counters(prom_dir)) >= 2
    for _ in range(3):  # whichever process answers, the totals are the same
        samples = http.scrape()
        assert values_of(samples, "morag_remote_job_claims_total") == {
            (("content_type", "audio"),): 5, (("content_type", "video"),): 3, (("content_type", "document"),): 3}
        assert values_of(samples, "morag_remote_job_completions_total") == {
            (("content_type", "audio"),): 3, (("content_type", "video"),): 1}
        assert values_of(samples, "morag_remote_job_duration_seconds_count") == {
            (("content_type", "audio"),): 3, (("content_type", "video"),): 1}
        assert value(samples, "morag_remote_job_duration_seconds_bucket", content_type="audio", le="+Inf") == 3
        assert values_of(samples, "morag_remote_job_failures_total") == {
            (("content_type", "audio"), ("outcome", "requeued")): 1,
            (("content_type", "audio"), ("outcome", "failed")): 1}
        assert values_of(samples, "morag_remote_job_requeues_total") == {
            (("content_type", "audio"), ("reason", "failure")): 1,
            (("content_type", "video"), ("reason", "retry")): 1,
            (("content_type", "document"), ("reason", "lease_expired")): 2}
        assert values_of(samples, "morag_remote_lease_expiries_total") == {
            (("content_type", "document"), ("outcome", "requeued")): 2,
            (("content_type", "document"), ("outcome", "timeout")): 1}
        assert values_of(samples, "morag_remote_jobs") == {
            (("content_type", "audio"), ("status", "completed")): 3,
            (("content_type", "audio"), ("status", "pending")): 1,
            (("content_type", "audio"), ("status", "failed")): 1,
            (("content_type", "video"), ("status", "completed")): 1,
            (("content_type", "video"), ("status", "pending")): 1,
            (("content_type", "video"), ("status", "processing")): 1,
            (("content_type", "document"), ("status", "pending")): 2,
            (("content_type", "document"), ("status", "timeout")): 1}
        assert value(samples, "morag_remote_active_workers") == 3
        assert 0 < value(samples, "morag_remote_oldest_pending_job_age_seconds") <= elapsed + 1
