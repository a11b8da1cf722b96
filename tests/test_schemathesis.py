"""schemathesis against the app, from its own ``/openapi.json``: for every operation, at least 100
generated requests (valid and invalid ones), each sent with a key of a drawn role (or none, or a bad
one), and about half of those aimed at a real job in a drawn state (with its real lease id and
download token where the operation takes them), so the happy paths are fuzzed too, not only the 404s.

Every response must pass schemathesis's checks: no server error, a documented status code, a
documented content type, a body and headers that match the documented schemas.
"""
from __future__ import annotations

import hashlib
import random
import socket
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import schemathesis
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import SCHEMATHESIS_TEST_CASE_HEADER
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from werkzeug.exceptions import HTTPException, NotFound

from morag_remote import create_app
from morag_remote.config import DEFAULT_CONTENT_TYPES
from morag_remote.context import BLOBS, KEYS, SERVICE, TOKENS, UPLOADS
from morag_remote.api.http import Operation, operation_of
from morag_remote.service import Caller

pytestmark = pytest.mark.slow

EXAMPLES = 100
# tus chunks are raw bytes under their own media type
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
ROLES = ("worker", "worker_bound", "producer", "admin", None, "not-a-key")
STATES = ("pending", "processing", "completed", "failed", "cancelled", "deleted")
SOURCE = b"0123456789" * 100


class Fixtures:
    """Real jobs in every state, made on demand through the service (the way the API would)."""

    def __init__(self, app, sources: Path) -> None:
        self.service = app.extensions[SERVICE]
        self.tokens = app.extensions[TOKENS]
        self.uploads = app.extensions[UPLOADS]
        self.blobs = app.extensions[BLOBS]
        self.source = sources / "fixture.bin"
        self.source.write_bytes(SOURCE)
        self.count = 0

    def upload(self) -> str:
        return self.uploads.create(str(1024 * 1024), None, "fixture").id

    def job_with_artifact(self) -> str:
        out = self.job("processing")
        lease = out["lease_id"]
        stored = self.blobs.stage_artifact(out["job_id"], lease, "talk.srt", [b"subtitles"], 100)
        self.service.submit_result(out["job_id"], Caller(lease_id=lease), success=True, content="x",
                                   artifacts=[{**vars(stored), "attempt": lease}], artifacts_attempt=lease)
        return out["job_id"]

    def job(self, state: str) -> dict[str, Any]:
        """A new job in ``state``; its own content type, so no poll under test takes it by chance."""
        self.count += 1
        content_type = f"fixture-{self.count}"
        job = self.service.create(source_file_path=str(self.source), content_type=content_type,
                                  ingestion_task_id=f"fixture-{self.count}", max_retries=0)
        out: dict[str, Any] = {"job_id": job.id}
        if state == "cancelled":
            self.service.cancel(job.id)
        elif state == "deleted":
            self.service.delete(job.id)
        elif state != "pending":
            worker = "bound-worker" if self.count % 2 else "w-fixture"
            (claimed,) = self.service.poll(worker, [content_type])
            out["lease_id"] = claimed.lease_id
            out["token"] = self.tokens.issue(job.id, claimed.lease_id)
            if state in ("completed", "failed"):
                self.service.submit_result(job.id, Caller(lease_id=claimed.lease_id), success=state == "completed",
                                           content="text", error_message="boom", retryable=False)
        return out


def _documented_endpoints() -> list[str]:
    """The endpoints whose views are ``@documented`` (read at collection, from a throwaway app)."""
    with tempfile.TemporaryDirectory() as instance:
        app = create_app({"TESTING": True, "INSTANCE_PATH": instance, "LOG_JSON": True})
        return sorted(endpoint for endpoint, view in app.view_functions.items()
                      if isinstance(operation_of(view), Operation))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", params=["files", pytest.param("postgres", marks=pytest.mark.postgres)])
def live(request, tmp_path_factory):
    """One app per backend for the whole module (its jobs pile up, as on a server that has run a while)."""
    instance = tmp_path_factory.mktemp("schemathesis") / "instance"
    sources = instance / "sources"
    sources.mkdir(parents=True)
    receiver = f"http://127.0.0.1:{_closed_port()}/"
    config = {"TESTING": True, "INSTANCE_PATH": str(instance), "LOG_JSON": True,
              # long polls would make each example wait; the document states the bound it sets
              "POLL_MAX_WAIT_SECONDS": 0.05,
              # completion events on, to a receiver that refuses: jobs show a delivery state
              "CALLBACK_URL": receiver + "events", "CALLBACK_ALLOWED_PREFIXES": [receiver]}
    if request.param == "postgres":
        database = request.getfixturevalue("pg_database")
        database.truncate()
        config["DATABASE_URL"] = database.url
    app = create_app(config)
    store = app.extensions[KEYS]
    keys = {role: store.create(f"{role}-key", role)[1] for role in ("worker", "producer", "admin")}
    keys["worker_bound"] = store.create("w-bound", "worker", worker_id="bound-worker")[1]
    keys["not-a-key"] = "mrk_" + "x" * 43
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    return app, schema, keys, Fixtures(app, sources)


def _operations(schema, endpoint: str) -> list:
    """The endpoint's operations (looked up by id: schemathesis leaves /openapi.json out of its list)."""
    prefix = endpoint.replace(".", "_")
    ids = [op["operationId"] for item in schema.raw_schema["paths"].values() for op in item.values()
           if op["operationId"] == prefix or op["operationId"].startswith(prefix + "_")]
    assert ids, f"no operation of {endpoint} in the document"
    return [schema.find_operation_by_id(op_id) for op_id in sorted(ids)]


def _seeded(case) -> random.Random:
    headers = {k: v for k, v in case.headers.items() if k.lower() != SCHEMATHESIS_TEST_CASE_HEADER.lower()}
    text = repr((case.operation.label, case.path_parameters, case.query, sorted(headers.items()), case.body))
    return random.Random(hashlib.sha256(text.encode()).digest())


def _steer(case, rnd, keys: dict[str, str], fixtures: Fixtures) -> None:
    """Send a drawn role's key (mostly one that may call), and mostly aim the case at a real job in a
    drawn state, with its real lease id or download token half of the time.

    The choices come from a ``random.Random`` seeded with the case itself: hypothesis's own draws
    favour the first choice so strongly that most examples would go to one role and state, while a
    seed taken from the case spreads them and still gives a replayed case the same choices.
    """
    allowed = case.operation.definition.raw.get("x-required-roles")
    if allowed and rnd.random() < 0.75:
        role = rnd.choice(sorted({*allowed, "admin"} | ({"worker_bound"} if "worker" in allowed else set())))
    else:
        role = rnd.choice(ROLES)
    if role is None:
        case.headers.pop("Authorization", None)
    else:
        case.headers["Authorization"] = f"Bearer {keys[role]}"
    if "job_id" in case.path_parameters and rnd.random() < 0.75:
        # a worker's calls succeed only on a job being processed: aim at one half of the time
        held = allowed and "worker" in allowed and rnd.random() < 0.5
        job = fixtures.job("processing" if held else rnd.choice(STATES))
        case.path_parameters["job_id"] = job["job_id"]
        if "token" in job and rnd.random() < 0.5:
            if case.operation.method.upper() == "GET":
                case.query = {**(case.query or {}), "token": job["token"]}
            elif isinstance(case.body, dict):
                case.body["lease_id"] = job["lease_id"]
            else:
                case.headers["X-Lease-Id"] = job["lease_id"]
    if "content_type" in case.path_parameters and rnd.random() < 0.75:
        # the types routes (pause, resume, limit) succeed only for a configured content type
        case.path_parameters["content_type"] = rnd.choice(DEFAULT_CONTENT_TYPES)
    if isinstance(case.body, dict) and "ingestion_task_id" in case.body and rnd.random() < 0.5:
        # a create: a real source, given one way only (a generated upload id or sha256 is not one)
        case.body["source_file_path"] = str(fixtures.source)
        case.body.pop("source_upload_id", None)
        case.body.pop("source_sha256", None)
    if "upload_id" in case.path_parameters and rnd.random() < 0.75:
        case.path_parameters["upload_id"] = fixtures.upload()
        if case.operation.method.upper() == "PATCH" and rnd.random() < 0.6:
            case.headers.update({"Upload-Offset": "0", "Content-Type": "application/offset+octet-stream",
                                 "Tus-Resumable": "1.0.0"})
            case.headers.pop("Upload-Checksum", None)
            if not isinstance(case.body, (bytes, str)):
                case.body = b"tus chunk"
    if "name" in case.path_parameters and "job_id" in case.path_parameters and rnd.random() < 0.6:
        if case.operation.method.upper() == "GET":
            case.path_parameters["job_id"] = fixtures.job_with_artifact()
            case.path_parameters["name"] = "talk.srt"
        else:
            case.path_parameters["name"] = "talk.srt"
            case.headers.pop("Content-Digest", None)
    if case.operation.method.upper() == "POST" and case.operation.path.endswith("/uploads") and rnd.random() < 0.5:
        case.headers.update({"Upload-Length": str(rnd.randrange(0, 1000)), "Tus-Resumable": "1.0.0"})
        case.headers.pop("Upload-Metadata", None)


def _addresses(case, app, endpoint: str) -> bool:
    """Whether Flask routes the case to the operation under test. A generated path parameter can
    spell another route (``GET .../{job_id}`` with ``stats`` is ``GET .../stats``, which OpenAPI too
    matches before the template; a ``/`` in it makes another path): such a case tests another
    operation, against this one's document, so it is discarded rather than counted."""
    adapter = app.url_map.bind("localhost")
    try:
        routed, _ = adapter.match(unquote(case.formatted_path), method=case.method.upper())
    except NotFound:
        return True  # no route at all: the 404 this operation documents
    except HTTPException:  # 405 or a redirect: the path is another route's
        return False
    return routed == endpoint


@pytest.mark.parametrize("endpoint", _documented_endpoints())
def test_operation_conforms_to_its_document(live, endpoint):
    app, schema, keys, fixtures = live
    for operation in _operations(schema, endpoint):
        statuses: list[int] = []
        strategy = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                             operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            _steer(case, _seeded(case), keys, fixtures)
            if not _addresses(case, app, endpoint):
                reject()
            statuses.append(case.call_and_validate(checks=CHECKS).status_code)

        run()
        assert len(statuses) >= EXAMPLES, f"{operation.label}: only {len(statuses)} examples ran"
        success = operation_of(app.view_functions[endpoint]).success
        assert success in statuses, f"{operation.label}: never reached {success}; saw {Counter(statuses)}"
