"""One structured line per request (method, path, status, duration_ms, request_id), and an
X-Request-ID echoed back or generated."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from support.actions import auth


@pytest.fixture
def logs():
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as captured:
        yield captured


def _request_lines(captured: list[dict]) -> list[dict]:
    return [entry for entry in captured if entry["event"] == "http.request"]


def test_each_request_logs_exactly_one_line_with_its_facts(client, logs):
    response = client.get("/health")
    lines = _request_lines(logs)
    assert len(lines) == 1
    line = lines[0]
    assert (line["method"], line["path"], line["status"]) == ("GET", "/health", 200)
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["request_id"] == response.headers["X-Request-ID"]
    assert line["log_level"] == "info"


def test_a_sane_incoming_request_id_is_echoed_and_logged(client, logs):
    response = client.get("/health", headers={"X-Request-ID": "trace-42.a_b"})
    assert response.headers["X-Request-ID"] == "trace-42.a_b"
    assert _request_lines(logs)[0]["request_id"] == "trace-42.a_b"


@pytest.mark.parametrize("incoming", ["", "has spaces", "x" * 65, "semi;colon", "<script>"])
def test_a_missing_or_unsafe_request_id_is_replaced_by_a_generated_one(client, logs, incoming):
    response = client.get("/health", headers={"X-Request-ID": incoming} if incoming else {})
    generated = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert _request_lines(logs)[0]["request_id"] == generated


def test_generated_request_ids_differ_between_requests(client):
    assert client.get("/health").headers["X-Request-ID"] != client.get("/health").headers["X-Request-ID"]


def test_errors_are_logged_with_their_status_and_request_id(client, logs):
    response = client.get("/nowhere", headers={"X-Request-ID": "r-404"})
    assert response.json["request_id"] == "r-404"
    line = _request_lines(logs)[0]
    assert (line["status"], line["path"], line["request_id"]) == (404, "/nowhere", "r-404")


def test_service_events_carry_the_request_id_of_the_request(client, logs, producer):
    response = producer.create()
    created = [e for e in logs if e["event"] == "job.created"]
    assert created and created[0]["request_id"] == response.headers["X-Request-ID"]
    assert created[0]["job_id"] == response.json["job_id"]


def test_poll_and_job_requests_log_the_worker_and_job(client, logs, producer, worker):
    job_id = producer.create_id()
    worker.poll()
    worker.result(job_id)
    lines = _request_lines(logs)
    assert lines[-2]["worker_id"] == "w1"
    assert lines[-1]["job_id"] == job_id


def test_no_key_appears_in_any_log_line(client, logs, keys, producer):
    producer.create()
    client.get("/api/v1/remote-jobs/", headers=auth(keys["admin"]))
    flat = repr(logs)
    for secret in keys.values():
        assert secret not in flat


def test_fields_named_like_secrets_are_redacted():
    from morag_remote.log import _redact

    assert _redact(None, None, {"event": "x", "token": "abc", "Authorization": "Bearer k", "job_id": "j"}) == \
        {"event": "x", "token": "[redacted]", "Authorization": "[redacted]", "job_id": "j"}


_INTERLEAVING = """
import logging, threading
import structlog
from morag_remote.log import configure_logging

configure_logging(json_lines=True)
app_log, library_log = structlog.get_logger("app"), logging.getLogger("library")

def run(thread):
    for n in range(1000):
        if n % 2:
            app_log.info("app.line", thread=thread, n=n)
        else:
            library_log.info("library.line")

threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_app_and_library_lines_from_many_threads_stay_one_json_object_per_line(tmp_path):
    """structlog's lines and stdlib handlers' lines share stderr: none may be cut by another's."""
    err = tmp_path / "stderr"
    with open(err, "wb") as fh:
        subprocess.run([sys.executable, "-c", _INTERLEAVING], stderr=fh, check=True, timeout=120,
                       cwd=Path(__file__).resolve().parent.parent)
    lines = err.read_text().splitlines()
    assert len(lines) == 8 * 1000
    events = [json.loads(line)["event"] for line in lines]
    assert events.count("app.line") == events.count("library.line") == 4000
