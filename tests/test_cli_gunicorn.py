"""``flask remote-jobs cleanup-expired`` run from cron while gunicorn serves the same store: two CLI
processes and gunicorn's own lazy lease handling race over the same lapsed leases, while requests
keep creating jobs. Every lapsed job is re-queued exactly once and nothing is lost."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

from support.gunicorn import ROOT, Gunicorn, make_keys, wait_for
from support.metrics_text import parse_samples, value

pytestmark = pytest.mark.slow

API = "/api/v1/remote-jobs"
LAPSED = 40
MAX_TRAFFIC = 200
# gunicorn handles one lapsed lease per poll, so it keeps competing with the CLI for the whole run.
ENV = {"MORAG_REMOTE_LEASE_SECONDS": '{"audio": 1, "default": 3600}', "MORAG_REMOTE_LAPSED_PER_POLL": "1"}
FLASK = str(Path(sys.executable).parent / "flask")


class FlaskCommand:
    """``flask --app morag_remote ...`` in its own process, as cron runs it; its log lines are read
    as they come so a test can act when the command reaches the store."""

    def __init__(self, instance: Path, *args: str) -> None:
        env = {**os.environ, **ENV, "MORAG_REMOTE_INSTANCE_PATH": str(instance)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen([FLASK, "--app", "morag_remote", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.at_store = threading.Event()
        self.err: list[str] = []
        self.reader = threading.Thread(target=self._read_errors, daemon=True)
        self.reader.start()

    def _read_errors(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)
            if '"store.catalog_rebuilt"' in line:
                self.at_store.set()
        self.at_store.set()

    def finish(self) -> tuple[int, str]:
        out = self.proc.stdout.read()
        self.proc.wait(timeout=120)
        self.reader.join(timeout=30)
        assert not any("Traceback" in line for line in self.err), "".join(self.err)
        return self.proc.returncode, out


def test_cleanup_expired_from_the_cli_while_gunicorn_serves_requeues_each_lapse_once(tmp_path):
    instance = tmp_path / "instance"
    sources = instance / "sources"
    sources.mkdir(parents=True)
    keys = make_keys(instance)
    server = Gunicorn(instance, workers=2, env=ENV).start()

    def call(method: str, path: str, role: str, **kwargs) -> dict:
        response = requests.request(method, server.url(path), timeout=60,
                                    headers={"Authorization": f"Bearer {keys[role]}"}, **kwargs)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def create(content_type: str, n: int) -> str:
        source = sources / f"{content_type}-{n}.bin"
        source.write_bytes(b"payload")
        return call("POST", f"{API}/", "producer", json={
            "source_file_path": str(source), "content_type": content_type, "ingestion_task_id": "t"})["job_id"]

    try:
        audio = {create("audio", n) for n in range(LAPSED)}
        claimed = [j for _ in range(LAPSED // 10) for j in call("GET", f"{API}/poll", "worker", params={
            "worker_id": "w-dead", "content_types": "audio", "max_jobs": 10})["jobs"]]
        assert {j["job_id"] for j in claimed} == audio
        deadline = max(datetime.fromisoformat(j["timeout_at"].replace("Z", "+00:00")) for j in claimed)
        wait_for(lambda: datetime.now(timezone.utc) > deadline, 30, "the leases to lapse")

        # The race: two cron runs, and gunicorn handling lapses lazily on polls, while jobs are created.
        clis = [FlaskCommand(instance, "remote-jobs", "cleanup-expired", "--json") for _ in range(2)]
        created: list[str] = []

        def traffic() -> None:
            wait_for(lambda: any(c.at_store.is_set() for c in clis), 120, "a CLI to reach the store")
            for n in range(MAX_TRAFFIC):
                if all(c.proc.poll() is not None for c in clis) and n >= 5:
                    return
                created.append(create("document", n))
                assert call("GET", f"{API}/poll", "worker", params={
                    "worker_id": "w-live", "content_types": "video"})["jobs"] == []

        thread = threading.Thread(target=traffic)
        thread.start()
        results = [c.finish() for c in clis]
        thread.join(timeout=300)
        assert not thread.is_alive() and len(created) >= 5

        assert [code for code, _ in results] == [0, 0]
        by_cli = sum(json.loads(out)["expired"] for _, out in results)
        samples = parse_samples(requests.get(server.url("/metrics"), timeout=30,
                                             headers={"Authorization": f"Bearer {keys['admin']}"}).text)
        by_server = value(samples, "morag_remote_lease_expiries_total", 0.0, content_type="audio",
                          outcome="requeued")
        assert by_cli + by_server == LAPSED

        jobs = call("GET", f"{API}/", "admin", params={"limit": 500})["jobs"]
        assert {j["id"] for j in jobs} == audio | set(created)  # none lost, none invented
        lapsed = [j for j in jobs if j["id"] in audio]
        assert {(j["status"], j["retry_count"], j["attempt"], j["worker_id"]) for j in lapsed} == {
            ("pending", 1, 1, None)}

        # Done once means done: a third run finds nothing, and the store is consistent.
        code, out = FlaskCommand(instance, "remote-jobs", "cleanup-expired", "--json").finish()
        assert (code, json.loads(out)) == (0, {"expired": 0})
        assert FlaskCommand(instance, "remote-jobs", "fsck").finish()[0] == 0

        # And gunicorn still serves: a live worker gets one of the re-queued jobs.
        assert requests.get(server.url("/health"), timeout=30).status_code == 200
        [again] = call("GET", f"{API}/poll", "worker", params={"worker_id": "w-new", "content_types": "audio"})["jobs"]
        assert again["job_id"] in audio and again["retry_count"] == 1
    finally:
        server.stop()
