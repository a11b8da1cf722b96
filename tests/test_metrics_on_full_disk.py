"""A full disk never kills a worker through its metrics files.

prometheus_client memory-maps its multiprocess files and grows them sparse: on a full file system
the first store into a page without a block is SIGBUS, the death of the gunicorn worker. The files
live in shared memory by default, off the store's disk, and their pages get their blocks before they
are mapped, so a full file system only leaves a change uncounted (``metrics.not_recorded``).

The full disk is a real one: a small tmpfs mounted for the test (root only; skipped otherwise),
written to its last byte."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from support import small_fs
from support.gunicorn import Gunicorn, make_keys
from support.metrics_text import parse_samples, values_of
from morag_remote import metrics_location
from morag_remote.metrics import NOT_RECORDED_LOG_INTERVAL, JobMetrics
from morag_remote.models import Action

REPO = Path(__file__).resolve().parent.parent
API = "/api/v1/remote-jobs"


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at ``tmp_path/disk`` (support.small_fs), unmounted at the end."""
    with small_fs.mounted(tmp_path / "disk", size="2m") as disk:
        yield disk


def fill(disk: Path) -> None:
    """Write until the file system has not one block left."""
    fd = os.open(disk / f"filler-{time.monotonic_ns()}", os.O_WRONLY | os.O_CREAT, 0o600)
    size = 1 << 20
    try:
        while True:
            try:
                os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if size == 1:
                    break
                size //= 2
    finally:
        os.close(fd)
    assert os.statvfs(disk).f_bavail == 0


# -- the files, in a process of their own (a SIGBUS must fail the test, not kill pytest) --------------

_FILES = """
import errno, os, sys
from prometheus_client.mmap_dict import MmapedDict
from morag_remote.metrics import PreallocatedMmapedDict

disk, which = sys.argv[1], sys.argv[2]
Dict = MmapedDict if which == "original" else PreallocatedMmapedDict
early = Dict(os.path.join(disk, "counter_1.db"))   # opened while there is room
early.write_value("k-0", 1.0, 0.0)

def fill():
    fd = os.open(os.path.join(disk, "filler"), os.O_WRONLY | os.O_CREAT)
    size = 1 << 20
    while True:
        try:
            os.write(fd, b"\\0" * size)
        except OSError:
            if size == 1:
                break
            size //= 2
    os.close(fd)
    assert os.statvfs(disk).f_bavail == 0

fill()
print("full", flush=True)
try:
    Dict(os.path.join(disk, "counter_2.db"))        # a new process's file on the full disk
    print("opened", flush=True)
except OSError as exc:
    assert exc.errno == errno.ENOSPC
    assert not os.path.exists(os.path.join(disk, "counter_2.db"))  # no empty file left for the scrape
    print("refused-new-file", flush=True)

written = 1
try:
    for n in range(1, 2000):                          # ~100 bytes a key: past the first 64 KiB
        early.write_value(f"k-{n}-" + "x" * 64, float(n), 0.0)
        written += 1
    print("grew", flush=True)
except OSError as exc:
    assert exc.errno == errno.ENOSPC
    print("refused-growth", written, flush=True)
early.write_value("k-0", 42.0, 0.0)                     # what is mapped keeps working
values = {k: v for k, v, *_ in MmapedDict.read_all_values_from_file(os.path.join(disk, "counter_1.db"))}
assert values["k-0"] == 42.0 and len(values) == written, (len(values), written)
os.unlink(os.path.join(disk, "filler"))                 # room again: the file grows
for n in range(written, 2000):
    early.write_value(f"k-{n}-" + "x" * 64, float(n), 0.0)
values = {k: v for k, v, *_ in MmapedDict.read_all_values_from_file(os.path.join(disk, "counter_1.db"))}
assert len(values) == 2000
print("recovered", flush=True)
"""


def _files(disk: Path, which: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FILES, str(disk), which], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_the_original_files_die_of_sigbus_on_a_full_disk(small_disk):
    """What the fix is for: prometheus_client's own files, as it grows them, kill the process."""
    done = _files(small_disk, "original")
    assert done.returncode == -signal.SIGBUS, (done.returncode, done.stdout, done.stderr)
    assert done.stdout.splitlines()[0] == "full"


def test_preallocated_files_refuse_room_on_a_full_disk_and_keep_what_they_have(small_disk):
    done = _files(small_disk, "preallocated")
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    lines = done.stdout.splitlines()
    assert lines[:2] == ["full", "refused-new-file"]
    assert lines[2].startswith("refused-growth ") and lines[3] == "recovered"


def test_preallocated_files_have_every_page_allocated(tmp_path):
    from prometheus_client.mmap_dict import MmapedDict

    from morag_remote.metrics import PreallocatedMmapedDict

    path = tmp_path / "counter_1.db"
    values = PreallocatedMmapedDict(str(path))
    for n in range(1000):  # past the first 64 KiB: the file doubles
        values.write_value(f"key-{n}-" + "y" * 80, float(n), 0.0)
    info = path.stat()
    assert info.st_size >= 2 * (1 << 16)
    assert info.st_blocks * 512 >= info.st_size  # no hole
    read = {k: v for k, v, *_ in MmapedDict.read_all_values_from_file(str(path))}
    assert len(read) == 1000 and read["key-999-" + "y" * 80] == 999.0
    values.close()
    reopened = PreallocatedMmapedDict(str(path))  # a file of the right size is kept as it is
    assert reopened.read_value("key-3-" + "y" * 80) == (3.0, 0.0)
    reopened.close()


def test_a_change_that_cannot_be_counted_is_logged_once_a_minute_and_never_raised(monkeypatch):
    import structlog.testing

    class NoRoom:
        def __getattr__(self, name):
            raise OSError(errno.ENOSPC, "No space left on device")

    metrics = JobMetrics(NoRoom())
    job = type("Job", (), {"content_type": "audio", "started_at": None, "completed_at": None})()
    clock = [1000.0]
    monkeypatch.setattr("morag_remote.metrics.time.monotonic", lambda: clock[0])
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            metrics.job_changed(Action.CLAIM, job)
        clock[0] += NOT_RECORDED_LOG_INTERVAL
        metrics.job_changed(Action.COMPLETE, job)
    assert [(e["event"], e["log_level"], e["action"]) for e in logs] == [
        ("metrics.not_recorded", "warning", "claim"), ("metrics.not_recorded", "warning", "complete")]
    assert "No space left" in logs[0]["error"]


# -- a real gunicorn on a full disk ---------------------------------------------------------------

def _logs_off_the_disk(server: Gunicorn, disk: Path) -> Gunicorn:
    """gunicorn's output next to the small disk, not on it: a full disk would swallow the log."""
    server.stdout_path, server.stderr_path = disk.parent / "gunicorn.stdout", disk.parent / "gunicorn.stderr"
    return server


def _deaths(server: Gunicorn) -> list[str]:
    return [line for line in server.stderr().splitlines() if "was sent" in line or "exited with code" in line]


def _call(server: Gunicorn, key: str, method: str, path: str, **kwargs) -> requests.Response:
    return requests.request(method, server.url(path), headers={"Authorization": f"Bearer {key}"}, timeout=30,
                            **kwargs)


@pytest.mark.slow
def test_a_worker_on_a_full_instance_disk_serves_and_scrapes_without_dying(small_disk):
    """The file store and the default metrics folder: the store cannot write (any answer will do
    here), the counters are elsewhere, and no worker dies."""
    instance = small_disk / "instance"
    (instance / "sources").mkdir(parents=True)
    keys = make_keys(instance)
    source = instance / "sources" / "talk.mp3"
    source.write_bytes(b"audio")
    server = _logs_off_the_disk(Gunicorn(instance, workers=2), small_disk).start()
    try:
        prom = Path(metrics_location.default_dir(str(instance)))
        assert small_disk not in prom.parents and prom.is_dir()
        body = {"source_file_path": str(source), "content_type": "audio", "ingestion_task_id": "t"}
        pending = [_call(server, keys["producer"], "POST", f"{API}/", json=body).json()["job_id"]
                   for _ in range(2)]
        claimed = _call(server, keys["worker"], "GET", f"{API}/poll",
                        params={"worker_id": "w1", "content_types": "audio"}).json()["jobs"]
        assert [j["job_id"] for j in claimed] == pending[:1]
        pids = sorted(server.booted_pids())
        fill(small_disk)
        statuses = set()
        for n in range(10):  # new connections: both workers get some
            statuses.add(_call(server, keys["producer"], "POST", f"{API}/", json=body).status_code)
            statuses.add(_call(server, keys["worker"], "GET", f"{API}/poll",
                               params={"worker_id": f"w{n}", "content_types": "audio"}).status_code)
            statuses.add(_call(server, keys["worker"], "PUT", f"{API}/{pending[0]}/result",
                               json={"success": True, "content": "text"}).status_code)
            scrape = _call(server, keys["worker"], "GET", "/metrics")
            assert scrape.status_code == 200, scrape.text
        assert statuses  # whatever the store answered
        time.sleep(0.5)  # a worker killed by the last request would be reported by now
        assert _deaths(server) == [] and sorted(server.booted_pids()) == pids
        assert server.proc.poll() is None
    finally:
        server.stop()


def _pg_keys(url: str) -> dict[str, str]:
    from morag_remote.store.postgres.db import database
    from morag_remote.store.postgres.keys import PostgresKeyStore

    store = PostgresKeyStore(database(url))
    return {role: store.create(f"{role}-key", role)[1] for role in ("worker", "producer")}


def _claims(server: Gunicorn, keys: dict[str, str]) -> dict:
    samples = parse_samples(_call(server, keys["worker"], "GET", "/metrics").text)
    return {labels[0][1]: n for labels, n in values_of(samples, "morag_remote_job_claims_total").items()}


@pytest.mark.slow
@pytest.mark.postgres
def test_metrics_files_on_the_full_disk_itself_leave_changes_uncounted_not_workers_dead(small_disk, pg_url):
    """The worst case: ``PROMETHEUS_MULTIPROC_DIR`` on the full disk (an operator's choice, or the
    fallback), and a store that still commits (PostgreSQL), so claims and results are counted on the
    full disk: into files that had room before it filled, and into files made after it did."""
    instance = small_disk / "instance"
    (instance / "sources").mkdir(parents=True)
    keys = _pg_keys(pg_url)
    sources = {ct: instance / "sources" / f"{ct}.bin" for ct in ("audio", "video")}
    for path in sources.values():
        path.write_bytes(b"payload")

    def gunicorn() -> Gunicorn:
        server = _logs_off_the_disk(Gunicorn(instance, workers=1, env={"MORAG_REMOTE_DATABASE_URL": pg_url}),
                                    small_disk)
        server.env["PROMETHEUS_MULTIPROC_DIR"] = str(instance / "prometheus")
        return server.start()

    def cycle(server: Gunicorn, ct: str) -> int:
        body = {"source_file_path": str(sources[ct]), "content_type": ct, "ingestion_task_id": "t"}
        job_id = _call(server, keys["producer"], "POST", f"{API}/", json=body).json()["job_id"]
        polled = _call(server, keys["worker"], "GET", f"{API}/poll", params={"worker_id": "w", "content_types": ct})
        assert [j["job_id"] for j in polled.json()["jobs"]] == [job_id]
        done = _call(server, keys["worker"], "PUT", f"{API}/{job_id}/result",
                     json={"success": True, "content": "text", "processing_time": 1.0})
        assert done.status_code == 200, done.text
        return job_id

    # 1. the files made while there is room, then the disk fills: counted all the same
    server = gunicorn()
    try:
        [pid] = server.booted_pids()
        cycle(server, "audio")
        fill(small_disk)
        for ct in ("audio", "video", "audio", "video"):  # video: keys the files did not have yet
            cycle(server, ct)
        assert _claims(server, keys) == {"audio": 3, "video": 2}
        assert _deaths(server) == [] and server.booted_pids() == [pid]
    finally:
        server.stop()

    # 2. a new worker on the full disk (the restart of the issue): its files cannot be made
    for leftover in (instance / "prometheus").glob("*.db"):
        leftover.unlink()
    server = gunicorn()
    try:
        fill(small_disk)
        [pid] = server.booted_pids()
        for ct in ("audio", "video", "audio"):
            cycle(server, ct)  # claims and results answered
        assert _call(server, keys["worker"], "GET", "/metrics").status_code == 200
        time.sleep(0.5)
        assert _deaths(server) == [] and server.booted_pids() == [pid]
        warnings = [json.loads(line) for line in server.stderr().splitlines() if "metrics.not_recorded" in line]
        assert len(warnings) == 1 and "No space left" in warnings[0]["error"]  # once a minute, not per change
    finally:
        server.stop()
