"""A process frozen while it holds the store lock (SIGSTOP, a debugger, a swap storm) does not
freeze the service: every request that needs the lock answers 503 problem+json with Retry-After
within STORE_LOCK_TIMEOUT_SECONDS, the log names the holder's pid, /health says 503; once the
holder dies (the kernel drops its flock) everything succeeds again, and nothing was lost."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from morag_remote.exceptions import StoreBusy
from morag_remote.fileio import FileLock, LockTimeout
from morag_remote.store.files.jobs import FileJobStore

from support.gunicorn import Gunicorn, make_keys, wait_for

API = "/api/v1/remote-jobs"
BOUND = 1.0
SLACK = 1.5  # scheduling on a shared 2-core machine

HOLDER = """
import fcntl, os, signal, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_SH if sys.argv[2] == "shared" else fcntl.LOCK_EX)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)
"""


def frozen_holder(lock_path: Path, kind: str = "exclusive") -> subprocess.Popen:
    """A process that takes the lock and stops itself (SIGSTOP) while holding it."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_path), kind], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    wait_for(lambda: _state(proc.pid) == "T", 10, "the holder to stop")
    return proc


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)


# -- the lock alone ---------------------------------------------------------------------------

def test_a_bounded_hold_gives_up_and_names_the_holder(tmp_path):
    holder = frozen_holder(tmp_path / ".lock")
    try:
        lock = FileLock(tmp_path / ".lock", timeout=0.3)
        started = time.monotonic()
        with pytest.raises(LockTimeout) as caught:
            with lock.hold(exclusive=False):
                pass  # pragma: no cover - never entered
        assert 0.3 <= time.monotonic() - started < 0.3 + SLACK
        assert caught.value.holders == [holder.pid]
        assert str(holder.pid) in str(caught.value)
    finally:
        kill(holder)
    with lock.hold():  # the kernel let go of the dead holder's lock
        pass


def test_a_waiter_costs_no_core(tmp_path):
    holder = frozen_holder(tmp_path / ".lock")
    try:
        lock = FileLock(tmp_path / ".lock", timeout=1.0)
        cpu = time.thread_time()
        with pytest.raises(LockTimeout):
            with lock.hold():
                pass  # pragma: no cover
        assert time.thread_time() - cpu < 0.1  # sleeps between tries, never spins
    finally:
        kill(holder)


def test_threads_of_one_process_each_give_up_within_the_bound(tmp_path):
    """They do not queue behind one another's waits (the process's mutex is bounded too)."""
    holder = frozen_holder(tmp_path / ".lock")
    store = FileJobStore(tmp_path / "data", lock_timeout=0.5)
    holder_for_store = frozen_holder(tmp_path / "data" / ".lock")
    waited: list[float] = []
    errors: list[BaseException] = []

    def attempt() -> None:
        started = time.monotonic()
        try:
            store.stats()
        except StoreBusy as exc:
            errors.append(exc)
        waited.append(time.monotonic() - started)

    try:
        threads = [threading.Thread(target=attempt) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(errors) == 8
        assert max(waited) < 0.5 + SLACK
    finally:
        kill(holder)
        kill(holder_for_store)
    assert sum(store.stats().counts.values()) == 0


def test_old_copies_left_behind_when_the_lock_is_taken_again_do_not_fail_the_change(tmp_path):
    """A claim is committed (renamed, fsynced) before its old copy is dropped under a second turn
    of the lock; if that turn times out, the claim still stands and is answered."""
    from support.jobs import file_service, source_file

    service = file_service(str(tmp_path / "data"), str(tmp_path / "src"), lock_timeout=0.3)
    job = service.create(source_file_path=source_file(service), content_type="audio", ingestion_task_id="t")
    store = service.store
    real = store._stale_copies().remove
    holders = []

    def remove_while_frozen(copies):
        holders.append(frozen_holder(tmp_path / "data" / ".lock"))
        try:
            real(copies)
        finally:
            kill(holders[0])

    store._stale_copies().remove = remove_while_frozen
    assert [j.id for j in service.poll("w1", ["audio"])] == [job.id]
    assert service.get(job.id).status == "processing"
    assert {p.parent.name for p in (tmp_path / "data").glob(f"*/{job.id}.json")} == {"pending", "processing"}


# -- a real gunicorn --------------------------------------------------------------------------

class Http:
    def __init__(self, server: Gunicorn, keys: dict[str, str], sources: Path) -> None:
        self.server, self.keys, self.sources = server, keys, sources

    def request(self, method: str, path: str, role: str | None = "admin", **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {self.keys[role]}"} if role else {}
        return requests.request(method, self.server.url(path), headers=headers, timeout=30, **kwargs)

    def create_body(self) -> dict:
        source = self.sources / "clip.bin"
        source.write_bytes(b"payload")
        return {"source_file_path": str(source), "content_type": "audio", "ingestion_task_id": "t"}

    def attempts(self, claimed: dict) -> list[tuple[str, str, str | None, dict]]:
        """A request of each kind that needs the store lock."""
        result = {"success": True, "content": "text", "processing_time": 0.5}
        return [
            ("POST", f"{API}/", "producer", {"json": self.create_body()}),
            ("GET", f"{API}/poll", "worker", {"params": {"worker_id": "w2", "content_types": "audio"}}),
            ("PUT", f"{API}/{claimed['job_id']}/result", "worker", {"json": result}),
            ("GET", f"{API}/", "producer", {"params": {"status": "pending"}}),
            ("GET", f"{API}/stats", "producer", {}),
            ("GET", "/health", None, {}),
        ]


@pytest.fixture
def served(tmp_path):
    instance = tmp_path / "instance"
    (instance / "sources").mkdir(parents=True)
    keys = make_keys(instance)
    server = Gunicorn(instance, workers=2, env={"MORAG_REMOTE_STORE_LOCK_TIMEOUT_SECONDS": str(BOUND)}).start()
    try:
        yield Http(server, keys, instance / "sources")
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["exclusive", "shared"])
def test_a_frozen_lock_holder_makes_requests_answer_503_within_the_bound(served, kind):
    """Shared: a worker stopped while it builds its catalog at boot held the lock shared, which
    stops every writer but no reader; /health must still say so."""
    http = served
    created = [http.request("POST", f"{API}/", "producer", json=http.create_body()).json()["job_id"] for _ in range(3)]
    (claimed,) = http.request("GET", f"{API}/poll", "worker", params={"worker_id": "w1", "content_types": "audio"}).json()["jobs"]

    holder = frozen_holder(http.server.instance / "remote_jobs" / ".lock", kind)
    try:
        busy = []
        for _ in range(2):  # new connections: both worker processes answer some
            for method, path, role, kwargs in http.attempts(claimed):
                started = time.monotonic()
                response = http.request(method, path, role, **kwargs)
                elapsed = time.monotonic() - started
                if kind == "shared" and method == "GET" and path not in ("/health", f"{API}/poll"):
                    assert response.status_code == 200, (path, response.text)  # readers go on
                    continue
                assert response.status_code == 503, (method, path, response.status_code, response.text)
                assert response.headers["Content-Type"] == "application/problem+json"
                assert response.headers["Retry-After"] == "1"
                assert response.json()["title"] == "Store busy"
                assert elapsed < BOUND + SLACK, (path, elapsed)
                busy.append(path)
        assert busy
        logged = [json.loads(line) for line in
                  (http.server.stdout_path.read_text() + http.server.stderr()).splitlines()
                  if '"store.lock_busy"' in line]
        assert logged and all(entry["holder_pids"] == [holder.pid] for entry in logged)
    finally:
        kill(holder)

    # the holder died, the kernel let go of its lock: everything works again, nothing was lost
    assert http.request("GET", "/health", None).status_code == 200
    done = http.request("PUT", f"{API}/{claimed['job_id']}/result", "worker",
                        json={"success": True, "content": "text", "processing_time": 0.5})
    assert done.status_code == 200, done.text
    later = http.request("POST", f"{API}/", "producer", json=http.create_body())
    assert later.status_code == 201
    pending = http.request("GET", f"{API}/", "producer", params={"status": "pending"}).json()["jobs"]
    assert sorted(j["job_id"] if "job_id" in j else j["id"] for j in pending) == sorted(
        [j for j in created if j != claimed["job_id"]] + [later.json()["job_id"]])
    stats = http.request("GET", f"{API}/stats", "producer").json()
    assert stats
    polled = http.request("GET", f"{API}/poll", "worker", params={"worker_id": "w3", "content_types": "audio"})
    assert polled.status_code == 200 and len(polled.json()["jobs"]) == 1
