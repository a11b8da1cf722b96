"""Routing under real processes, on both backends: two API hosts (gunicorn, two workers each; on the
file store two gunicorns sharing one store folder, on PostgreSQL two hosts on one database).

- Limit: 16 pollers over the 2 hosts, limit 3 on video: the processing count, sampled every 10 ms
  from the store itself, never exceeds 3, reaches it, and every job completes, each claimed once.
- Pause: 50 pollers hammering a paused type for 5 s claim nothing while a job claimed before the
  pause completes normally; after the resume they drain the queue, each job claimed once.
- Hold: the worker (a real ``morag-remote-worker``) of a job whose on_lapse is hold is killed;
  after its lease the job is held, and a poller running throughout never gets it; ``retry`` sends
  it to exactly one worker.
"""
from __future__ import annotations

import collections
import os
import random
import secrets
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import requests

from support import postgres as pg_testing
from support.gunicorn import Gunicorn, make_keys, wait_for
from support.workers import WorkerProcess, handler_script
from morag_remote.store.files.jobs import FileJobStore

pytestmark = pytest.mark.slow

J = "/api/v1/remote-jobs"
LEASES = '{"audio": 2, "video": 60, "default": 60}'


@dataclass
class Fleet:
    hosts: list[str]
    keys: dict[str, str]
    sources: Path
    processing: Callable[[str], int]   # jobs of a type processing now, read from the store itself
    stoppers: list[Callable[[], None]] = field(default_factory=list)

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}

    def create(self, content_type: str, n: int, **extra) -> list[str]:
        path = self.sources / "input.bin"
        path.write_bytes(b"routing source")
        ids = []
        with requests.Session() as session:
            for i in range(n):
                r = session.post(f"{self.hosts[i % 2]}{J}/", headers=self.headers("producer"), timeout=30,
                                 json={"source_file_path": str(path), "content_type": content_type,
                                       "ingestion_task_id": f"routing-{i}", **extra})
                assert r.status_code == 201, r.text
                ids.append(r.json()["job_id"])
        return ids

    def admin(self, path: str, host: int = 0, **body) -> dict:
        r = requests.post(f"{self.hosts[host]}{J}{path}", headers=self.headers("admin"), json=body or None,
                          timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    def status(self, job_id: str, host: int = 0) -> dict:
        r = requests.get(f"{self.hosts[host]}{J}/{job_id}", headers=self.headers("producer"), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()


def _files_fleet(tmp_path: Path, env: dict[str, str]) -> Fleet:
    shared = tmp_path / "shared"
    sources = tmp_path / "sources"
    sources.mkdir(parents=True)
    first = tmp_path / "host-a"
    first.mkdir()
    keys = make_keys(first)
    common = {"MORAG_REMOTE_JOBS_DATA_DIR": str(shared), "MORAG_REMOTE_SECRET_KEY": secrets.token_hex(32),
              "MORAG_REMOTE_SOURCE_ROOTS": f'["{sources}"]', "MORAG_REMOTE_LEASE_SECONDS": LEASES,
              "MORAG_REMOTE_POLL_MAX_WAIT_SECONDS": "5", "GUNICORN_THREADS": "48", "MORAG_REMOTE_LOG_JSON": "true",
              **env}
    servers = []
    for name in ("host-a", "host-b"):
        instance = tmp_path / name
        instance.mkdir(exist_ok=True)
        if name != "host-a":
            shutil.copy2(first / "api_keys.json", instance / "api_keys.json")
        servers.append(Gunicorn(instance, workers=2, env=common).start())
    store = FileJobStore(shared)

    def processing(content_type: str) -> int:
        return store.stats().counts.get(("processing", content_type), 0)

    return Fleet([s.base_url for s in servers], keys, sources, processing, [s.stop for s in servers])


def _postgres_fleet(tmp_path: Path, url: str, database: pg_testing.TestDatabase, env: dict[str, str]) -> Fleet:
    from morag_remote.store.postgres.db import database as open_database
    from morag_remote.store.postgres.keys import PostgresKeyStore

    sources = tmp_path / "sources"
    sources.mkdir(parents=True)
    store = PostgresKeyStore(open_database(url))
    keys = {role: store.create(f"{role}-key", role)[1] for role in ("worker", "producer", "admin")}
    secret = secrets.token_hex(32)
    hosts = [pg_testing.Host(name, url, str(tmp_path / name), str(sources), secret,
                             env={"MORAG_REMOTE_LEASE_SECONDS": LEASES, **env}) for name in ("a", "b")]
    for host in hosts:
        host.wait_ready()
    conn = database.connect()

    def processing(content_type: str) -> int:
        return conn.execute("SELECT count(*) FROM remote_jobs WHERE status = 'processing' AND content_type = %s",
                            (content_type,)).fetchone()[0]

    return Fleet([h.base for h in hosts], keys, sources, processing, [*(h.stop for h in hosts), conn.close])


@pytest.fixture
def fleet_env() -> dict[str, str]:
    return {}


@pytest.fixture
def fleet(backend, tmp_path, fleet_env, request):
    if backend == "postgres":
        fleet = _postgres_fleet(tmp_path, request.getfixturevalue("pg_url"), request.getfixturevalue("pg_database"),
                                fleet_env)
    else:
        fleet = _files_fleet(tmp_path, fleet_env)
    try:
        yield fleet
    finally:
        for stop in fleet.stoppers:
            stop()


class Pollers:
    """``n`` polling workers (threads, each its own HTTP session), spread over the fleet's hosts:
    each polls, holds what it got for ``work`` seconds, and submits a result, until stopped."""

    def __init__(self, fleet: Fleet, n: int, content_types: str, work: tuple[float, float] = (0.0, 0.0),
                 wait: float = 1.0) -> None:
        self.fleet, self.types, self.work, self.wait = fleet, content_types, work, wait
        self.claims: list[tuple[str, str]] = []  # (worker id, job id), in claim order
        self.errors: list[str] = []
        self.polls = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, index: int) -> None:
        base = self.fleet.hosts[index % len(self.fleet.hosts)]
        worker_id = f"poller-{index}"
        with requests.Session() as session:
            session.headers.update(self.fleet.headers("worker"))
            while not self.stop.is_set():
                try:
                    r = session.get(f"{base}{J}/poll", timeout=30, params={
                        "worker_id": worker_id, "content_types": self.types, "max_jobs": 1, "wait": self.wait})
                except requests.RequestException as exc:
                    self._error(f"poll: {exc}")
                    continue
                with self._lock:
                    self.polls += 1
                if r.status_code != 200:
                    self._error(f"poll {r.status_code}: {r.text[:200]}")
                    continue
                for job in r.json()["jobs"]:
                    with self._lock:
                        self.claims.append((worker_id, job["job_id"]))
                    time.sleep(random.uniform(*self.work))
                    done = session.put(f"{base}{J}/{job['job_id']}/result", timeout=30,
                                       json={"success": True, "content": worker_id, "lease_id": job["lease_id"]})
                    if done.status_code != 200:
                        self._error(f"result {done.status_code}: {done.text[:200]}")

    def _error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)
        time.sleep(0.05)

    def __enter__(self) -> "Pollers":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(40)

    def claimed(self) -> list[str]:
        with self._lock:
            return [job_id for _, job_id in self.claims]


class Sampler:
    """The processing count of a type, read from the store every ``interval`` seconds."""

    def __init__(self, fleet: Fleet, content_type: str, interval: float = 0.01) -> None:
        self.read, self.content_type, self.interval = fleet.processing, content_type, interval
        self.samples: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append(self.read(self.content_type))
            time.sleep(self.interval)

    def __enter__(self) -> "Sampler":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


# -- the limit ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fleet_env", [{"MORAG_REMOTE_MAX_PROCESSING": '{"video": 3}'}])
def test_limit_3_with_16_pollers_on_2_hosts_is_never_exceeded_and_every_job_completes(fleet):
    ids = fleet.create("video", 60)
    with Sampler(fleet, "video") as sampler, Pollers(fleet, 16, "video", work=(0.02, 0.08)) as pollers:
        wait_for(lambda: len(pollers.claimed()) >= len(ids) and fleet.processing("video") == 0, 180,
                 "every job to be claimed and finished")
    assert pollers.errors == []
    claimed = pollers.claimed()
    assert sorted(claimed) == sorted(ids)  # every job, none twice
    assert len(sampler.samples) > 100
    assert max(sampler.samples) <= 3, collections.Counter(sampler.samples)
    assert max(sampler.samples) == 3  # the limit was reached, so it was what held them back
    assert len({worker for worker, _ in pollers.claims}) > 3  # spread over many pollers
    for job_id in random.sample(ids, 10):
        body = fleet.status(job_id, host=1)
        assert (body["status"], body["attempt"]) == ("completed", 1)


@pytest.mark.parametrize("fleet_env", [{"MORAG_REMOTE_MAX_PROCESSING": '{"video": 1}'}])
def test_limit_raised_at_run_time_on_one_host_applies_on_the_other(fleet):
    fleet.create("video", 6)
    fleet.admin("/types/video/limit", host=0, max_processing=4)
    with requests.Session() as s:
        s.headers.update(fleet.headers("worker"))
        got = s.get(f"{fleet.hosts[1]}{J}/poll", params={"worker_id": "w", "content_types": "video", "max_jobs": 6},
                    timeout=30).json()["jobs"]
    assert len(got) == 4
    state = requests.get(f"{fleet.hosts[1]}{J}/stats", headers=fleet.headers("worker"), timeout=30).json()["types"]
    assert state["video"]["max_processing"] == 4 and state["video"]["processing"] == 4


# -- pause ---------------------------------------------------------------------------------------------

def test_pause_50_pollers_claim_nothing_for_5_s_then_resume_drains_it(fleet):
    [running] = fleet.create("video", 1)
    with requests.Session() as s:
        s.headers.update(fleet.headers("worker"))
        [claim] = s.get(f"{fleet.hosts[0]}{J}/poll", params={"worker_id": "early", "content_types": "video"},
                        timeout=30).json()["jobs"]
    assert claim["job_id"] == running
    assert fleet.admin("/types/video/pause", host=1)["paused"] is True
    ids = fleet.create("video", 40)
    with Pollers(fleet, 50, "video", wait=0.5) as pollers:
        time.sleep(5)
        during = pollers.claimed()
        polls_during = pollers.polls
        done = requests.put(f"{fleet.hosts[1]}{J}/{running}/result", headers=fleet.headers("worker"), timeout=30,
                            json={"success": True, "content": "finished while paused", "lease_id": claim["lease_id"]})
        assert done.status_code == 200 and done.json()["status"] == "completed"
        assert fleet.admin("/types/video/resume", host=0)["paused"] is False
        wait_for(lambda: len(pollers.claimed()) >= len(ids), 120, "the pollers to drain the resumed type")
    assert during == [] and polls_during >= 50  # hammered, and nothing taken
    assert pollers.errors == []
    assert sorted(pollers.claimed()) == sorted(ids)
    assert fleet.status(running)["result_data"]["content"] == "finished while paused"


# -- hold ----------------------------------------------------------------------------------------------

def test_hold_killed_worker_after_its_lease_is_held_never_claimed_and_retry_sends_it_to_one_worker(
        fleet, tmp_path):
    [job_id] = fleet.create("audio", 1, on_lapse="hold")
    folder = tmp_path / "killed"
    folder.mkdir()
    exec_ = handler_script(folder, "time.sleep(120)\n")
    doomed = WorkerProcess(fleet.hosts[0], fleet.keys["worker"], folder, "--exec", exec_, "--worker-id", "doomed")
    doomed.start()
    try:
        doomed.wait_event("handler.started", job_id=job_id)
        with Pollers(fleet, 2, "audio", wait=1) as pollers:
            doomed.proc.kill()
            doomed.wait(30)
            for started in doomed.named("handler.started"):  # its orphaned handler, as a crash may leave
                try:
                    os.killpg(started["pid"], signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            # the lease (2 s) lapses; a poll hands it on: held, not to the pollers running throughout
            wait_for(lambda: fleet.status(job_id, host=1)["status"] == "held", 60, "the job to be held")
            held = fleet.status(job_id)
            assert held["worker_id"] == "doomed" and "on_lapse is hold" in held["error_message"]
            time.sleep(3)  # polls keep coming; none takes it
            assert job_id not in pollers.claimed()
            assert fleet.status(job_id)["status"] == "held"
            r = requests.post(f"{fleet.hosts[1]}{J}/{job_id}/retry", headers=fleet.headers("producer"), timeout=30)
            assert r.status_code == 200 and r.json()["status"] == "pending"
            wait_for(lambda: fleet.status(job_id)["status"] == "completed", 60, "the retried job to complete")
            time.sleep(1)
        assert pollers.errors == []
        assert pollers.claimed().count(job_id) == 1
        final = fleet.status(job_id)
        assert final["attempt"] == 2 and final["result_data"]["content"].startswith("poller-")
    finally:
        doomed.stop()
