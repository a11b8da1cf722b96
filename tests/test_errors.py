"""Every error is RFC 9457 problem details (application/problem+json) with type, title, status and
detail, keeping the headers its status needs (Allow, Content-Range, Retry-After); what is not JSON
(NaN, Infinity, NUL bytes) is refused and nothing is stored; nothing a client can send produces a
500. (Includes the regressions found while fuzzing the API.)"""
from __future__ import annotations

import json

import pytest

from support.actions import auth

BASE = "/api/v1/remote-jobs"
UNKNOWN_ID = "0190d6a0-0000-7000-8000-000000000000"


@pytest.fixture
def app_config():
    return {"MAX_CONTENT_LENGTH": 4096}


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.content_type == "application/problem+json"
    body = response.json
    assert body["status"] == status
    assert body["type"] == "about:blank"
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    assert body["request_id"] == response.headers["X-Request-ID"]
    return body


def test_flask_404_for_an_unknown_path_is_problem_json(client):
    assert_problem(client.get("/no/such/path"), 404)


@pytest.mark.parametrize("method", ["DELETE", "PUT"])
def test_flask_405_for_a_wrong_method_is_problem_json_with_allow(client, method):
    response = client.open("/health", method=method)
    assert_problem(response, 405)
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "HEAD"}


def test_head_of_poll_is_405_and_claims_nothing(client, keys, producer, worker):
    """A poll claims: answering HEAD would take a job and drop the answer that names it."""
    job_id = producer.create_id("audio")
    response = client.head(f"{BASE}/poll?worker_id=w1&content_types=audio", headers=auth(keys["worker"]))
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) == {"GET", "POST"}
    assert client.head(f"{BASE}/poll?worker_id=w1&content_types=audio").status_code == 405  # before the key
    assert worker.claim("audio")["job_id"] == job_id


def test_a_content_type_that_is_not_text_is_422_on_either_backend(client, keys):
    body = b'{"worker_id": "w1", "content_types": ["audio", "\\ud800"], "wait": 1}'
    response = client.post(f"{BASE}/poll", data=body, content_type="application/json", headers=auth(keys["worker"]))
    assert_problem(response, 422)
    assert "content_types" in response.json["errors"]


def test_malformed_json_is_400(client, keys):
    response = client.post(BASE, data="{not json", content_type="application/json", headers=auth(keys["producer"]))
    body = assert_problem(response, 400)
    assert body["detail"] == "the request body is not valid JSON"


def test_empty_body_where_json_is_required_is_400(client, keys):
    assert_problem(client.post(BASE, headers=auth(keys["producer"])), 400)


@pytest.mark.parametrize("payload", ["[1, 2]", '"text"', "42", "null"])
def test_json_that_is_not_an_object_is_400(client, keys, payload):
    response = client.post(BASE, data=payload, content_type="application/json", headers=auth(keys["producer"]))
    body = assert_problem(response, 400)
    assert body["detail"] == "the request body must be a JSON object"


def test_nan_is_not_json_and_is_400(client, keys):
    response = client.post(f"{BASE}/poll", data='{"worker_id": "w", "content_types": "audio", "wait": NaN}',
                           content_type="application/json", headers=auth(keys["worker"]))
    assert_problem(response, 400)


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
    assert float(options["gain"]) == 1e300
    assert options["frames"] == 10**30


def test_invalid_utf8_is_400(client, keys):
    response = client.post(BASE, data=b'{"source_file_path": "\xff"}', content_type="application/json",
                           headers=auth(keys["producer"]))
    assert_problem(response, 400)


def test_json_nested_past_the_parser_limit_is_400_not_a_crash(app, client, keys):
    app.config["MAX_CONTENT_LENGTH"] = None
    nested = "[" * 100_000 + "]" * 100_000
    response = client.post(BASE, data=nested, content_type="application/json", headers=auth(keys["producer"]))
    assert_problem(response, 400)


def test_json_nested_deeper_than_the_limit_is_400(client, keys):
    nested = '{"a": ' + "[" * 80 + "]" * 80 + "}"
    response = client.post(BASE, data=nested, content_type="application/json", headers=auth(keys["producer"]))
    assert "nested deeper" in assert_problem(response, 400)["detail"]


def test_validation_error_is_422_with_per_field_errors(client, keys):
    response = client.post(BASE, json={"content_type": "hologram", "priority": "high", "surprise": 1},
                           headers=auth(keys["producer"]))
    body = assert_problem(response, 422)
    errors = body["errors"]
    assert set(errors) == {"source_file_path", "ingestion_task_id", "content_type", "priority", "surprise"}
    assert all(isinstance(msgs, list) and msgs and all(isinstance(m, str) for m in msgs)
               for msgs in errors.values())


def test_result_with_a_bad_processing_time_is_422_naming_it(client, keys):
    response = client.put(f"{BASE}/{UNKNOWN_ID}/result", json={"success": True, "processing_time": "slow"},
                          headers=auth(keys["worker"]))
    assert set(assert_problem(response, 422)["errors"]) == {"processing_time"}


def test_source_outside_the_roots_is_422_naming_the_field(client, keys):
    response = client.post(BASE, json={"source_file_path": "/etc/passwd", "content_type": "audio",
                                       "ingestion_task_id": "t"}, headers=auth(keys["producer"]))
    assert "source_file_path" in assert_problem(response, 422)["errors"]


@pytest.mark.parametrize("path", ["../../etc/passwd", "missing.mp3", "."])
def test_bad_source_paths_are_422(client, keys, path):
    response = client.post(BASE, json={"source_file_path": path, "content_type": "audio",
                                       "ingestion_task_id": "t"}, headers=auth(keys["producer"]))
    assert_problem(response, 422)


def test_poll_validation_errors_are_422(client, keys):
    response = client.get(f"{BASE}/poll", query_string={"worker_id": "w", "content_types": ",,",
                                                        "max_jobs": 0, "wait": 999},
                          headers=auth(keys["worker"]))
    assert set(assert_problem(response, 422)["errors"]) == {"content_types", "max_jobs", "wait"}


def test_poll_with_a_list_that_is_not_strings_is_422(client, keys):
    response = client.post(f"{BASE}/poll", json={"worker_id": "w", "content_types": [1, 2]},
                           headers=auth(keys["worker"]))
    assert "content_types" in assert_problem(response, 422)["errors"]


def test_poll_with_too_many_content_types_is_422(client, keys):
    response = client.post(f"{BASE}/poll", json={"worker_id": "w", "content_types": ["t"] * 33},
                           headers=auth(keys["worker"]))
    assert_problem(response, 422)


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
    assert refused.status_code == 422
    assert refused.json["errors"] == {"task_options": ["a key contains a NUL byte (U+0000)"]}


def test_unknown_query_parameter_is_422(client, keys):
    response = client.get(f"{BASE}/poll", query_string={"worker_id": "w", "content_types": "audio", "x": 1},
                          headers=auth(keys["worker"]))
    assert "x" in assert_problem(response, 422)["errors"]


def test_result_success_must_be_a_real_boolean(client, keys):
    response = client.put(f"{BASE}/{UNKNOWN_ID}/result", json={"success": "yes"}, headers=auth(keys["worker"]))
    assert "success" in assert_problem(response, 422)["errors"]


def test_unknown_job_is_404(client, keys):
    for method, path in [("get", f"{BASE}/{UNKNOWN_ID}"), ("get", f"{BASE}/{UNKNOWN_ID}/status")]:
        assert_problem(getattr(client, method)(path, headers=auth(keys["admin"])), 404)
    response = client.put(f"{BASE}/{UNKNOWN_ID}/result", json={"success": True}, headers=auth(keys["worker"]))
    assert_problem(response, 404)


@pytest.mark.parametrize("job_id", ["..", "a.b", "x" * 65, "%00", "a%2Fb"])
def test_job_ids_that_cannot_name_a_file_are_404(client, keys, job_id):
    response = client.get(f"{BASE}/{job_id}", headers=auth(keys["admin"]))
    assert_problem(response, 404)


def test_body_larger_than_max_content_length_is_413(client, keys):
    response = client.post(BASE, data='{"a": "' + "x" * 5000 + '"}', content_type="application/json",
                           headers=auth(keys["producer"]))
    assert_problem(response, 413)


def test_missing_key_is_401_with_www_authenticate(client):
    response = client.get(BASE)
    assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_wrong_role_is_403(client, keys):
    assert_problem(client.get(BASE, headers=auth(keys["worker"])), 403)


def test_wrong_state_is_409(client, keys, producer):
    job_id = producer.create_id()
    response = client.put(f"{BASE}/{job_id}/result", json={"success": True}, headers=auth(keys["worker"]))
    assert_problem(response, 409)


def test_a_crash_inside_the_server_is_a_500_problem_without_traceback(app, client):
    def boom():
        raise RuntimeError("secret internals")

    app.add_url_rule("/test-crash", "test_crash", boom)
    response = client.get("/test-crash")
    body = assert_problem(response, 500)
    assert "secret internals" not in response.get_data(as_text=True)
    assert "Traceback" not in response.get_data(as_text=True)
    assert body["title"] == "Internal Server Error"


def test_a_werkzeug_error_raised_by_a_view_keeps_its_headers(app, client):
    from werkzeug.exceptions import TooManyRequests

    def limited():
        raise TooManyRequests(retry_after=7)

    app.add_url_rule("/test-limited", "test_limited", limited)
    response = client.get("/test-limited")
    assert_problem(response, 429)
    assert response.headers["Retry-After"] == "7"


HOSTILE_BODIES = [
    b"", b"{", b"[]", b"{}", b'{"worker_id": null}', b'{"worker_id": 1, "content_types": {}}',
    b'{"success": true, "metadata": [1]}', b'{"progress": 2}', b'{"progress": "x"}',
    b'{"lease_id": 5}', b'{"success": false, "error_message": ' + b'"' + b"e" * 20000 + b'"}',
    b'{"source_file_path": "\\u0000", "content_type": "audio", "ingestion_task_id": "t"}',
    b'{"source_file_path": "a", "content_type": "audio", "ingestion_task_id": "t", "priority": 1e400}',
    b'{"source_file_path": "a", "content_type": "audio", "ingestion_task_id": "t", "max_retries": -1}',
]

ENDPOINTS = [
    ("post", BASE), ("post", f"{BASE}/poll"), ("put", f"{BASE}/{UNKNOWN_ID}/result"),
    ("post", f"{BASE}/{UNKNOWN_ID}/heartbeat"), ("post", f"{BASE}/{UNKNOWN_ID}/cancel"),
    ("post", f"{BASE}/{UNKNOWN_ID}/retry"),
]


@pytest.mark.parametrize("method,path", ENDPOINTS)
def test_no_hostile_body_makes_a_500(client, keys, method, path):
    for body in HOSTILE_BODIES:
        response = getattr(client, method)(path, data=body, content_type="application/json",
                                           headers=auth(keys["admin"]))
        assert 400 <= response.status_code < 500, (body[:60], response.get_data(as_text=True))
        assert response.content_type == "application/problem+json"


HOSTILE_QUERIES = [
    {"worker_id": "w", "content_types": "audio", "max_jobs": "1e9"},
    {"worker_id": "w", "content_types": "audio", "wait": "inf"},
    {"worker_id": "w", "content_types": "audio", "wait": "-1"},
    {"worker_id": "", "content_types": "audio"},
    {"worker_id": "w" * 500, "content_types": "audio"},
    {"content_types": "\x00"},
    {"limit": "0"}, {"limit": "x"}, {"cursor": "z" * 100}, {"status": "\u2603"},
]


@pytest.mark.parametrize("path", [f"{BASE}/poll", BASE])
def test_no_hostile_query_makes_a_500(client, keys, path):
    for query in HOSTILE_QUERIES:
        response = client.get(path, query_string=query, headers=auth(keys["admin"]))
        assert response.status_code < 500, (query, response.get_data(as_text=True))
        assert response.status_code == 200 or response.content_type == "application/problem+json"


def test_hostile_download_tokens_are_403(client, keys, producer):
    job_id = producer.create_id()
    for token in ["x", "a.b.c", "eyJ" * 100]:
        response = client.get(f"{BASE}/{job_id}/download", query_string={"token": token},
                              headers=auth(keys["worker"]))
        assert_problem(response, 403)


@pytest.mark.parametrize("query", [{"token": "t" * 3000}])
def test_malformed_download_queries_are_422(client, keys, producer, query):
    job_id = producer.create_id()
    response = client.get(f"{BASE}/{job_id}/download", query_string=query, headers=auth(keys["worker"]))
    assert_problem(response, 422)
