"""PostgreSQL crashing and coming back under a real gunicorn: while it is down every request answers
503 problem+json (never a 500), the pool and the LISTEN connection come back by themselves, nothing
acknowledged is lost and nothing is claimed twice. A cluster of the test's own, crashed 5 times."""
from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import requests

from morag_remote import create_app
from morag_remote.context import KEYS
from morag_remote.store.postgres import migrate
from morag_remote.store.postgres.db import Database
from support.gunicorn import Gunicorn, wait_for
from support.pg_cluster import Cluster

pytestmark = pytest.mark.slow
J = "/api/v1/remote-jobs"
CRASHES = 5
OUTAGE_SECONDS = 3.0


@pytest.fixture
def cluster(tmp_path):
    cluster = Cluster(tmp_path / "pg")
    cluster.start()
    try:
        with Database(cluster.url).connect(autocommit=True) as conn:
            migrate.upgrade(conn)
        yield cluster
    finally:
        cluster.stop()


class Load:
    """A producer and a worker going round while the database comes and goes; every answer kept."""

    def __init__(self, base: str, keys: dict[str, str], source: str) -> None:
        self.base, self.keys, self.source = base, keys, source
        self.answers: list[tuple[str, int, str]] = []
        self.created: list[str] = []
        self.claimed: list[str] = []
        self.completed: list[str] = []
        self.stop = threading.Event()

    def _call(self, what: str, method: str, path: str, role: str, **kw):
        try:
            response = requests.request(method, self.base + path, headers={"Authorization": f"Bearer {self.keys[role]}"},
                                        timeout=15, **kw)
        except requests.RequestException as exc:
            self.answers.append((what, -1, type(exc).__name__))
            return None
        self.answers.append((what, response.status_code, response.headers.get("Content-Type", "")))
        return response

    def produce(self) -> None:
        for n in range(100_000):
            if self.stop.is_set():
                return
            r = self._call("create", "POST", f"{J}/", "producer", json={
                "source_file_path": self.source, "content_type": "audio", "ingestion_task_id": f"t{n}"})
            if r is not None and r.status_code == 201:
                self.created.append(r.json()["job_id"])
            time.sleep(0.05)

    def work(self) -> None:
        while not self.stop.is_set():
            r = self._call("poll", "GET", f"{J}/poll", "worker",
                           params={"worker_id": "w1", "content_types": "audio", "wait": 1})
            if r is None or r.status_code != 200:
                time.sleep(0.1)
                continue
            for job in r.json()["jobs"]:
                self.claimed.append(job["job_id"])
                for _ in range(200):  # the result is retried until it is stored (a worker's duty)
                    done = self._call("result", "PUT", f"{J}/{job['job_id']}/result", "worker",
                                      json={"success": True, "content": "ok", "lease_id": job["lease_id"]})
                    if done is not None and done.status_code == 200:
                        self.completed.append(job["job_id"])
                        break
                    time.sleep(0.1)


def test_the_service_rides_out_five_database_crashes(cluster, tmp_path):
    instance = tmp_path / "instance"
    (instance / "sources").mkdir(parents=True)
    source = instance / "sources" / "a.mp3"
    source.write_bytes(b"audio")
    env = {"MORAG_REMOTE_DATABASE_URL": cluster.url, "MORAG_REMOTE_DATABASE_TIMEOUT": "2"}
    keystore = create_app({"INSTANCE_PATH": str(instance), "DATABASE_URL": cluster.url}).extensions[KEYS]
    keys = {role: keystore.create(f"{role}-key", role)[1] for role in ("worker", "producer", "admin")}
    server = Gunicorn(instance, workers=2, env=env).start()
    load = Load(server.base_url, keys, str(source))
    threads = [threading.Thread(target=load.produce), threading.Thread(target=load.work)]
    try:
        for t in threads:
            t.start()
        recoveries = []
        for _ in range(CRASHES):
            time.sleep(1.0)
            cluster.crash()
            time.sleep(OUTAGE_SECONDS)
            cluster.start()
            back = time.monotonic()
            before = len(load.created)
            wait_for(lambda: len(load.created) > before, 30, "a create to succeed after the restart")
            recoveries.append(time.monotonic() - back)
        time.sleep(1.0)
        load.stop.set()
        for t in threads:
            t.join(60)

        # a job created now wakes a long poll that is already waiting: LISTEN is back
        woke = {}
        poller = threading.Thread(target=lambda: woke.update(r=requests.get(
            server.url(f"{J}/poll"), params={"worker_id": "w2", "content_types": "video", "wait": 15},
            headers={"Authorization": f"Bearer {keys['worker']}"}, timeout=30)))
        poller.start()
        time.sleep(1.0)
        created_at = time.monotonic()
        video = requests.post(server.url(f"{J}/"), headers={"Authorization": f"Bearer {keys['producer']}"},
                              json={"source_file_path": str(source), "content_type": "video",
                                    "ingestion_task_id": "after"}, timeout=15).json()["job_id"]
        poller.join(30)
        assert woke["r"].json()["job_id"] == video
        assert time.monotonic() - created_at < 3.0  # woken by NOTIFY, not by the poll's own timeout

        statuses = Counter(status for _, status, _ in load.answers)
        assert statuses[500] == 0, [a for a in load.answers if a[1] == 500][:5]
        refused = [a for a in load.answers if a[1] == 503]
        assert refused, "no request met the outage"
        assert all(ctype == "application/problem+json" for _, _, ctype in refused)
        assert max(recoveries) < 15, recoveries

        jobs = {}
        after = None
        for _ in range(100):
            page = requests.get(server.url(f"{J}/"), headers={"Authorization": f"Bearer {keys['producer']}"},
                                params={"limit": 500, **({"cursor": after} if after else {})}, timeout=15).json()
            jobs.update({j["id"]: j for j in page["jobs"]})
            after = page["next_cursor"]
            if after is None:
                break
        assert set(load.created) <= set(jobs)  # nothing acknowledged lost
        assert [j for j, n in Counter(load.claimed).items() if n > 1] == []  # nothing claimed twice
        for job_id in load.completed:
            assert jobs[job_id]["status"] == "completed"
        assert len(load.completed) > 10
        assert "Traceback" not in server.stderr()
    finally:
        load.stop.set()
        server.stop()
