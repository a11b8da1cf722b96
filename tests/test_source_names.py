"""File names that are not plain UTF-8: a lone surrogate (which names no file on any system) is
refused at create with 422; a real file whose name is not UTF-8 (decoded with surrogateescape, as
Python does) is accepted and served."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.actions import WorkerActions, auth
from morag_remote.exceptions import SourceForbidden
from morag_remote.sources import open_source
from morag_remote.store.base import JobFilter

J = "/api/v1/remote-jobs"
DATA = b"bytes of a file whose name is not UTF-8"


def create(client, keys, source_file_path: str):
    return client.post(f"{J}/", headers=auth(keys["producer"]), json={
        "source_file_path": source_file_path, "content_type": "audio", "ingestion_task_id": "names"})


@pytest.mark.parametrize("name", ["\ud800", "clip-\udfff.bin", "dir\ud83d/clip.bin"])
def test_a_lone_surrogate_in_source_file_path_is_422_not_a_valid_file_name(client, keys, service,
                                                                           instance_path, name):
    root = instance_path / "sources"
    response = create(client, keys, f"{root}/{name}")
    assert response.status_code == 422, response.json
    assert response.mimetype == "application/problem+json"
    assert "not a valid file name" in response.json["detail"]
    assert "source_file_path" in response.json["errors"]
    assert service.list(JobFilter(), None, 10)[0] == []


def test_a_stored_path_with_a_lone_surrogate_is_refused_at_serve_time(instance_path):
    """Create refuses such a path; a record written by other means is refused when served."""
    root = instance_path / "sources"
    with pytest.raises(SourceForbidden):
        open_source(f"{root}/\ud800.bin", [str(root)])


def test_a_real_file_with_a_non_utf8_name_is_accepted_and_served(client, keys, instance_path, backend):
    root = instance_path / "sources"
    raw = os.fsencode(root) + b"/caf\xe9-\xff.bin"
    with open(raw, "wb") as fh:
        fh.write(DATA)
    name = os.fsdecode(raw)  # 'caf\udce9-\udcff.bin': surrogateescape, as Python reads directory entries
    assert Path(name).exists()
    created = create(client, keys, name)
    if backend == "postgres":  # text is UTF-8 there: a clear 422, never a 500
        assert created.status_code == 422 and "UTF-8" in created.json["detail"]
        return
    assert created.status_code == 201, created.json
    worker = WorkerActions(client, keys["worker"], "w-names")
    claimed = worker.claim("audio")
    assert claimed["job_id"] == created.json["job_id"]
    response = worker.download(claimed["source_file_url"])
    assert response.status_code == 200
    assert response.data == DATA


@pytest.mark.parametrize("name, header", [
    ("talk.flac", "attachment; filename=talk.flac"),
    ("caf\u00e9 \"live\".mp3", 'attachment; filename="cafe \\"live\\".mp3"; filename*=UTF-8\'\'caf%C3%A9%20%22live%22.mp3'),
    ("a\rb\tc.mp3", "attachment; filename=a_b_c.mp3; filename*=UTF-8''a%0Db%09c.mp3"),
    ("caf\udce9-\udcff.bin", "attachment; filename=caf_-_.bin"),  # not UTF-8: no filename*
])
def test_the_download_names_the_file_in_a_header_http_can_carry(client, keys, instance_path, backend, name, header):
    if backend == "postgres" and "\udce9" in name:
        pytest.skip("text is UTF-8 on PostgreSQL: such a name is refused at create (above)")
    path = os.fsencode(instance_path / "sources") + b"/" + os.fsencode(name)
    with open(path, "wb") as fh:
        fh.write(DATA)
    assert create(client, keys, os.fsdecode(path)).status_code == 201
    worker = WorkerActions(client, keys["worker"], "w-names")
    response = worker.download(worker.claim("audio")["source_file_url"])
    assert response.status_code == 200 and response.data == DATA
    assert response.headers["Content-Disposition"] == header
    header.encode("latin-1")  # PEP 3333: what a WSGI server can send
