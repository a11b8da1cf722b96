"""A full disk (no space, or no inodes) under a real gunicorn: every write answers 503 problem+json
with Retry-After and changes nothing, the log says so once rather than with a traceback per
request, /health and the metric say it, and the service recovers by itself when space returns."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import requests

from support import small_fs
from support.gunicorn import ROOT, Gunicorn, make_keys

pytestmark = pytest.mark.slow
J = "/api/v1/remote-jobs"


@pytest.fixture
def server(tmp_path):
    with small_fs.mounted(tmp_path / "small", size="8m", inodes=2000) as small:
        instance = tmp_path / "instance"
        (instance / "sources").mkdir(parents=True)
        (instance / "sources" / "a.mp3").write_bytes(b"audio bytes")
        keys = make_keys(instance)
        data = small / "jobs"
        gunicorn = Gunicorn(instance, workers=2, env={"MORAG_REMOTE_JOBS_DATA_DIR": str(data)}).start()
        try:
            yield gunicorn, keys, instance, small
        finally:
            gunicorn.stop()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _create(server, keys, instance):
    return requests.post(server.url(f"{J}/"), headers=_h(keys["producer"]), timeout=10, json={
        "source_file_path": str(instance / "sources" / "a.mp3"), "content_type": "audio", "ingestion_task_id": "t"})


def _poll(server, keys, worker_id="w1"):
    return requests.get(server.url(f"{J}/poll"), headers=_h(keys["worker"]), timeout=10,
                        params={"worker_id": worker_id, "content_types": "audio"})


@pytest.mark.parametrize("exhaust", ["space", "inodes"])
def test_a_full_disk_answers_503_with_retry_after_and_recovers_without_a_restart(server, exhaust):
    gunicorn, keys, instance, small = server
    acknowledged = [_create(gunicorn, keys, instance).json()["job_id"] for _ in range(4)]
    held = _poll(gunicorn, keys).json()["jobs"][0]
    filler = small_fs.fill_space(small) if exhaust == "space" else small_fs.fill_inodes(small)

    answers = []
    for _ in range(6):
        answers.append(_create(gunicorn, keys, instance))
        answers.append(_poll(gunicorn, keys, "w2"))
        answers.append(requests.put(gunicorn.url(f"{J}/{held['job_id']}/result"), headers=_h(keys["worker"]),
                                    json={"success": True, "content": "x" * 20_000, "lease_id": held["lease_id"]},
                                    timeout=10))
    statuses = [a.status_code for a in answers]
    assert 500 not in statuses, [a.text for a in answers if a.status_code == 500]
    refused = [a for a in answers if a.status_code == 503]
    assert any(a.request.method == "POST" for a in refused), statuses  # creates cannot land
    for answer in refused:
        assert answer.headers["Content-Type"] == "application/problem+json"
        assert int(answer.headers["Retry-After"]) > 0 and answer.json()["title"] == "Store full"
    health = requests.get(gunicorn.url("/health"), timeout=10)
    assert health.status_code == 503
    metrics = requests.get(gunicorn.url("/metrics"), headers=_h(keys["admin"]), timeout=10).text
    assert "morag_remote_store_writable 0.0" in metrics

    log = gunicorn.stderr()
    assert "Traceback" not in log
    warnings = [line for line in log.splitlines() if '"store.full"' in line]
    assert 1 <= len(warnings) <= 4  # one per condition per process per minute, not one per request

    if exhaust == "space":
        filler.unlink()
    else:
        shutil.rmtree(filler)
    assert requests.get(gunicorn.url("/health"), timeout=10).status_code == 200
    assert _create(gunicorn, keys, instance).status_code == 201
    jobs = requests.get(gunicorn.url(f"{J}/"), headers=_h(keys["producer"]), params={"limit": 100}, timeout=10).json()
    listed = {j["id"]: j for j in jobs["jobs"]}
    assert set(acknowledged) <= set(listed)
    for answer in answers:
        if answer.status_code == 201:
            assert answer.json()["job_id"] in listed
    final = requests.put(gunicorn.url(f"{J}/{held['job_id']}/result"), headers=_h(keys["worker"]),
                         json={"success": True, "content": "x" * 20_000, "lease_id": held["lease_id"]}, timeout=10)
    assert final.status_code == 200 and final.json()["status"] == "completed"

    fsck = subprocess.run([sys.executable, "-m", "flask", "--app", "morag_remote", "remote-jobs", "fsck", "--json"],
                          cwd=ROOT, env=gunicorn.env, capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert json.loads(fsck.stdout) == []
