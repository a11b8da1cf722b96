"""Files through a real gunicorn: tuspy uploads a 50 MiB file through a proxy that cuts the
connection twice, a job made from it is polled and downloaded (resumed after a cut) with its digest
checked; kill -9 of the process writing a chunk or an artifact, many times, loses no acknowledged
chunk and shows no partial artifact; two PostgreSQL hosts sharing one BLOB_DIR finish each other's
uploads."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time


import pytest
import requests
from tusclient import client as tus_client
from tusclient.uploader import Uploader

from morag_remote.client import Client, RetryPolicy
from support import postgres as pg_testing
from support.cutting_proxy import CuttingProxy
from support.gunicorn import ROOT, wait_for
from support.workers import served

pytestmark = pytest.mark.slow

J = "/api/v1/remote-jobs"
MIB = 1024 * 1024
KILL_ROUNDS = int(os.environ.get("MORAG_REMOTE_KILL_ROUNDS", "50"))


class Sha256Uploader(Uploader):
    """tuspy as it is, sending tus checksums in sha256 (its default is sha1, which the server takes too)."""

    CHECKSUM_ALGORITHM_PAIR = ("sha256", hashlib.sha256)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_tuspy_uploads_50_mib_through_two_cuts_and_the_job_downloads_with_its_digest(tmp_path):
    data = os.urandom(50 * MIB)
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "talk.wav").write_bytes(data)
    with served(tmp_path) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        # the first two PATCHes are cut after 10 MiB of the request; tuspy asks the offset (HEAD) and resumes
        with CuttingProxy(port, cut_after=10 * MIB, cuts=2, upstream=True) as proxy:
            tus = tus_client.TusClient(f"http://127.0.0.1:{proxy.port}{J}/uploads/", headers=auth(srv.keys["producer"]))
            uploader = tus.uploader(str(tmp_path / "talk.wav"), chunk_size=25 * MIB, retries=5, retry_delay=0,
                                    metadata={"filename": "talk.wav", "sha256": digest})
            uploader.upload()
            assert proxy.cuts_left == 0
        state = requests.get(uploader.url.replace(f":{proxy.port}", f":{port}"),
                             headers=auth(srv.keys["producer"]), timeout=10).json()
        assert state["complete"] and state["sha256"] == digest and state["offset"] == len(data)
        stored = srv.server.instance / "blobs" / "sources" / digest[:2] / digest
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
        log = srv.server.stderr()
        # a cut chunk's bytes that came are kept (no checksum); a PATCH tuspy sends while the server
        # still handles the cut one is refused (409) and retried from the offset HEAD reports
        assert log.count('"upload.cut"') >= 1

        created = requests.post(f"{srv.url}{J}/", headers=auth(srv.keys["producer"]), timeout=10, json={
            "source_upload_id": uploader.url, "content_type": "audio", "ingestion_task_id": "tus-1"})
        assert created.status_code == 201, created.text
        worker = srv.client("worker")
        (job,) = worker.poll("w1", ["audio"])
        assert (job.source_size, job.source_sha256) == (len(data), digest)
        with CuttingProxy(port, cut_after=20 * MIB, cuts=1) as cut:
            via = Client(f"http://127.0.0.1:{cut.port}", srv.keys["worker"], retry=RetryPolicy(attempts=5, base=0.05, cap=0.2))
            got = via.download(job, str(tmp_path / "in"))
        assert got.digest_checked and got.sha256 == digest and got.resumed == 1
        assert got.filename == "talk.wav"


def test_tuspy_with_checksums_in_sha1_and_sha256(tmp_path):
    data = os.urandom(3 * MIB + 5)
    (tmp_path / "a.bin").write_bytes(data)
    with served(tmp_path) as srv:
        for cls in (Uploader, Sha256Uploader):
            tus = tus_client.TusClient(f"{srv.url}{J}/uploads/", headers=auth(srv.keys["producer"]))
            uploader = cls(str(tmp_path / "a.bin"), client=tus, chunk_size=MIB, upload_checksum=True)
            uploader.upload()
            assert uploader.offset == len(data)
            state = requests.get(uploader.url, headers=auth(srv.keys["producer"]), timeout=10).json()
            assert state["sha256"] == hashlib.sha256(data).hexdigest()


# -- kill -9 mid-write ----------------------------------------------------------------------------

def _send_partial(port: int, head: str, body: bytes, part: int) -> socket.socket:
    """A request whose body stops after ``part`` bytes (the rest never comes): the server is mid-write."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head.encode() + body[:part])
    return sock


def _worker_pid(server) -> int:
    return server.booted_pids()[-1]


def _kill_worker(server) -> None:
    """kill -9 of the process that is writing; gunicorn's master starts a new one."""
    pid = _worker_pid(server)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(server.booted_pids()) > 0 and _worker_pid(server) != pid, 30, "a new worker")
    wait_for(lambda: _healthy(server.base_url), 30, "the new worker to answer")


def _healthy(base: str) -> bool:
    try:
        return requests.get(base + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def test_kill_9_during_chunks_and_artifacts_loses_no_acknowledged_byte_and_shows_no_partial(tmp_path):
    """KILL_ROUNDS (50) kills during a chunk append and as many during an artifact upload: about 47 s
    on a 2-core machine (MORAG_REMOTE_KILL_ROUNDS=10 for a quicker run)."""
    rnd = random.Random(17)
    chunk = 256 * 1024
    data = os.urandom(chunk * KILL_ROUNDS * 2)
    started = time.monotonic()
    with served(tmp_path, workers=1) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        producer, worker = auth(srv.keys["producer"]), auth(srv.keys["worker"])
        tus = {"Tus-Resumable": "1.0.0"}
        r = requests.post(f"{srv.url}{J}/uploads/", headers={**producer, **tus, "Upload-Length": str(len(data))},
                          timeout=10)
        location = srv.url + r.headers["Location"]
        path = r.headers["Location"]
        acked = kills = 0
        for _ in range(KILL_ROUNDS):
            # a chunk cut by a kill -9 midway: the offset stays at the last acknowledged one
            body = data[acked:acked + chunk]
            head = (f"PATCH {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {producer['Authorization']}\r\n"
                    f"Tus-Resumable: 1.0.0\r\nUpload-Offset: {acked}\r\nContent-Type: application/offset+octet-stream\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n")
            part = rnd.randrange(1, len(body))
            sock = _send_partial(port, head, body, part)
            time.sleep(rnd.uniform(0, 0.02))
            _kill_worker(srv.server)
            sock.close()
            end = acked + chunk
            for _ in range(50):
                offset = int(requests.head(location, headers={**producer, **tus}, timeout=10).headers["Upload-Offset"])
                # every acknowledged byte is there; a connection the new process took from the backlog
                # and saw end early kept what came (tus), never more
                assert acked <= offset <= acked + part
                body = data[offset:end]
                ok = requests.patch(location, data=body, timeout=10, headers={
                    **producer, **tus, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
                if ok.status_code != 409:
                    break
                # that connection is still appending (Upload busy), or appended since the HEAD
                # (offset mismatch): a tus client asks for the offset again
                time.sleep(0.1)
            assert ok.status_code == 204, ok.text
            kills += offset == acked
            acked = offset + len(body)
            assert int(ok.headers["Upload-Offset"]) == acked
        assert kills >= KILL_ROUNDS // 2  # most kills hit a process mid-chunk
        rest = data[acked:]
        ok = requests.patch(location, data=rest, timeout=30, headers={
            **producer, **tus, "Upload-Offset": str(acked), "Content-Type": "application/offset+octet-stream"})
        assert ok.status_code == 204
        assert requests.get(location, headers=producer, timeout=10).json()["sha256"] == hashlib.sha256(data).hexdigest()

        # artifacts: kill -9 mid-upload, then a complete upload of another name; only those are shown
        job_id = requests.post(f"{srv.url}{J}/", headers=producer, timeout=10, json={
            "source_upload_id": location, "content_type": "audio", "ingestion_task_id": "kill"}).json()["job_id"]
        claimed = requests.get(f"{srv.url}{J}/poll", headers=worker, timeout=10,
                               params={"worker_id": "w1", "content_types": "audio"}).json()["jobs"][0]
        lease = claimed["lease_id"]
        blob = os.urandom(chunk)
        for n in range(KILL_ROUNDS):
            head = (f"PUT {J}/{job_id}/artifacts/killed-{n}.bin HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: {worker['Authorization']}\r\nX-Lease-Id: {lease}\r\n"
                    f"Content-Type: application/octet-stream\r\nContent-Length: {len(blob)}\r\n\r\n")
            sock = _send_partial(port, head, blob, rnd.randrange(1, len(blob)))
            time.sleep(rnd.uniform(0, 0.02))
            _kill_worker(srv.server)
            sock.close()
        kept = requests.put(f"{srv.url}{J}/{job_id}/artifacts/kept.bin", data=blob, timeout=10,
                            headers={**worker, "X-Lease-Id": lease})
        assert kept.status_code == 201
        fsck = _flask(srv.server, "remote-jobs", "fsck", "--repair", "--json")
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        assert requests.put(f"{srv.url}{J}/{job_id}/result", headers=worker, timeout=10,
                            json={"success": True, "content": "x", "lease_id": lease}).status_code == 200
        listed = requests.get(f"{srv.url}{J}/{job_id}", headers=producer, timeout=10).json()["artifacts"]
        assert [a["name"] for a in listed] == ["kept.bin"]
        assert requests.get(srv.url + listed[0]["url"], headers=producer, timeout=10).content == blob
        # nothing half-written: no temp file in the blob store, none in the job store (the key file's
        # last-used writes, killed too, leave theirs in the instance folder: not this test's subject)
        leftovers = [p for p in srv.server.instance.rglob(".tmp-*") if not p.name.startswith(".tmp-api_keys.json")]
        assert leftovers == []
        clean = _flask(srv.server, "remote-jobs", "fsck", "--json")
        assert clean.returncode == 0 and json.loads(clean.stdout) == []
    assert time.monotonic() - started < 120


def _flask(server, *args: str) -> subprocess.CompletedProcess:
    env = {**server.env}
    return subprocess.run([sys.executable, "-m", "flask", "--app", "morag_remote", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


# -- two PostgreSQL hosts, one BLOB_DIR -----------------------------------------------------------

@pytest.mark.postgres
def test_an_upload_begun_on_host_a_is_finished_on_host_b(pg_url, tmp_path):
    from morag_remote.store.postgres.db import database
    from morag_remote.store.postgres.keys import PostgresKeyStore

    keys = PostgresKeyStore(database(pg_url))
    producer, worker = keys.create("producer", "producer")[1], keys.create("worker", "worker")[1]
    sources = tmp_path / "sources"
    sources.mkdir()
    shared = {"MORAG_REMOTE_BLOB_DIR": str(tmp_path / "shared-blobs")}
    secret = secrets.token_hex(32)
    hosts = [pg_testing.Host(name, pg_url, str(tmp_path / name), str(sources), secret, env=shared) for name in "ab"]
    try:
        for host in hosts:
            host.wait_ready()
        a, b = (host.base for host in hosts)
        data = os.urandom(3 * MIB)
        tus = {**auth(producer), "Tus-Resumable": "1.0.0"}
        r = requests.post(f"{a}{J}/uploads/", headers={**tus, "Upload-Length": str(len(data)),
                                                        "Upload-Metadata": "filename " + base64.b64encode(b"x.mp3").decode()},
                          timeout=10)
        path = r.headers["Location"]
        octets = {"Content-Type": "application/offset+octet-stream"}
        assert requests.patch(a + path, data=data[:MIB], timeout=10,
                              headers={**tus, **octets, "Upload-Offset": "0"}).status_code == 204
        assert requests.head(b + path, headers=tus, timeout=10).headers["Upload-Offset"] == str(MIB)
        assert requests.patch(b + path, data=data[MIB:], timeout=10,
                              headers={**tus, **octets, "Upload-Offset": str(MIB)}).status_code == 204
        created = requests.post(f"{a}{J}/", headers=auth(producer), timeout=10,
                                json={"source_upload_id": path, "content_type": "audio", "ingestion_task_id": "ab"})
        assert created.status_code == 201, created.text
        (job,) = Client(b, worker).poll("w1", ["audio"])
        got = Client(b, worker).download(job, str(tmp_path / "got"))
        assert got.digest_checked and open(got.path, "rb").read() == data
    finally:
        for host in hosts:
            host.stop()
