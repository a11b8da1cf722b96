"""Nothing secret in logs: API keys, download tokens, lease ids and the Authorization header never
appear in what the service logs, in-process or from a real gunicorn + ``flask`` CLI run."""
from __future__ import annotations

import http.client
import logging
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import structlog

from support.actions import auth
from morag_remote.log import RedactFilter, redact_text

J = "/api/v1/remote-jobs"
REPO = Path(__file__).resolve().parent.parent
SECRET = b"TOP-SECRET: bytes that live outside every source root"


def assert_nothing_secret(log: str, secret_values: list[str]) -> None:
    assert secret_values and all(secret_values)
    for value in secret_values:
        assert value not in log, f"a secret ({value[:6]}...) is in the log"
    lowered = log.lower()
    assert "authorization" not in lowered
    assert "bearer" not in lowered


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


def test_full_cycle_logs_no_key_token_lease_id_or_authorization_header(app, client, log_output, instance_path):
    cli = app.test_cli_runner()
    keys = {}
    for role in ("admin", "producer", "worker"):
        result = cli.invoke(args=["keys", "create", "--role", role, "--name", f"{role}-1"])
        keys[role] = result.stdout.splitlines()[-1]
        assert keys[role] not in result.stderr
    source = instance_path / "sources" / "talk.mp3"
    source.write_bytes(b"audio" * 100)
    created = client.post(f"{J}/", headers=auth(keys["producer"]), json={
        "source_file_path": str(source), "content_type": "audio", "ingestion_task_id": "cycle"})
    job_id = created.json["job_id"]
    polled = client.get(f"{J}/poll", query_string={"worker_id": "w1", "content_types": "audio"},
                        headers=auth(keys["worker"])).json
    url = polled["source_file_url"]
    lease_id = polled["jobs"][0]["lease_id"]
    assert client.get(url, headers=auth(keys["worker"])).status_code == 200
    assert client.post(f"{J}/{job_id}/heartbeat", json={"lease_id": lease_id, "progress": 0.5},
                       headers=auth(keys["worker"])).status_code == 200
    assert client.put(f"{J}/{job_id}/result", json={"success": True, "content": "text", "lease_id": lease_id},
                      headers=auth(keys["worker"])).status_code == 200
    # the failure paths log too
    unknown = "mrk_" + secrets.token_urlsafe(32)
    assert client.get(f"{J}/stats", headers=auth(unknown)).status_code == 401
    assert client.get(url + "x", headers=auth(keys["worker"])).status_code == 403
    assert client.get(url, headers=auth(keys["worker"])).status_code == 409
    assert client.post(f"{J}/{job_id}/heartbeat", headers={**auth(keys["worker"]), "X-Lease-Id": lease_id},
                       json={}).status_code == 409
    assert client.get(f"{J}/{job_id}", headers=auth(keys["producer"])).status_code == 200

    log = log_output.getvalue()
    assert log.count('"http.request"') == 10 and '"key.created"' in log  # the capture saw it all
    assert_nothing_secret(log, [*keys.values(), unknown, token_of(url), token_of(url).rsplit(".", 1)[-1], lease_id])


def test_unexpected_error_is_a_problem_500_and_its_log_carries_no_key(app, client, keys, log_output):
    def boom():
        raise RuntimeError(f"failed while holding {keys['admin']} with Bearer {keys['worker']}")

    app.add_url_rule("/boom-for-test", view_func=boom)
    response = client.get("/boom-for-test", headers=auth(keys["admin"]))
    assert response.status_code == 500
    assert response.mimetype == "application/problem+json"
    assert response.json["title"] == "Internal Server Error"
    assert keys["admin"] not in response.get_data(as_text=True)
    log = log_output.getvalue()
    assert "request.crashed" in log and "Traceback" in log and "[redacted]" in log
    assert keys["admin"] not in log and keys["worker"] not in log


def test_fields_named_like_a_secret_are_masked(log_output):
    structlog.get_logger("test").info("test.event", token="t0ken-value", api_key="k3y-value", note="plain")
    log = log_output.getvalue()
    assert "t0ken-value" not in log and "k3y-value" not in log
    assert '"token": "[redacted]"' in log and '"note": "plain"' in log


def test_redact_text_masks_keys_tokens_and_bearer_credentials():
    line = ('"GET /api/v1/remote-jobs/j/download?token=.eJw.abc.def&x=1 HTTP/1.1" 200 '
            'Authorization: Bearer mrk_abcDEF123_- and mrk_Another-Key')
    redacted = redact_text(line)
    assert "eJw" not in redacted and "mrk_" not in redacted and "abcDEF" not in redacted
    assert "x=1" in redacted and "/api/v1/remote-jobs/j/download" in redacted


def test_stdlib_records_pass_through_the_redact_filter():
    record = logging.LogRecord("werkzeug", logging.INFO, __file__, 1,
                               '"GET %s HTTP/1.1" 200', ("/x/download?token=abc.def.ghi",), None)
    assert RedactFilter().filter(record) is True
    assert record.getMessage() == '"GET /x/download?token=[redacted] HTTP/1.1" 200'


# -- a real server: gunicorn and the flask CLI, as `make run` starts them ----------------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flask(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flask", "--app", "morag_remote", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


class Server:
    def __init__(self, tmp: Path) -> None:
        self.instance = tmp / "instance"
        (self.instance / "sources").mkdir(parents=True)
        (tmp / "outside").mkdir()
        (tmp / "outside" / "secret.txt").write_bytes(SECRET)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "MORAG_REMOTE_INSTANCE_PATH": str(self.instance), "HOST": "127.0.0.1",
                    "PORT": str(self.port), "WEB_CONCURRENCY": "1", "GUNICORN_THREADS": "4"}
        self.env.pop("MORAG_REMOTE_AUTH_DISABLED", None)
        self.cli_output: list[str] = []
        self.log_path = tmp / "gunicorn.log"
        self.log_file = None
        self.process: subprocess.Popen | None = None

    def flask(self, *args: str) -> subprocess.CompletedProcess:
        done = _flask(self.env, *args)
        assert done.returncode == 0, done.stderr
        self.cli_output.append(done.stderr)
        return done

    def start(self) -> None:
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                                        cwd=REPO, env=self.env, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_path.read_text()
            try:
                if requests.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                time.sleep(0.05)
        raise AssertionError("gunicorn did not answer /health within 60 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self.log_file is not None:
            self.log_file.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") + "".join(self.cli_output)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("served"))
    boot = srv.flask("keys", "bootstrap-admin")  # what `make run` does first
    srv.admin_key_line = boot.stdout
    srv.admin_key = (srv.instance / "admin-key.txt").read_text().strip()
    srv.keys = {"admin": srv.admin_key}
    for role in ("producer", "worker"):
        srv.keys[role] = srv.flask("keys", "create", "--role", role, "--name", f"{role}-1").stdout.splitlines()[-1]
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_make_run_bootstrap_says_where_the_admin_key_is_in_one_line_and_never_shows_it(server):
    path = server.instance / "admin-key.txt"
    assert server.admin_key_line.strip().splitlines() == [
        f"created an admin API key; it is in {path} (readable by you only)"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert server.admin_key not in server.admin_key_line and server.admin_key not in server.log()
    assert requests.delete(f"{server.base}{J}/nope", headers=auth(server.admin_key), timeout=10).status_code == 404


@pytest.mark.slow
def test_served_full_cycle_logs_no_key_token_lease_id_or_authorization_header(server):
    keys = server.keys
    source = server.instance / "sources" / "talk.mp3"
    source.write_bytes(b"\x00audio\xff" * 1000)
    with requests.Session() as s:
        created = s.post(f"{server.base}{J}", headers=auth(keys["producer"]), timeout=10, json={
            "source_file_path": str(source), "content_type": "audio", "ingestion_task_id": "served"})
        assert created.status_code == 201
        job_id = created.json()["job_id"]
        polled = s.get(f"{server.base}{J}/poll", params={"worker_id": "w1", "content_types": "audio"},
                       headers=auth(keys["worker"]), timeout=10).json()
        url = server.base + polled["source_file_url"]
        lease_id = polled["jobs"][0]["lease_id"]
        downloaded = s.get(url, headers=auth(keys["worker"]), timeout=10)
        assert downloaded.content == source.read_bytes()
        assert s.post(f"{server.base}{J}/{job_id}/heartbeat", json={"progress": 0.5},
                      headers=auth(keys["worker"]), timeout=10).status_code == 200
        assert s.put(f"{server.base}{J}/{job_id}/result", json={"success": True, "content": "text"},
                     headers=auth(keys["worker"]), timeout=10).status_code == 200
        unknown = "mrk_" + secrets.token_urlsafe(32)
        assert s.get(f"{server.base}{J}/stats", headers=auth(unknown), timeout=10).status_code == 401
        assert s.get(url + "x", headers=auth(keys["worker"]), timeout=10).status_code == 403
        assert s.get(url, headers=auth(keys["worker"]), timeout=10).status_code == 409
    log = server.log()
    assert '"http.access"' in log and '"key.created"' in log  # the capture saw the server and the CLI
    assert_nothing_secret(log, [*keys.values(), unknown, token_of(url), lease_id])


RAW_PATHS = [
    "/api/v1/remote-jobs/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd/download",
    "/api/v1/remote-jobs/%2e%2e%2f%2e%2e%2f%2e%2e%2foutside%2fsecret.txt/download",
    "/api/v1/remote-jobs/../../../../etc/passwd/download",
    "/api/v1/remote-jobs/%2e%2e/%2e%2e/%2e%2e/etc/passwd/download",
    "/api/v1/remote-jobs/..%252F..%252Fetc%252Fpasswd/download",
    "/api/v1/remote-jobs/..%5c..%5c..%5cetc%5cpasswd/download",
    "/api/v1/remote-jobs/%2Fetc%2Fpasswd/download",
    "/api/v1/remote-jobs/..%00/download",
    "/api/v1/remote-jobs/..;/..;/etc/passwd/download",
    "/api/v1/remote-jobs//etc/passwd/download",
    "/../../../../etc/passwd",
    "/api/v1/remote-jobs/x/download/../../../../../../etc/passwd",
]


@pytest.mark.slow
@pytest.mark.parametrize("raw_path", RAW_PATHS)
def test_served_percent_encoded_traversal_serves_nothing_outside(server, raw_path):
    """Sent byte for byte (http.client does not normalise), as an attacker would."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", raw_path, headers=auth(server.admin_key))
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    assert SECRET not in body and b"root:x:0:0" not in body
    assert response.status in (400, 403, 404, 405), (response.status, body[:200])
