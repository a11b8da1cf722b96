"""Keys and roles as the foundation ships them (the authentication issue hardens them further)."""
from __future__ import annotations

import pytest

from support.actions import auth
from morag_remote import create_app
from morag_remote.store.files.keys import FileKeyStore
from morag_remote.context import KEYS

BASE = "/api/v1/remote-jobs"


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer   ", "Basic abc", "Bearer mrk_not-a-real-key"])
def test_missing_or_bad_keys_are_401(client, keys, header):
    response = client.get(f"{BASE}/stats", headers={"Authorization": header} if header else {})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("role,allowed", [("worker", False), ("producer", True), ("admin", True)])
def test_only_producers_and_admins_create_jobs(client, keys, producer, role, allowed):
    source = producer.source()
    response = client.post(BASE, headers=auth(keys[role]), json={
        "source_file_path": str(source), "content_type": "audio", "ingestion_task_id": "t"})
    assert response.status_code == (201 if allowed else 403)


def test_producers_may_not_poll(client, keys):
    response = client.get(f"{BASE}/poll", headers=auth(keys["producer"]),
                          query_string={"worker_id": "w", "content_types": "audio"})
    assert response.status_code == 403


def test_a_bound_worker_key_polls_only_as_its_worker(client, keys):
    response = client.get(f"{BASE}/poll", headers=auth(keys["worker_bound"]),
                          query_string={"worker_id": "someone-else", "content_types": "audio"})
    assert response.status_code == 403
    response = client.get(f"{BASE}/poll", headers=auth(keys["worker_bound"]),
                          query_string={"worker_id": "bound-worker", "content_types": "audio"})
    assert response.status_code == 200


def test_a_bound_worker_key_cannot_act_on_a_job_held_by_another_worker(client, keys, producer, worker):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    response = client.put(f"{BASE}/{job_id}/result", json={"success": True}, headers=auth(keys["worker_bound"]))
    assert response.status_code == 409
    assert producer.get(job_id).json["status"] == "processing"


def test_a_bound_worker_key_downloads_its_job_without_a_token(client, keys, producer):
    job_id = producer.create_id("audio")
    client.get(f"{BASE}/poll", headers=auth(keys["worker_bound"]),
               query_string={"worker_id": "bound-worker", "content_types": "audio"})
    response = client.get(f"{BASE}/{job_id}/download", headers=auth(keys["worker_bound"]))
    assert response.status_code == 200


def test_using_a_key_records_when_it_was_last_used(client, keys, app):
    client.get(f"{BASE}/stats", headers=auth(keys["admin"]))
    used = {k.name: k.last_used_at for k in app.extensions[KEYS].list()}
    assert used["admin-key"] is not None and used["producer-key"] is None


def test_with_auth_disabled_every_request_is_admin(instance_path):
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True,
                      "AUTH_DISABLED": True})
    client = app.test_client()
    assert client.get(f"{BASE}/stats").status_code == 200
    assert client.delete(f"{BASE}/0190d6a0-0000-7000-8000-000000000000").status_code == 404


@pytest.mark.files_only
def test_a_key_made_by_another_process_is_accepted_without_a_restart(client, app, instance_path):
    secret = FileKeyStore(instance_path / "api_keys.json").create("late", "producer")[1]
    assert client.get(BASE, headers=auth(secret)).status_code == 200
