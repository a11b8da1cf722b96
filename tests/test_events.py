"""Completion events against a real HTTP receiver on a loopback port: signed, recorded before the
first attempt, retried until accepted, once per terminal state, never lost to a crash."""
from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from support.gunicorn import gunicorn
from morag_remote import create_app
from morag_remote.context import SERVICE
from morag_remote.context import events
from morag_remote.events.signing import signature, verify
from morag_remote.models import from_iso

SECRET = "receiver-shared-secret"


class Receiver:
    """A webhook receiver as the ingestion side would write one: it checks the signature itself
    (plain hmac, not the project's code), answers ``status``, and dedups by event id."""

    def __init__(self, secret: str = SECRET) -> None:
        self.secret = secret
        self.requests: list[dict[str, Any]] = []
        self.accepted: dict[str, dict] = {}
        self.status = 200
        self.extra_headers: dict[str, str] = {}
        self.hold: threading.Event | None = None
        self.server: ThreadingHTTPServer | None = None
        self.port = 0
        self.arrived = threading.Condition()

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                ts = self.headers.get("X-MoRAG-Timestamp", "")
                expected = "sha256=" + hmac.new(receiver.secret.encode(), ts.encode() + b"." + body,
                                                hashlib.sha256).hexdigest()
                verified = hmac.compare_digest(expected, self.headers.get("X-MoRAG-Signature", ""))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                          "verified": verified})
                if receiver.hold is not None:
                    receiver.hold.wait(10)
                status = receiver.status if verified else 401
                if 200 <= status < 300:
                    receiver.accepted.setdefault(self.headers["X-MoRAG-Event-Id"], json.loads(body))
                self.send_response(status)
                for name, value in receiver.extra_headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()
                with receiver.arrived:
                    receiver.arrived.notify_all()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for_accepted(self, count: int, timeout: float = 30) -> bool:
        with self.arrived:
            return self.arrived.wait_for(lambda: len(self.accepted) >= count, timeout)

    def events_of(self, job_id: str) -> list[dict]:
        return [e for e in self.accepted.values() if e["job_id"] == job_id]


@pytest.fixture
def receiver():
    r = Receiver().start()
    yield r
    if r.hold is not None:
        r.hold.set()
    r.stop()


@pytest.fixture
def app_config(request, receiver) -> dict[str, Any]:
    """Callbacks to the receiver; a test changes settings with ``parametrize(..., indirect=True)``."""
    config = {"CALLBACK_URL": f"{receiver.url}/morag/events", "CALLBACK_SECRET": SECRET,
              "CALLBACK_ALLOWED_PREFIXES": [f"{receiver.url}/hooks/"],
              "CALLBACK_PUMP_INTERVAL_SECONDS": 0}
    for name, value in getattr(request, "param", {}).items():
        config[name] = value.replace("{port}", str(receiver.port)) if isinstance(value, str) else value
    return config


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def finish(producer, worker, success: bool = True, **create: Any) -> tuple[str, Any]:
    job_id = producer.create_id(**create)
    claimed = worker.claim()
    assert claimed["job_id"] == job_id
    extra = {} if success else {"error_message": "decoder crashed", "retryable": False}
    return job_id, worker.result(job_id, success, **extra)


def database_env(app) -> dict[str, str]:
    """The app's database for a child process (nothing on the file store)."""
    url = app.config.get("DATABASE_URL")
    return {"MORAG_REMOTE_DATABASE_URL": url} if url else {}


def deliver(runner, *args: str) -> dict:
    result = runner.invoke(args=["remote-jobs", "deliver", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_completed_job_sends_a_signed_event_the_receiver_can_verify(producer, worker, receiver):
    job_id, result = finish(producer, worker, ingestion_task_id="ingest-7")
    assert result.json == {"status": "completed", "ingestion_continued": True}
    [request] = receiver.requests
    assert request["verified"]
    assert request["path"] == "/morag/events"
    headers, body = request["headers"], json.loads(request["body"])
    assert headers["Content-Type"] == "application/json"
    assert int(headers["X-MoRAG-Timestamp"]) > 0
    occurred_at = body.pop("occurred_at")
    assert from_iso(occurred_at) == from_iso(producer.get(job_id).json["completed_at"])
    assert body == {"event_id": headers["X-MoRAG-Event-Id"], "type": "job.completed", "job_id": job_id,
                    "ingestion_task_id": "ingest-7", "content_type": "audio", "status": "completed",
                    "error": None, "job_url": f"/api/v1/remote-jobs/{job_id}"}
    assert producer.get(f"{job_id}").json["result_data"]["content"] == "transcript"


def test_job_and_status_show_the_delivered_event(producer, worker, receiver):
    job_id, _ = finish(producer, worker)
    state = producer.get(job_id).json["event_delivery"]
    assert state["state"] == "delivered"
    assert state["attempts"] == 1
    assert state["last_error"] is None
    assert state["event_id"] == receiver.requests[0]["headers"]["X-MoRAG-Event-Id"]
    assert state["delivered_at"].endswith(("Z", "+00:00"))
    assert producer.status(job_id).json["event_delivery"]["state"] == "delivered"


def test_unfinished_job_has_no_event_delivery(producer, receiver):
    job_id = producer.create_id()
    assert producer.get(job_id).json["event_delivery"] is None
    assert receiver.requests == []


def test_receiver_down_then_up_event_arrives_after_deliver_exactly_once(producer, worker, receiver, runner):
    receiver.stop()  # nothing listens on the port now: connection refused
    job_id, result = finish(producer, worker)
    assert result.json == {"status": "completed", "ingestion_continued": False}
    state = producer.get(job_id).json["event_delivery"]
    assert state["state"] == "retrying"
    assert state["attempts"] == 1
    assert state["last_error"]

    receiver.start()  # back on the same port
    assert deliver(runner)["delivered"] == 1
    assert deliver(runner)["delivered"] == 0
    assert len(receiver.requests) == 1
    assert receiver.requests[0]["verified"]
    [event] = receiver.events_of(job_id)
    assert event["type"] == "job.completed"
    assert producer.get(job_id).json["event_delivery"]["state"] == "delivered"


def test_failed_attempt_is_retried_by_a_later_request_once_its_backoff_ends(producer, worker, receiver, clock,
                                                                            client):
    receiver.status = 503
    job_id, result = finish(producer, worker)
    assert result.json["ingestion_continued"] is False
    receiver.status = 200
    client.get("/health", buffered=True)  # backoff not over: the event is left alone
    assert len(receiver.requests) == 1
    clock.advance(11 * 60)
    client.get("/health", buffered=True)  # after the response: the due event is sent
    assert len(receiver.requests) == 2
    assert [r["verified"] for r in receiver.requests] == [True, True]
    first, second = (r["headers"]["X-MoRAG-Event-Id"] for r in receiver.requests)
    assert first == second
    assert producer.get(job_id).json["event_delivery"]["state"] == "delivered"


def test_backoff_doubles_with_each_failed_attempt_up_to_the_cap(producer, worker, receiver, clock, app):
    receiver.status = 500
    job_id, _ = finish(producer, worker)
    first = from_iso(producer.get(job_id).json["event_delivery"]["next_attempt_at"])
    assert 10 <= (first - clock.now).total_seconds() <= 11
    clock.advance(3600)
    with app.app_context():
        events().deliver_pending(due_only=True)
        assert 3600 <= events().backoff(50) <= 3960
    state = producer.get(job_id).json["event_delivery"]
    assert state["attempts"] == 2
    assert state["last_error"] == "HTTP 500"
    assert state["state"] == "retrying"
    assert 20 <= (from_iso(state["next_attempt_at"]) - clock.now).total_seconds() <= 22


def test_identical_result_resubmission_sends_no_second_event_and_answers_as_the_first(producer, worker, receiver):
    job_id, first = finish(producer, worker)
    assert first.json == {"status": "completed", "ingestion_continued": True}
    again = worker.result(job_id, True)
    assert again.status_code == 200
    assert again.json == first.json
    assert len(receiver.requests) == 1


def test_a_repeated_result_says_whether_the_event_has_been_accepted_since(producer, worker, receiver, clock, app):
    receiver.status = 500
    job_id, first = finish(producer, worker)
    assert first.json == {"status": "completed", "ingestion_continued": False}
    assert worker.result(job_id, True).json == first.json
    assert len(receiver.requests) == 1  # the repeat attempted nothing
    receiver.status = 200
    clock.advance(60)
    with app.app_context():
        assert events().deliver_pending(due_only=True).delivered == 1
    assert worker.result(job_id, True).json == {"status": "completed", "ingestion_continued": True}
    assert len(receiver.requests) == 2


def test_each_terminal_state_sends_its_own_event_once(producer, worker, receiver, runner):
    job_id, failed = finish(producer, worker, success=False)
    assert failed.json == {"status": "failed", "ingestion_continued": True}
    assert producer.retry(job_id).status_code == 200
    worker.claim()
    assert worker.result(job_id, True).json["ingestion_continued"] is True
    deliver(runner)
    types = sorted(e["type"] for e in receiver.events_of(job_id))
    assert types == ["job.completed", "job.failed"]
    assert len(receiver.requests) == 2
    failed_event = next(e for e in receiver.events_of(job_id) if e["type"] == "job.failed")
    assert failed_event["error"] == "decoder crashed"
    assert failed_event["status"] == "failed"


def test_failure_with_retries_left_sends_no_event(producer, worker, receiver):
    job_id = producer.create_id()
    worker.claim()
    response = worker.result(job_id, False, error_message="transient")
    assert response.json == {"status": "pending", "ingestion_continued": False}
    assert receiver.requests == []


def test_cancel_sends_a_cancelled_event(producer, receiver):
    job_id = producer.create_id()
    assert producer.cancel(job_id).status_code == 200
    [event] = receiver.events_of(job_id)
    assert event["type"] == "job.cancelled"
    assert event["status"] == "cancelled"


def test_lapsed_lease_without_retries_sends_a_timeout_event(producer, worker, worker2, receiver, clock):
    job_id = producer.create_id(max_retries=0)
    worker.claim()
    clock.advance(31 * 60)
    worker2.poll()  # polls handle lapsed leases
    [event] = receiver.events_of(job_id)
    assert event["type"] == "job.timeout"
    assert "lease expired" in event["error"]


def test_job_webhook_url_under_an_allowed_prefix_gets_the_event(producer, worker, receiver):
    job_id, result = finish(producer, worker, task_options={"webhook_url": f"{receiver.url}/hooks/job-1?x=1"})
    assert result.json["ingestion_continued"] is True
    [request] = receiver.requests
    assert request["path"] == "/hooks/job-1?x=1"
    assert request["verified"]


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data",
    "http://127.0.0.1:1/hooks/",
    "{base}/hooks",                      # the prefix is {base}/hooks/: one character short
    "{base}/other/hooks/",
    "ftp://example.com/hooks/",
    "http://user:pw@127.0.0.1/hooks/",
    "{base}/hooks/ x",
    "{base}/hooks/caf\u00e9",             # not ASCII: http.client cannot send it
    "",
    42,
])
def test_webhook_url_outside_the_allowed_prefixes_is_refused_at_create(producer, receiver, url):
    if isinstance(url, str):
        url = url.replace("{base}", receiver.url)
    response = producer.create(task_options={"webhook_url": url})
    assert response.status_code == 422
    assert "task_options.webhook_url" in response.json["errors"]
    assert producer.client.get("/api/v1/remote-jobs/", headers=producer.headers).json["jobs"] == []


@pytest.mark.parametrize("app_config", [{"CALLBACK_ALLOWED_PREFIXES": ["https://hooks.example"]}], indirect=True)
def test_a_host_prefix_does_not_match_a_longer_host_name(producer):
    assert producer.create(task_options={"webhook_url": "https://hooks.example.evil.net/x"}).status_code == 422
    assert producer.create(task_options={"webhook_url": "https://hooks.example@evil.net/x"}).status_code == 422
    assert producer.create(task_options={"webhook_url": "https://hooks.example/x"}).status_code == 201


@pytest.mark.parametrize("app_config", [{"CALLBACK_URL": None, "CALLBACK_ALLOWED_PREFIXES": []}], indirect=True)
def test_without_a_callback_nothing_is_recorded_and_webhooks_are_refused(producer, worker, runner, receiver):
    job_id, result = finish(producer, worker)
    assert result.json == {"status": "completed", "ingestion_continued": False}
    assert producer.get(job_id).json["event_delivery"] is None
    assert producer.create(task_options={"webhook_url": "http://127.0.0.1/hooks/"}).status_code == 422
    output = runner.invoke(args=["remote-jobs", "deliver"]).output
    assert "nothing to deliver" in output
    assert receiver.requests == []


@pytest.mark.parametrize("app_config, error", [
    ({"CALLBACK_URL": "http://127.0.0.1:{port}/morag/caf\u00e9"}, "UnicodeEncodeError"),
    ({"CALLBACK_URL": "127.0.0.1:{port}/morag/events"}, "bad callback URL"),
    ({"CALLBACK_URL": "http://[::1/morag/events"}, "bad callback URL"),
], indirect=["app_config"])
def test_a_callback_url_that_cannot_be_sent_is_a_failed_attempt_not_a_failed_request(producer, worker, receiver, error):
    job_id, result = finish(producer, worker)
    assert result.status_code == 200
    assert result.json == {"status": "completed", "ingestion_continued": False}
    assert producer.get(job_id).json["event_delivery"]["last_error"].startswith(error)
    assert producer.cancel(producer.create_id()).status_code == 200
    assert receiver.requests == []


class _BrokenListener:
    def job_finished(self, job):
        raise RuntimeError("listener bug")

    def job_leaving_terminal(self, job):
        pass

    def job_accepted(self, job):
        raise RuntimeError("listener bug")


def test_a_failing_listener_never_fails_the_committed_change(producer, worker, service, receiver):
    service.hooks.listeners.insert(0, _BrokenListener())
    job_id, result = finish(producer, worker)
    assert result.status_code == 200
    assert result.json == {"status": "completed", "ingestion_continued": True}
    cancelled = producer.create_id()
    assert producer.cancel(cancelled).status_code == 200
    assert [json.loads(r["body"])["status"] for r in receiver.requests] == ["completed", "cancelled"]


def test_redirects_are_not_followed(producer, worker, receiver):
    receiver.status = 307
    receiver.extra_headers = {"Location": "http://169.254.169.254/steal"}
    job_id, result = finish(producer, worker)
    assert result.json["ingestion_continued"] is False
    assert len(receiver.requests) == 1
    assert producer.get(job_id).json["event_delivery"]["last_error"] == "HTTP 307"


@pytest.mark.parametrize("app_config", [{"CALLBACK_READ_TIMEOUT_SECONDS": 0.2}], indirect=True)
def test_a_receiver_that_does_not_answer_in_time_is_a_failed_attempt(producer, worker, receiver):
    receiver.hold = threading.Event()
    job_id, result = finish(producer, worker)
    receiver.hold.set()
    assert result.json["ingestion_continued"] is False
    assert producer.get(job_id).json["event_delivery"]["last_error"] == "timed out"


# -- a crash between the job write and the event record ------------------------------------------

def _finish_in_a_process_that_dies_before_recording(config: dict, success: bool) -> None:
    """Child process: finish the pending job the way a request would, but with no listener run
    after the job write: the state a crash between the two writes leaves on disk."""
    from morag_remote.service import Caller

    service = create_app(config).extensions[SERVICE]
    service.hooks.listeners.clear()
    [job] = service.poll("w-crash", ["audio"], 1)
    extra = {"content": "x"} if success else {"error_message": "gpu fell off", "retryable": False}
    service.submit_result(job.id, Caller(lease_id=job.lease_id), success=success, **extra)
    os._exit(0)


@pytest.fixture
def crash_after_job_write(app, instance_path):
    def run(success: bool = True) -> None:
        config = {k: app.config[k] for k in ("CALLBACK_URL", "CALLBACK_SECRET", "CALLBACK_ALLOWED_PREFIXES",
                                             "DATABASE_URL")}
        config.update(TESTING=True, INSTANCE_PATH=str(instance_path), LOG_JSON=True)
        child = multiprocessing.get_context("fork").Process(
            target=_finish_in_a_process_that_dies_before_recording, args=(config, success))
        child.start()
        child.join(60)
        assert child.exitcode == 0
    return run


def test_event_lost_to_a_crash_after_the_job_write_is_recorded_and_sent_by_deliver(
        producer, receiver, runner, crash_after_job_write):
    job_id = producer.create_id()
    crash_after_job_write(success=True)
    assert producer.get(job_id).json["status"] == "completed"
    assert producer.get(job_id).json["event_delivery"] is None
    assert receiver.requests == []
    report = deliver(runner)
    assert report["reconciled"] == 1
    assert report["delivered"] == 1
    [event] = receiver.events_of(job_id)
    assert event["type"] == "job.completed"
    assert deliver(runner) == {"delivered": 0, "failed": 0, "reconciled": 0, "purged": 0, "pending": 0}


def test_retry_before_reconciliation_still_sends_the_event_of_the_state_it_left(
        producer, receiver, runner, crash_after_job_write):
    job_id = producer.create_id()
    crash_after_job_write(success=False)
    assert producer.retry(job_id).json["status"] == "pending"
    report = deliver(runner)
    assert report["delivered"] == 1
    assert report["reconciled"] == 0
    [event] = receiver.events_of(job_id)
    assert event["type"] == "job.failed"
    assert event["error"] == "gpu fell off"


def test_delete_before_reconciliation_still_sends_the_event(producer, receiver, runner, admin_headers,
                                                             crash_after_job_write):
    job_id = producer.create_id()
    crash_after_job_write(success=True)
    assert producer.client.delete(f"/api/v1/remote-jobs/{job_id}", headers=admin_headers).status_code == 204
    assert deliver(runner)["delivered"] == 1
    assert [e["type"] for e in receiver.events_of(job_id)] == ["job.completed"]


def test_cleanup_old_before_reconciliation_still_sends_the_event(producer, receiver, runner,
                                                                 crash_after_job_write):
    job_id = producer.create_id()
    crash_after_job_write(success=True)
    assert runner.invoke(args=["remote-jobs", "cleanup-old", "--days", "0"]).exit_code == 0
    assert producer.get(job_id).status_code == 404
    assert deliver(runner)["delivered"] == 1
    assert [e["type"] for e in receiver.events_of(job_id)] == ["job.completed"]


def test_retry_of_a_job_whose_event_was_delivered_sends_nothing_again(producer, worker, receiver, runner):
    job_id, _ = finish(producer, worker, success=False)
    producer.retry(job_id)
    deliver(runner)
    assert len(receiver.requests) == 1


# -- delivery runs ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_deliver_processes_at_once_send_each_event_once(producer, worker, receiver, instance_path, app):
    receiver.status = 503
    job_ids = []
    for _ in range(12):
        job_id, _ = finish(producer, worker)
        job_ids.append(job_id)
    receiver.requests.clear()
    receiver.status = 200
    env = dict(os.environ, MORAG_REMOTE_INSTANCE_PATH=str(instance_path),
               MORAG_REMOTE_CALLBACK_URL=app.config["CALLBACK_URL"], MORAG_REMOTE_CALLBACK_SECRET=SECRET,
               MORAG_REMOTE_LOG_JSON="true", **database_env(app))
    command = [sys.executable, "-m", "flask", "--app", "morag_remote", "remote-jobs", "deliver", "--json"]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              cwd=Path(__file__).parent.parent) for _ in range(2)]
    reports = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(r["delivered"] for r in reports) == 12
    assert len(receiver.requests) == 12
    assert sorted(e["job_id"] for e in receiver.accepted.values()) == sorted(job_ids)


@pytest.mark.slow
def test_under_gunicorn_a_failed_event_is_sent_after_a_later_response(receiver, instance_path, keys, producer, app):
    receiver.status = 503
    env = {"MORAG_REMOTE_CALLBACK_URL": receiver.url, "MORAG_REMOTE_CALLBACK_SECRET": SECRET,
           "MORAG_REMOTE_CALLBACK_RETRY_SECONDS": "0", "MORAG_REMOTE_CALLBACK_PUMP_INTERVAL_SECONDS": "0",
           **database_env(app)}
    source = producer.source("talk.mp3")
    with gunicorn(instance_path, env, workers=1) as base:
        p, w = ({"Authorization": f"Bearer {keys[role]}"} for role in ("producer", "worker"))
        job_id = requests.post(f"{base}/api/v1/remote-jobs/", headers=p, timeout=10, json={
            "source_file_path": str(source), "content_type": "audio", "ingestion_task_id": "i"}).json()["job_id"]
        requests.get(f"{base}/api/v1/remote-jobs/poll", headers=w, timeout=10,
                     params={"worker_id": "w1", "content_types": "audio"})
        result = requests.put(f"{base}/api/v1/remote-jobs/{job_id}/result", headers=w, timeout=30,
                              json={"success": True, "content": "text"})
        assert result.json() == {"status": "completed", "ingestion_continued": False}
        receiver.status = 200
        requests.get(f"{base}/health", timeout=10)
        assert receiver.wait_for_accepted(1)
        for _ in range(100):  # the sender marks the event delivered once it has read the 200
            state = requests.get(f"{base}/api/v1/remote-jobs/{job_id}", headers=p, timeout=10).json()
            if state["event_delivery"]["state"] == "delivered":
                break
            threading.Event().wait(0.05)
    assert [e["job_id"] for e in receiver.accepted.values()] == [job_id]
    assert state["event_delivery"]["state"] == "delivered"
    assert state["event_delivery"]["attempts"] >= 2


def test_deliver_stops_trying_a_failing_receiver_after_one_attempt(producer, worker, receiver, runner):
    receiver.status = 503
    for _ in range(3):
        finish(producer, worker)
    receiver.requests.clear()
    report = deliver(runner)
    assert report == {"delivered": 0, "failed": 1, "reconciled": 0, "purged": 0, "pending": 3}
    assert len(receiver.requests) == 1


def test_deliver_prints_counts_for_people(producer, worker, receiver, runner):
    receiver.status = 503
    finish(producer, worker)
    receiver.status = 200
    output = runner.invoke(args=["remote-jobs", "deliver"]).output
    assert output.strip() == "1 delivered, 0 failed, 0 reconciled, 0 pending"


@pytest.mark.parametrize("app_config", [{"CALLBACK_RETENTION_DAYS": 1}], indirect=True)
def test_delivered_events_are_purged_after_the_retention(producer, worker, receiver, runner, clock):
    job_id, _ = finish(producer, worker)
    assert producer.get(job_id).json["event_delivery"]["state"] == "delivered"
    clock.advance(2 * 86400)
    assert deliver(runner)["purged"] == 1
    assert producer.get(job_id).json["event_delivery"] is None


@pytest.mark.parametrize("app_config", [{"CALLBACK_SECRET": None}], indirect=True)
def test_without_a_secret_events_are_sent_unsigned(producer, worker, receiver):
    receiver.secret = ""
    finish(producer, worker)
    [request] = receiver.requests
    assert "X-MoRAG-Signature" not in request["headers"]
    assert request["headers"]["X-MoRAG-Event-Id"]


# -- the signature, as a Python receiver checks it ---------------------------------------------------

def test_verify_accepts_the_signature_the_sender_computes():
    body = b'{"event_id":"e1"}'
    expected = "sha256=" + hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature("k", 1700000000, body) == expected
    assert verify("k", "1700000000", body, expected, now=1700000100)


@pytest.mark.parametrize("secret, timestamp, body, now", [
    ("k", "1700000000", b'{"event_id":"e2"}', 1700000000),     # body changed
    ("other", "1700000000", b'{"event_id":"e1"}', 1700000000),  # wrong secret
    ("k", "1700000000", b'{"event_id":"e1"}', 1700000301),      # too old: a replay
    ("k", "soon", b'{"event_id":"e1"}', 1700000000),            # not a timestamp
])
def test_verify_refuses_tampered_foreign_or_stale_signatures(secret, timestamp, body, now):
    header = signature("k", 1700000000, b'{"event_id":"e1"}')
    assert not verify(secret, timestamp, body, header, now=now)


# -- bounds and settings ---------------------------------------------------------------------------

def test_a_later_request_makes_at_most_one_failed_attempt(producer, worker, receiver, clock, client):
    receiver.status = 503
    for _ in range(3):
        finish(producer, worker)
    clock.advance(3600)
    receiver.requests.clear()
    client.get("/health", buffered=True)
    assert len(receiver.requests) == 1


def test_deliver_attempts_no_more_than_its_limit(producer, worker, receiver, runner):
    receiver.status = 503
    finish(producer, worker)
    finish(producer, worker)
    receiver.status = 200
    assert deliver(runner, "--limit", "1")["pending"] == 1
    assert deliver(runner)["delivered"] == 1


def test_reconciliation_in_batches_reaches_every_job(producer, receiver, runner, app, crash_after_job_write):
    first, second = producer.create_id(), producer.create_id()
    crash_after_job_write()
    crash_after_job_write()
    with app.app_context():
        assert events().reconcile(limit=1) == 1
        assert events().reconcile(limit=1) == 1
        assert events().reconcile(limit=1) == 0
    deliver(runner)
    assert {e["job_id"] for e in receiver.accepted.values()} == {first, second}


@pytest.mark.parametrize("app_config", [{"CALLBACK_RETENTION_DAYS": 1}], indirect=True)
def test_retry_long_after_delivery_does_not_resend_a_purged_event(producer, worker, receiver, runner, clock):
    job_id, _ = finish(producer, worker, success=False)
    clock.advance(2 * 86400)
    assert deliver(runner)["purged"] == 1
    producer.retry(job_id)
    assert deliver(runner)["delivered"] == 0
    assert len(receiver.requests) == 1


@pytest.mark.parametrize("app_config", [{"CALLBACK_URL": None}], indirect=True)
def test_with_only_webhook_prefixes_a_job_without_a_webhook_sends_nothing(producer, worker, receiver):
    job_id, result = finish(producer, worker)
    assert result.json["ingestion_continued"] is False
    assert producer.get(job_id).json["event_delivery"] is None
    job_id, result = finish(producer, worker, task_options={"webhook_url": f"{receiver.url}/hooks/x"})
    assert result.json["ingestion_continued"] is True


@pytest.mark.parametrize("app_config", [{"CALLBACK_ALLOWED_PREFIXES": "http://127.0.0.1/hooks/"}], indirect=True)
def test_a_single_prefix_may_be_given_without_json_brackets(producer):
    assert producer.create(task_options={"webhook_url": "http://127.0.0.1/hooks/a"}).status_code == 201


@pytest.mark.parametrize("url", ["{base}/hooks/" + "a" * 2048, "http://127.0.0.1:port/hooks/"])
def test_overlong_or_malformed_webhook_urls_are_refused(producer, receiver, url):
    response = producer.create(task_options={"webhook_url": url.replace("{base}", receiver.url)})
    assert response.status_code == 422


@pytest.mark.parametrize("app_config, error", [
    ({"CALLBACK_URL": "https://127.0.0.1:{port}/x"}, "SSL"),  # the receiver speaks plain HTTP
    ({"CALLBACK_URL": "http://127.0.0.1:notaport/x"}, "bad callback URL"),
], indirect=["app_config"])
def test_a_misconfigured_callback_is_a_failed_attempt_with_its_reason(producer, worker, error):
    job_id, result = finish(producer, worker)
    assert result.json["ingestion_continued"] is False
    assert error in producer.get(job_id).json["event_delivery"]["last_error"]


@pytest.mark.files_only
def test_an_outbox_that_cannot_be_written_does_not_fail_the_result_and_is_caught_up_later(
        producer, worker, receiver, runner, client, app):
    pending = Path(app.config["JOBS_DATA_DIR"]) / "events" / "pending"
    job_id = producer.create_id()
    worker.claim()
    pending.rename(pending.with_name("pending-away"))
    pending.write_text("not a directory")  # every write into pending/ now fails
    try:
        result = worker.result(job_id, True)
        assert result.status_code == 200
        assert result.json == {"status": "completed", "ingestion_continued": False}
        assert client.get("/health", buffered=True).status_code == 200  # the pump fails quietly
    finally:
        pending.unlink()
        pending.with_name("pending-away").rename(pending)
    report = deliver(runner)
    assert report["reconciled"] == 1
    assert report["delivered"] == 1
    assert [e["type"] for e in receiver.events_of(job_id)] == ["job.completed"]


@pytest.mark.postgres
def test_an_event_table_that_refuses_writes_does_not_fail_the_result_and_is_caught_up_later(
        producer, worker, receiver, runner, client, pg_database):
    """The database's counterpart of the test above: the server cannot write the event (disk full)."""
    job_id = producer.create_id()
    worker.claim()
    with pg_database.connect() as conn:
        conn.execute("""CREATE FUNCTION refuse_event() RETURNS trigger LANGUAGE plpgsql AS $$
                        BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END $$""")
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON event_outbox "
                      "FOR EACH ROW EXECUTE FUNCTION refuse_event()")
        try:
            result = worker.result(job_id, True)
            assert result.status_code == 200
            assert result.json == {"status": "completed", "ingestion_continued": False}
            assert client.get("/health", buffered=True).status_code == 200  # the pump fails quietly
            assert producer.get(job_id).json["event_delivery"] is None
        finally:
            conn.execute("DROP TRIGGER refuse ON event_outbox")
            conn.execute("DROP FUNCTION refuse_event()")
    report = deliver(runner)
    assert report["reconciled"] == 1
    assert report["delivered"] == 1
    assert [e["type"] for e in receiver.events_of(job_id)] == ["job.completed"]


def test_each_backend_keeps_its_events_beside_its_jobs(producer, worker, receiver, app, backend):
    job_id, _ = finish(producer, worker)
    events_dir = Path(app.config["JOBS_DATA_DIR"]) / "events"
    with app.app_context():
        outbox = events().outbox
        state = events().delivery_state(events().store.get(job_id))
    assert type(outbox).__name__ == {"files": "FileOutbox", "postgres": "PostgresOutbox"}[backend]
    assert state["state"] == "delivered"
    assert events_dir.exists() == (backend == "files")


@pytest.mark.postgres
def test_any_host_reads_and_delivers_an_event_another_host_recorded(
        producer, worker, receiver, runner, app, app_config, tmp_path):
    """Two apps on one database with instance folders of their own: two API hosts."""
    receiver.stop()
    job_id, result = finish(producer, worker)
    assert result.json["ingestion_continued"] is False
    host_b = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / "host-b"), "LOG_JSON": True,
                         "DATABASE_URL": app.config["DATABASE_URL"], **app_config})
    b = host_b.test_client()
    seen_by_b = b.get(f"/api/v1/remote-jobs/{job_id}", headers=producer.headers).json["event_delivery"]
    assert seen_by_b["state"] == "retrying"
    assert seen_by_b["attempts"] == 1
    receiver.start()
    assert deliver(host_b.test_cli_runner())["delivered"] == 1
    assert deliver(runner)["delivered"] == 0
    assert len(receiver.requests) == 1
    assert [e["job_id"] for e in receiver.accepted.values()] == [job_id]
    assert producer.get(job_id).json["event_delivery"]["state"] == "delivered"
