"""Files in and out, through the app on both backends: tus uploads (creation, core, checksum,
expiration, termination), a job created from an upload, checksums on the poll and the download
(Repr-Digest, ETag, If-Range, 409 for a changed source), and result artifacts (staged per attempt,
part of the successful result, never shown for a lost lease), with every bad input's problem+json."""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import pytest

from morag_remote.context import BLOBS, UPLOADS
from support.actions import auth

U = "/api/v1/remote-jobs/uploads"
J = "/api/v1/remote-jobs"
OCTETS = "application/offset+octet-stream"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def tus(key: str, **headers: str) -> dict[str, str]:
    return {**auth(key), "Tus-Resumable": "1.0.0", **headers}


def create_upload(client, key: str, data: bytes, name: str = "talk.mp3", declare: bool = True) -> str:
    meta = f"filename {b64(name)}" + (f",sha256 {b64(hashlib.sha256(data).hexdigest())}" if declare else "")
    r = client.post(U + "/", headers=tus(key, **{"Upload-Length": str(len(data)), "Upload-Metadata": meta}))
    assert r.status_code == 201, r.get_data(as_text=True)
    assert r.headers["Tus-Resumable"] == "1.0.0" and "Upload-Expires" in r.headers
    return r.headers["Location"]


def patch(client, key: str, location: str, offset: int, chunk: bytes, checksum: str | None = None):
    headers = tus(key, **{"Upload-Offset": str(offset), "Content-Type": OCTETS})
    if checksum is not None:
        headers["Upload-Checksum"] = checksum
    return client.patch(location, data=chunk, headers=headers)


def upload(client, key: str, data: bytes, chunk: int = 1000, **kw) -> str:
    location = create_upload(client, key, data, **kw)
    for start in range(0, len(data), chunk):
        piece = data[start:start + chunk]
        digest = base64.b64encode(hashlib.sha256(piece).digest()).decode()
        r = patch(client, key, location, start, piece, f"sha256 {digest}")
        assert r.status_code == 204, r.get_data(as_text=True)
        assert r.headers["Upload-Offset"] == str(start + len(piece))
    return location


def test_options_advertises_the_extensions_without_a_key(client):
    r = client.options(U + "/")
    assert r.status_code == 204
    assert r.headers["Tus-Version"] == "1.0.0"
    assert set(r.headers["Tus-Extension"].split(",")) == {"creation", "checksum", "expiration", "termination"}
    assert "sha256" in r.headers["Tus-Checksum-Algorithm"].split(",")


def test_an_upload_becomes_a_job_whose_download_carries_its_digest(client, keys, app):
    data = os.urandom(5000)
    location = upload(client, keys["producer"], data)
    head = client.head(location, headers=tus(keys["producer"]))
    assert head.status_code == 200 and head.headers["Upload-Offset"] == "5000"
    assert head.headers["Cache-Control"] == "no-store"
    state = client.get(location, headers=auth(keys["producer"])).json
    assert state["complete"] and state["sha256"] == hashlib.sha256(data).hexdigest()

    r = client.post(J + "/", json={"source_upload_id": location, "content_type": "audio",
                                   "ingestion_task_id": "up-1"}, headers=auth(keys["producer"]))
    assert r.status_code == 201, r.json
    job_id = r.json["job_id"]
    poll = client.get(f"{J}/poll", query_string={"worker_id": "w1", "content_types": "audio"},
                      headers=auth(keys["worker"])).json
    (claimed,) = poll["jobs"]
    assert claimed["source_size"] == 5000 and claimed["source_sha256"] == hashlib.sha256(data).hexdigest()
    d = client.get(claimed["source_file_url"], headers=auth(keys["worker"]))
    assert d.status_code == 200 and d.data == data
    assert d.headers["Repr-Digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"
    assert d.headers["ETag"].startswith('"')  # a strong validator, for If-Range
    assert "talk.mp3" in d.headers["Content-Disposition"]
    # If-Range with the ETag resumes; with another validator it sends the whole file
    part = client.get(claimed["source_file_url"], headers={**auth(keys["worker"]), "Range": "bytes=4000-",
                                                           "If-Range": d.headers["ETag"]})
    assert part.status_code == 206 and part.data == data[4000:]
    assert part.headers["Repr-Digest"] == d.headers["Repr-Digest"]
    whole = client.get(claimed["source_file_url"], headers={**auth(keys["worker"]), "Range": "bytes=4000-",
                                                            "If-Range": '"something-else"'})
    assert whole.status_code == 200 and whole.data == data
    detail = client.get(f"{J}/{job_id}", headers=auth(keys["producer"])).json
    assert detail["source_sha256"] == hashlib.sha256(data).hexdigest() and detail["artifacts"] == []


def test_the_same_bytes_uploaded_twice_are_stored_once(client, keys, app):
    data = b"same bytes" * 300
    upload(client, keys["producer"], data)
    upload(client, keys["producer"], data)
    sources = app.extensions[BLOBS].sources_dir
    stored = [f for _, _, files in os.walk(sources) for f in files]
    assert stored == [hashlib.sha256(data).hexdigest()]


def test_bad_tus_requests_are_clear_problems_and_store_nothing(client, keys, app):
    key = keys["producer"]
    data = os.urandom(2000)
    location = create_upload(client, key, data)
    assert patch(client, key, location, 0, data[:1000]).status_code == 204
    wrong = patch(client, key, location, 0, data[:1000])
    assert wrong.status_code == 409 and wrong.headers["Upload-Offset"] == "1000"
    assert wrong.mimetype == "application/problem+json"
    past = patch(client, key, location, 1000, data[1000:] + b"extra")
    assert past.status_code == 413
    bad = patch(client, key, location, 1000, data[1000:], "sha256 " + base64.b64encode(b"x" * 32).decode())
    assert bad.status_code == 460 and bad.json["title"] == "Checksum mismatch"
    assert client.head(location, headers=tus(key)).headers["Upload-Offset"] == "1000"
    assert patch(client, key, location, 1000, data[1000:], "crc32 AAAA").status_code == 400
    ctype = client.patch(location, data=b"x", headers=tus(key, **{"Upload-Offset": "1000",
                                                                    "Content-Type": "text/plain"}))
    assert ctype.status_code == 415
    assert client.patch(U + "/nope", data=b"x", headers=tus(key, **{"Upload-Offset": "0",
                                                                     "Content-Type": OCTETS})).status_code == 404
    assert client.post(U + "/", headers=tus(key, **{"Upload-Length": str(app.config["MAX_UPLOAD_BYTES"] + 1)})
                       ).status_code == 413
    assert client.post(U + "/", headers=tus(key, **{"Upload-Length": "-1"})).status_code == 400
    assert client.post(U + "/", headers=tus(key, **{"Upload-Length": "1", "Tus-Resumable": "0.2.2"})
                       ).status_code == 412
    # a job cannot be made from an unfinished upload, nor from an unknown one
    r = client.post(J + "/", json={"source_upload_id": location, "content_type": "audio",
                                   "ingestion_task_id": "x"}, headers=auth(key))
    assert r.status_code == 422 and "not finished" in r.json["detail"]
    r = client.post(J + "/", json={"source_upload_id": "nope", "content_type": "audio",
                                   "ingestion_task_id": "x"}, headers=auth(key))
    assert r.status_code == 422
    # a whole file that is not the declared sha256: the last chunk is dropped
    liar = create_upload(client, key, data)
    assert patch(client, key, liar, 0, data[:1000]).status_code == 204
    r = patch(client, key, liar, 1000, os.urandom(1000))
    assert r.status_code == 460 and "sha256" in r.json["detail"]
    assert client.head(liar, headers=tus(key)).headers["Upload-Offset"] == "1000"


def test_termination_and_expiry(client, keys, app, runner, clock):
    key = keys["producer"]
    location = create_upload(client, key, b"x" * 10)
    assert client.delete(location, headers=tus(key)).status_code == 204
    assert client.head(location, headers=tus(key)).status_code == 404
    stale = create_upload(client, key, b"y" * 10)
    clock.advance(app.config["UPLOAD_EXPIRY_SECONDS"] + 1)
    gone = client.get(stale, headers=auth(key))
    assert gone.status_code == 410 and gone.mimetype == "application/problem+json"
    assert app.extensions[UPLOADS].expire(clock()) == 1
    assert client.get(stale, headers=auth(key)).status_code == 404


def test_full_disk_is_507_before_a_chunk_is_taken(client, keys, app, monkeypatch):
    key = keys["producer"]
    location = create_upload(client, key, b"z" * 100, declare=False)
    monkeypatch.setattr(type(app.extensions[BLOBS]), "free_bytes", lambda self: 10)
    r = patch(client, key, location, 0, b"z" * 100)
    assert r.status_code == 507 and r.mimetype == "application/problem+json"
    monkeypatch.undo()
    # a disk that fills during the chunk: ENOSPC while writing, the chunk dropped, the offset unchanged
    import morag_remote.blobs as blobs_module

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(blobs_module, "write_all", full)
    r = patch(client, key, location, 0, b"z" * 100)
    assert r.status_code == 507
    monkeypatch.undo()
    assert client.head(location, headers=tus(key)).headers["Upload-Offset"] == "0"
    data_file = Path(app.extensions[BLOBS].uploads_dir) / location.rsplit("/", 1)[1] / "data"
    assert data_file.stat().st_size == 0
    assert patch(client, key, location, 0, b"z" * 100).status_code == 204


# -- checksums of path sources --------------------------------------------------------------------

def test_a_path_source_changed_after_create_is_409_never_the_new_bytes(producer, worker, client, keys):
    path = producer.source("talk.mp3", b"original bytes" * 100)
    r = client.post(J + "/", json={"source_file_path": str(path), "content_type": "audio",
                                   "ingestion_task_id": "x"}, headers=producer.headers)
    assert r.status_code == 201
    job = worker.claim("audio")
    assert job["source_size"] == 1400 and job["source_sha256"] is None
    first = worker.download(job["source_file_url"])
    assert first.status_code == 200 and "Repr-Digest" not in first.headers
    assert first.data == path.read_bytes()  # read to the end: the sha256 is recorded once all was sent
    # the first full download learned the sha256
    again = worker.download(job["source_file_url"])
    assert again.headers["Repr-Digest"] and again.data == path.read_bytes()
    path.write_bytes(b"other bytes!!!" * 100)  # same size, new bytes
    changed = worker.download(job["source_file_url"])
    assert changed.status_code == 409 and changed.json["title"] == "Source changed"
    assert b"other" not in changed.data


def test_a_second_job_of_a_file_already_hashed_knows_its_sha256_at_create(producer, worker, client):
    data = b"the same recording" * 500
    path = producer.source("twice.wav", data)
    body = {"source_file_path": str(path), "content_type": "audio", "ingestion_task_id": "x"}
    assert client.post(J + "/", json=body, headers=producer.headers).status_code == 201
    first = worker.claim("audio")
    assert first["source_sha256"] is None
    assert worker.download(first["source_file_url"]).data == data  # read whole: hashed once
    assert client.post(J + "/", json=body, headers=producer.headers).status_code == 201
    second = worker.claim("audio")
    assert second["source_sha256"] == hashlib.sha256(data).hexdigest()
    got = worker.download(second["source_file_url"])
    assert got.headers["Repr-Digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"
    # a wrong declared sha256 of a known file is still refused, and a right one accepted
    assert client.post(J + "/", json={**body, "source_sha256": "0" * 64}, headers=producer.headers).status_code == 422
    good = {**body, "source_sha256": hashlib.sha256(data).hexdigest()}
    assert client.post(J + "/", json=good, headers=producer.headers).status_code == 201
    # once the file is written again, its old sha256 is not trusted
    path.write_bytes(b"new take" * 100)
    assert client.post(J + "/", json=body, headers=producer.headers).status_code == 201
    declared, rewritten = worker.claim("audio"), worker.claim("audio")
    assert declared["source_sha256"] == good["source_sha256"]
    assert rewritten["source_sha256"] is None and rewritten["source_size"] == 800


def test_a_source_touched_but_unchanged_is_served_and_one_rewritten_to_other_bytes_is_409(producer, worker, client):
    data = b"recorded once" * 100
    path = producer.source("touched.wav", data)
    body = {"source_file_path": str(path), "content_type": "audio", "ingestion_task_id": "x",
            "source_sha256": hashlib.sha256(data).hexdigest()}
    assert client.post(J + "/", json=body, headers=producer.headers).status_code == 201
    job = worker.claim("audio")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a backup tool touched it
    same = worker.download(job["source_file_url"])
    assert same.status_code == 200 and same.data == data and same.headers["Repr-Digest"]
    path.write_bytes(b"other  bytes!" * 100)  # the same size, other bytes
    changed = worker.download(job["source_file_url"])
    assert changed.status_code == 409 and "sha256" in changed.json["detail"]


def test_a_declared_sha256_is_verified_at_create(producer, client):
    path = producer.source("doc.pdf", b"pdf bytes")
    good = hashlib.sha256(b"pdf bytes").hexdigest()
    body = {"source_file_path": str(path), "content_type": "document", "ingestion_task_id": "x"}
    assert client.post(J + "/", json={**body, "source_sha256": "0" * 64}, headers=producer.headers).status_code == 422
    r = client.post(J + "/", json={**body, "source_sha256": good}, headers=producer.headers)
    assert r.status_code == 201
    both = client.post(J + "/", json={**body, "source_upload_id": "abc"}, headers=producer.headers)
    assert both.status_code == 422


# -- artifacts ------------------------------------------------------------------------------------

def put_artifact(client, key: str, job_id: str, name: str, data: bytes, **headers: str):
    return client.put(f"{J}/{job_id}/artifacts/{name}", data=data,
                      headers={**auth(key), "Content-Type": "application/octet-stream", **headers})


def test_artifacts_become_part_of_the_successful_result(producer, worker, client, keys, runner):
    job_id = producer.create_id()
    job = worker.claim()
    srt, seg = b"1\n00:00:00,000 --> 00:00:01,000\nhello\n", os.urandom(3000)
    digest = base64.b64encode(hashlib.sha256(srt).digest()).decode()
    r = put_artifact(client, keys["worker"], job_id, "talk.srt", srt, **{"X-Lease-Id": job["lease_id"],
                                                                         "Content-Digest": f"sha-256=:{digest}:"})
    assert r.status_code == 201 and r.json["sha256"] == hashlib.sha256(srt).hexdigest()
    assert put_artifact(client, keys["worker"], job_id, "segments.json", seg,
                        **{"X-Lease-Id": job["lease_id"]}).status_code == 201
    # not shown before the result
    assert producer.get(job_id).json["artifacts"] == []
    missing = worker.result(job_id, lease_id=job["lease_id"], artifacts=["talk.srt", "nope.txt"])
    assert missing.status_code == 422
    assert worker.result(job_id, lease_id=job["lease_id"], artifacts=["talk.srt", "segments.json"]).status_code == 200
    listed = producer.get(job_id).json["artifacts"]
    assert [a["name"] for a in listed] == ["talk.srt", "segments.json"]  # in the order the result named them
    for entry, data in zip(listed, (srt, seg)):
        got = client.get(entry["url"], headers=producer.headers)
        assert got.status_code == 200 and got.data == data
        assert got.headers["Repr-Digest"].startswith("sha-256=:")
        part = client.get(entry["url"], headers={**producer.headers, "Range": "bytes=5-"})
        assert part.status_code == 206 and part.data == data[5:]
    shown = runner.invoke(args=["remote-jobs", "show", job_id])
    assert "talk.srt" in shown.output and "segments.json" in shown.output
    # after the result the attempt is over: no more artifacts
    assert put_artifact(client, keys["worker"], job_id, "late.txt", b"x",
                        **{"X-Lease-Id": job["lease_id"]}).status_code == 409


def test_a_lapsed_lease_uploads_nothing_and_the_next_holder_artifacts_are_the_only_ones(
        producer, worker, worker2, client, keys, clock, app):
    job_id = producer.create_id()
    first = worker.claim()
    assert put_artifact(client, keys["worker"], job_id, "a.txt", b"first",
                        **{"X-Lease-Id": first["lease_id"]}).status_code == 201
    clock.advance(app.config["LEASE_SECONDS"]["audio"] + 1)
    second = worker2.claim()  # the poll hands the lapsed job on
    stale = put_artifact(client, keys["worker"], job_id, "a.txt", b"stale", **{"X-Lease-Id": first["lease_id"]})
    assert stale.status_code == 409 and stale.mimetype == "application/problem+json"
    assert put_artifact(client, keys["worker"], job_id, "b.txt", b"second",
                        **{"X-Lease-Id": second["lease_id"]}).status_code == 201
    assert worker2.result(job_id, lease_id=second["lease_id"]).status_code == 200
    listed = producer.get(job_id).json["artifacts"]
    assert [a["name"] for a in listed] == ["b.txt"]
    assert client.get(listed[0]["url"], headers=producer.headers).data == b"second"
    assert client.get(f"{J}/{job_id}/artifacts/a.txt", headers=producer.headers).status_code == 404


@pytest.mark.parametrize("name", ["a%2Fb", "..", ".hidden", "nul%00byte", "x" * 300, "%C3%A9" * 130])
def test_bad_artifact_names_are_422(producer, worker, client, keys, name):
    job_id = producer.create_id()
    job = worker.claim()
    r = put_artifact(client, keys["worker"], job_id, name, b"x", **{"X-Lease-Id": job["lease_id"]})
    assert r.status_code == 422, r.get_data(as_text=True)
    assert r.mimetype == "application/problem+json"


def test_artifact_digest_mismatch_and_size_caps_store_nothing(producer, worker, client, keys, app):
    job_id = producer.create_id()
    job = worker.claim()
    lease = {"X-Lease-Id": job["lease_id"]}
    wrong = base64.b64encode(b"\0" * 32).decode()
    r = put_artifact(client, keys["worker"], job_id, "a.txt", b"abc", **lease, **{"Content-Digest": f"sha-256=:{wrong}:"})
    assert r.status_code == 400
    app.extensions["morag_remote.artifacts"].settings = type(app.extensions["morag_remote.artifacts"].settings)(
        max_bytes=10, max_job_bytes=15, max_count=2)
    assert put_artifact(client, keys["worker"], job_id, "big.bin", b"x" * 11, **lease).status_code == 413
    assert put_artifact(client, keys["worker"], job_id, "a.bin", b"x" * 10, **lease).status_code == 201
    assert put_artifact(client, keys["worker"], job_id, "b.bin", b"x" * 6, **lease).status_code == 413
    assert worker.result(job_id, lease_id=job["lease_id"]).status_code == 200
    assert [a["name"] for a in app.test_client().get(f"{J}/{job_id}", headers=auth(keys["producer"])).json["artifacts"]] == ["a.bin"]


def test_failed_and_cancelled_attempts_discard_their_artifacts_and_delete_removes_them(
        producer, worker, client, keys, app, admin_headers):
    blobs = app.extensions[BLOBS]
    job_id = producer.create_id(max_retries=0)
    job = worker.claim()
    put_artifact(client, keys["worker"], job_id, "a.txt", b"x", **{"X-Lease-Id": job["lease_id"]})
    assert blobs.artifact_job_ids() == [job_id]
    assert worker.result(job_id, success=False, error_message="boom", lease_id=job["lease_id"]).status_code == 200
    assert blobs.artifact_job_ids() == []
    job_id = producer.create_id()
    job = worker.claim()
    put_artifact(client, keys["worker"], job_id, "a.txt", b"x", **{"X-Lease-Id": job["lease_id"]})
    assert worker.result(job_id, lease_id=job["lease_id"]).status_code == 200
    assert client.delete(f"{J}/{job_id}", headers=admin_headers).status_code == 204
    assert blobs.artifact_job_ids() == []
