"""Regressions found while fuzzing the API (issue 6): each is a defect that was fixed."""
from __future__ import annotations

import json

import pytest

from morag_remote import create_app

from support.actions import WorkerActions, auth


def test_crash_in_a_view_answers_problem_json_500_without_a_traceback(instance_path):
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True})

    def explode():
        raise RuntimeError("secret internals")

    app.add_url_rule("/explode", "explode", explode)
    response = app.test_client().get("/explode")
    assert response.status_code == 500
    assert response.mimetype == "application/problem+json"
    assert response.json["title"] == "Internal Server Error"
    assert "secret internals" not in response.get_data(as_text=True)


def test_unsatisfiable_range_keeps_its_content_range_header(producer, worker):
    producer.create_id("audio", name="talk.mp3")
    claimed = worker.claim("audio")
    size = len(producer.source("talk.mp3").read_bytes())
    response = worker.download(claimed["source_file_url"], Range=f"bytes={size + 10}-")
    assert response.status_code == 416
    assert response.mimetype == "application/problem+json"
    assert response.headers["Content-Range"] == f"bytes */{size}"


def test_method_not_allowed_keeps_its_allow_header(client):
    response = client.put("/health")
    assert response.status_code == 405
    assert response.mimetype == "application/problem+json"
    assert set(response.headers["Allow"].split(", ")) >= {"GET"}


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_json_numbers_in_a_body_are_refused_and_nothing_is_stored(client, keys, instance_path, literal):
    source = instance_path / "sources" / "a.mp3"
    source.write_bytes(b"audio")
    body = ('{"source_file_path": %s, "content_type": "audio", "ingestion_task_id": "i", '
            '"task_options": {"gain": %s}}' % (json.dumps(str(source)), literal))
    response = client.post("/api/v1/remote-jobs/", data=body, content_type="application/json",
                           headers=auth(keys["producer"]))
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    listed = client.get("/api/v1/remote-jobs/", headers=auth(keys["producer"]))
    assert listed.json["jobs"] == []


def test_large_but_finite_numbers_are_still_accepted(producer):
    response = producer.create("audio", task_options={"gain": 1e300, "frames": 10**30})
    assert response.status_code == 201
    options = producer.get(response.json["job_id"]).json["task_options"]
    # as JSON numbers (PostgreSQL's jsonb writes 1e300 out in full digits: the same double)
    assert float(options["gain"]) == 1e300 and options["frames"] == 10**30


@pytest.mark.parametrize("query", [{"worker_id": "w1", "content_types": "audio,vi\x00deo"},
                                   {"worker_id": "w\x001", "content_types": "audio"}])
def test_nul_in_a_poll_is_refused_on_every_backend(worker, query):
    response = worker.client.get("/api/v1/remote-jobs/poll", query_string=query, headers=worker.headers)
    assert response.status_code == 422
    assert response.mimetype == "application/problem+json"
    assert "NUL" in response.json["detail"]


def test_nul_in_a_body_is_refused_and_the_job_is_unchanged(producer, worker):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    before = producer.get(job_id).json
    response = worker.result(job_id, content="text\x00more")
    assert response.status_code == 422
    assert response.json["errors"] == {"content": ["contains a NUL byte (U+0000)"]}
    assert producer.get(job_id).json == before
    refused = producer.create("audio", task_options={"lang\x00": "en"})
    assert refused.status_code == 422 and refused.json["errors"] == {"task_options": ["a key contains a NUL byte (U+0000)"]}


def test_bound_worker_repeating_a_requeued_failure_gets_its_first_answer(producer, client, keys, service):
    """Found by the state machine: the re-queue cleared the job's worker id, so the shortcut for a
    repeated result no longer recognised the bound key that sent it, and its retried request got 409."""
    bound = WorkerActions(client, keys["worker_bound"], "bound-worker")
    job_id = producer.create_id("audio", max_retries=2)
    bound.claim("audio")
    first = bound.result(job_id, success=False, error_message="GPU out of memory")
    before = service.get(job_id)
    again = bound.result(job_id, success=False, error_message="GPU out of memory")
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json == first.json == {"status": "pending", "ingestion_continued": False}
    assert service.get(job_id).version == before.version
