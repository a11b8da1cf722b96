"""The schemas ``/openapi.json`` names for each operation are the ones its view loads and dumps.

For every documented operation, one successful request is made at the documented path and method
while ``marshmallow.Schema.load`` and ``dump`` record which schema instances the request used (the
outermost call only: a nested schema is part of its parent). The test then checks, operation by
operation, that the view loaded exactly the query or body schema its ``@documented`` declares and
dumped exactly the declared response schema (the very instances, so a schema the view built with
other options than the document, such as other webhook prefixes, fails too), and that the document
names those classes and the query string's fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import marshmallow
import pytest

from morag_remote.api.http import Operation, documented, operation_of, resolve, respond
from morag_remote.context import BLOBS, SERVICE, TOKENS, UPLOADS
from morag_remote.service import Caller

CALLBACK_PREFIX = "http://receiver.example/"


@pytest.fixture
def app_config() -> dict[str, Any]:
    return {"CALLBACK_ALLOWED_PREFIXES": [CALLBACK_PREFIX]}


@dataclass(frozen=True)
class Call:
    """How to call one operation so that it succeeds."""

    role: str | None
    job: str | None = None                  # state of the job in the path: pending, claimed, cancelled
    query: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    token: bool = False                     # the claim's download token in the query
    lease_in_body: bool = False             # the claim's lease id in the body
    lease_in_header: bool = False           # the claim's lease id as X-Lease-Id
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes | None = None               # a raw body (uploads, artifacts)
    upload: bool = False                    # a fresh upload in the path


POLL = {"worker_id": "w1", "content_types": "audio", "max_jobs": 1}

# by operationId; a new operation fails test_every_operation_has_a_call until it is added here
CALLS: dict[str, Call] = {
    "health_health": Call(None),
    "metrics_metrics": Call("worker"),
    "docs_openapi_json": Call(None),
    "docs_page": Call(None),
    "stats_stats": Call("worker"),
    "remote_jobs_create_job": Call("producer", body={
        "content_type": "audio", "ingestion_task_id": "documented",
        "task_options": {"webhook_url": CALLBACK_PREFIX + "hook"}}),
    "remote_jobs_list_jobs": Call("producer", query={"limit": 5}),
    "remote_jobs_poll_get": Call("worker", job="pending", query=POLL),
    "remote_jobs_poll_post": Call("worker", job="pending", body=POLL),
    "remote_jobs_download": Call("worker", job="claimed", token=True),
    "remote_jobs_heartbeat": Call("worker", job="claimed", body={"progress": 0.5}, lease_in_body=True),
    "remote_jobs_submit_result": Call("worker", job="claimed", body={"success": True, "content": "text"},
                                      lease_in_body=True),
    "remote_jobs_job_status": Call("worker", job="pending"),
    "remote_jobs_get_job": Call("producer", job="pending"),
    "remote_jobs_cancel_job": Call("producer", job="pending"),
    "remote_jobs_retry_job": Call("producer", job="cancelled"),
    "remote_jobs_delete_job": Call("admin", job="pending"),
    "remote_jobs_release": Call("worker", job="claimed", body={}, lease_in_body=True),
    "workers_list_workers": Call("producer"),
    "uploads_create_upload": Call("producer", headers={"Upload-Length": "10"}),
    "uploads_upload_status": Call("producer", upload=True),
    "uploads_patch_upload": Call("producer", upload=True, data=b"0123456789",
                                 headers={"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}),
    "uploads_delete_upload": Call("producer", upload=True),
    "remote_jobs_put_artifact": Call("worker", job="claimed", data=b"subtitles", lease_in_header=True),
    "remote_jobs_get_artifact": Call("producer", job="with_artifact"),
    "types_pause": Call("admin"),
    "types_resume": Call("admin"),
    "types_limit": Call("admin", body={"max_processing": 3}),
}


class Recorder:
    """The schema instances that ``load`` and ``dump`` were called on, outermost calls only."""

    def __init__(self) -> None:
        self.loaded: list[marshmallow.Schema] = []
        self.dumped: list[marshmallow.Schema] = []
        self._depth = 0

    def wrap(self, original, into: list[marshmallow.Schema]):
        def method(schema: marshmallow.Schema, *args: Any, **kwargs: Any) -> Any:
            if self._depth == 0:
                into.append(schema)
            self._depth += 1
            try:
                return original(schema, *args, **kwargs)
            finally:
                self._depth -= 1

        return method


def _documented_operations(document: dict) -> dict[str, tuple[str, str, dict]]:
    return {operation["operationId"]: (path, method, operation)
            for path, item in document["paths"].items() for method, operation in item.items()}


def _ref_name(media: dict | None) -> str | None:
    if not media:
        return None
    ref = media.get("application/json", {}).get("schema", {}).get("$ref")
    return ref.rsplit("/", 1)[-1] if ref else None


@pytest.fixture
def document(client) -> dict:
    return client.get("/openapi.json").json


def _job(app, source, state: str) -> tuple[str, str | None]:
    service = app.extensions[SERVICE]
    job = service.create(source_file_path=str(source), content_type="audio", ingestion_task_id="documented")
    if state == "claimed":
        (claimed,) = service.poll("w1", ["audio"], 1)
        assert claimed.id == job.id
        return job.id, claimed.lease_id
    if state == "cancelled":
        service.cancel(job.id)
    if state == "with_artifact":
        (claimed,) = service.poll("w1", ["audio"], 1)
        stored = app.extensions[BLOBS].stage_artifact(job.id, claimed.lease_id, "talk.srt", [b"subs"], 100)
        service.submit_result(job.id, Caller(lease_id=claimed.lease_id), success=True, content="x",
                              artifacts=[{**vars(stored), "attempt": claimed.lease_id}],
                              artifacts_attempt=claimed.lease_id)
    return job.id, None


def test_every_operation_has_a_call(document):
    assert sorted(_documented_operations(document)) == sorted(CALLS)


@pytest.mark.parametrize("operation_id", sorted(CALLS))
def test_the_view_loads_and_dumps_the_schemas_the_document_names(
        operation_id, app, client, keys, instance_path, document, monkeypatch):
    path, method, documented = _documented_operations(document)[operation_id]
    call = CALLS[operation_id]
    source = instance_path / "sources" / "documented.bin"
    source.write_bytes(b"documented source bytes")
    query, body = dict(call.query), dict(call.body) if call.body is not None else None
    if body is not None and "content_type" in body:
        body["source_file_path"] = str(source)
    if call.job:
        job_id, lease_id = _job(app, source, call.job)
        path = path.replace("{job_id}", job_id).replace("{name}", "talk.srt")
        if call.token:
            query["token"] = app.extensions[TOKENS].issue(job_id, lease_id)
        if call.lease_in_body:
            body["lease_id"] = lease_id
    if call.upload:
        path = path.replace("{upload_id}", app.extensions[UPLOADS].create("10", None, "documented").id)
    path = path.replace("{content_type}", "video")
    headers = {"Authorization": f"Bearer {keys[call.role]}"} if call.role else {}
    headers.update(call.headers)
    if call.lease_in_header:
        headers["X-Lease-Id"] = lease_id

    recorder = Recorder()
    with monkeypatch.context() as patch:
        patch.setattr(marshmallow.Schema, "load", recorder.wrap(marshmallow.Schema.load, recorder.loaded))
        patch.setattr(marshmallow.Schema, "dump", recorder.wrap(marshmallow.Schema.dump, recorder.dumped))
        extra = {"data": call.data} if call.data is not None else {"json": body}
        response = client.open(path, method=method.upper(), query_string=query, headers=headers, **extra)
    assert 200 <= response.status_code < 300, response.get_data(as_text=True)[:300]

    endpoint, _ = app.url_map.bind("localhost").match(path, method=method.upper())
    operation = operation_of(app.view_functions[endpoint])
    assert isinstance(operation, Operation)
    declared_in = operation.query if method == "get" else operation.body
    with app.app_context():
        expect_loaded = [resolve(declared_in)] if declared_in is not None else []
        expect_dumped = [resolve(operation.response)] if operation.response is not None else []
    assert [id(s) for s in recorder.loaded] == [id(s) for s in expect_loaded], recorder.loaded
    assert [id(s) for s in recorder.dumped] == [id(s) for s in expect_dumped], recorder.dumped

    if method == "get":
        names = {p["name"] for p in documented["parameters"] if p.get("in") == "query"}
        loads = {f.data_key or n for s in recorder.loaded for n, f in s.fields.items() if not f.dump_only}
        assert names == loads
    else:
        request_body = documented.get("requestBody", {}).get("content")
        assert _ref_name(request_body) == (type(recorder.loaded[0]).__name__ if recorder.loaded else None)
    success = documented["responses"][str(response.status_code)].get("content")
    assert _ref_name(success) == (type(recorder.dumped[0]).__name__ if recorder.dumped else None)


def test_create_is_documented_and_loaded_with_the_configured_webhook_prefixes(app):
    operation = operation_of(app.view_functions["remote_jobs.create_job"])
    with app.app_context():
        loader = resolve(operation.body)
    assert loader.webhook_prefixes == (CALLBACK_PREFIX,)
    assert loader.allowed_content_types == tuple(app.config["CONTENT_TYPES"])


def test_a_view_that_does_not_declare_its_schemas_fails_loudly(app):
    app.add_url_rule("/undeclared", "undeclared", lambda: respond({}))
    app.add_url_rule("/no-response", "no_response",
                     documented("No response schema", tag="test")(lambda: respond({})))
    for path, message in (("/undeclared", "is not @documented"), ("/no-response", "declares no response")):
        with app.test_request_context(path), pytest.raises(LookupError, match=message):
            app.view_functions[app.url_map.bind("localhost").match(path)[0]]()
