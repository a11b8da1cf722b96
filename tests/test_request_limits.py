"""Limits: a body above MAX_CONTENT_LENGTH is 413; oversized task_options/metadata, ids, strings and
content type lists are 422; every answer is problem+json with a message that names the limit, and
nothing changes."""
from __future__ import annotations

import io

import pytest

from support.actions import auth
from morag_remote.schemas import MAX_JSON_DEPTH, MAX_METADATA_BYTES, MAX_OPTIONS_BYTES
from morag_remote.store.base import JobFilter

J = "/api/v1/remote-jobs"
BODY_LIMIT = 8 * 1024


@pytest.fixture
def app_config():
    return {"MAX_CONTENT_LENGTH": BODY_LIMIT}


def create_body(producer, **overrides):
    body = {"source_file_path": str(producer.source("limits.bin")), "content_type": "audio",
            "ingestion_task_id": "limits"}
    body.update(overrides)
    return body


def assert_problem(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)[:300]
    assert response.mimetype == "application/problem+json"
    for word in words:
        assert word in response.get_data(as_text=True), word


def job_count(service) -> int:
    return len(service.list(JobFilter(), None, 100)[0])


def test_create_body_larger_than_max_content_length_is_413_naming_the_limit(producer, client, service):
    body = create_body(producer, task_options={"pad": "x" * BODY_LIMIT})
    response = client.post(f"{J}/", json=body, headers=producer.headers)
    assert_problem(response, 413, str(BODY_LIMIT), "MORAG_REMOTE_MAX_CONTENT_LENGTH")
    assert job_count(service) == 0


def test_chunked_body_without_length_is_cut_at_the_limit_with_413(producer, client, service):
    payload = b'{"pad": "' + b"x" * (2 * BODY_LIMIT) + b'"}'
    response = client.post(f"{J}/", input_stream=io.BytesIO(payload), content_type="application/json",
                           headers=producer.headers, environ_overrides={"wsgi.input_terminated": True})
    assert_problem(response, 413, str(BODY_LIMIT))
    assert job_count(service) == 0


def test_result_body_larger_than_max_content_length_is_413_and_the_job_stays_held(producer, worker, service):
    job_id = producer.create_id("audio")
    worker.claim("audio")
    response = worker.result(job_id, content="x" * (BODY_LIMIT + 1))
    assert_problem(response, 413, str(BODY_LIMIT))
    assert service.get(job_id).status == "processing"


def test_body_without_a_key_is_401_before_it_is_read(client):
    response = client.post(f"{J}/", data=b"x" * (BODY_LIMIT * 4), content_type="application/json")
    assert response.status_code == 401


class TestDefaultLimits:
    """The schema limits, under the default 64 MiB body limit."""

    @pytest.fixture
    def app_config(self):
        return {}

    def test_task_options_larger_than_the_limit_is_422(self, producer, client, service):
        body = create_body(producer, task_options={"pad": "x" * MAX_OPTIONS_BYTES})
        response = client.post(f"{J}/", json=body, headers=producer.headers)
        assert_problem(response, 422, "task_options", f"larger than {MAX_OPTIONS_BYTES} bytes")
        assert job_count(service) == 0

    @pytest.mark.parametrize("container", ["objects", "arrays"])
    def test_task_options_nested_too_deep_is_422(self, container, producer, client, service):
        nested: dict | list = {}
        for _ in range(MAX_JSON_DEPTH):
            nested = {"n": nested} if container == "objects" else [nested]
        nested = {"n": nested}
        response = client.post(f"{J}/", json=create_body(producer, task_options=nested), headers=producer.headers)
        assert_problem(response, 422, "task_options", f"more than {MAX_JSON_DEPTH} levels")
        assert job_count(service) == 0

    def test_task_options_at_the_depth_limit_are_accepted(self, producer, client):
        nested: dict = {}
        for _ in range(MAX_JSON_DEPTH - 1):
            nested = {"n": nested}
        response = client.post(f"{J}/", json=create_body(producer, task_options=nested), headers=producer.headers)
        assert response.status_code == 201

    def test_metadata_larger_than_the_limit_is_422_and_the_job_stays_held(self, producer, worker, service):
        job_id = producer.create_id("audio")
        worker.claim("audio")
        response = worker.result(job_id, metadata={"pad": "x" * MAX_METADATA_BYTES})
        assert_problem(response, 422, "metadata", f"larger than {MAX_METADATA_BYTES} bytes")
        assert service.get(job_id).status == "processing"

    def test_json_nested_deeper_than_the_parser_goes_is_400_not_500(self, producer, client, service):
        response = client.post(f"{J}/", data="[" * 100_000, content_type="application/json",
                               headers=producer.headers)
        assert_problem(response, 400, "too deeply")
        assert job_count(service) == 0

    @pytest.mark.parametrize("field, value", [
        ("ingestion_task_id", "i" * 129),
        ("ingestion_task_id", ""),
        ("source_file_path", "/" + "p" * 4096),
        ("content_type", "c" * 65),
        ("priority", 10**6),
        ("max_retries", 101),
    ])
    def test_create_field_over_its_limit_is_422_naming_the_field(self, field, value, producer, client, service):
        response = client.post(f"{J}/", json=create_body(producer, **{field: value}), headers=producer.headers)
        assert_problem(response, 422, field)
        assert field in response.json["errors"]
        assert job_count(service) == 0

    @pytest.mark.parametrize("query, field", [
        ({"worker_id": "w" * 129, "content_types": "audio"}, "worker_id"),
        ({"worker_id": "w1", "content_types": ",".join(f"t{i}" for i in range(33))}, "content_types"),
        ({"worker_id": "w1", "content_types": "a" * 65}, "content_types"),
        ({"worker_id": "w1", "content_types": "audio", "max_jobs": 1000}, "max_jobs"),
    ])
    def test_poll_parameter_over_its_limit_is_422_and_claims_nothing(self, query, field, producer, client,
                                                                     keys, service):
        job_id = producer.create_id("audio")
        response = client.get(f"{J}/poll", query_string=query, headers=auth(keys["worker"]))
        assert_problem(response, 422, field)
        assert service.get(job_id).status == "pending"

    @pytest.mark.parametrize("body, field", [
        ({"message": "m" * 1001}, "message"),
        ({"lease_id": "l" * 65}, "lease_id"),
        ({"progress": 1.5}, "progress"),
    ])
    def test_heartbeat_field_over_its_limit_is_422_and_changes_nothing(self, body, field, producer, worker,
                                                                      service):
        job_id = producer.create_id("audio")
        worker.claim("audio")
        before = service.get(job_id).version
        assert_problem(worker.heartbeat(job_id, **body), 422, field)
        assert service.get(job_id).version == before

    def test_error_message_over_its_limit_is_422(self, producer, worker, service):
        job_id = producer.create_id("audio")
        worker.claim("audio")
        assert_problem(worker.result(job_id, success=False, error_message="e" * 10_001), 422, "error_message")
        assert service.get(job_id).status == "processing"

    def test_lease_id_header_over_its_limit_is_422(self, producer, worker, service):
        job_id = producer.create_id("audio")
        worker.claim("audio")
        response = worker.client.post(f"{J}/{job_id}/heartbeat", json={},
                                      headers={**worker.headers, "X-Lease-Id": "l" * 65})
        assert_problem(response, 422, "X-Lease-Id", "64")

    def test_job_id_longer_than_any_job_id_is_404(self, producer, client):
        response = client.get(f"{J}/{'j' * 65}", headers=producer.headers)
        assert_problem(response, 404)

    def test_list_cursor_over_its_limit_is_422(self, producer, client):
        response = client.get(f"{J}/", query_string={"cursor": "c" * 65}, headers=producer.headers)
        assert_problem(response, 422, "cursor")


@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b'"a string"', b"null"])
def test_body_that_is_not_a_json_object_is_400(data, producer, client, service):
    response = client.post(f"{J}/", data=data, content_type="application/json", headers=producer.headers)
    assert_problem(response, 400, "JSON")
    assert job_count(service) == 0
