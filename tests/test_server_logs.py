"""Production serving: gunicorn.conf.py's choices and hooks, and gunicorn's logs as JSON lines through
structlog, with the app's request id, worker id and job id on the access line."""
from __future__ import annotations

import json
import logging
import os
import runpy
import shutil
import stat
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
from gunicorn.config import Config
from structlog.testing import capture_logs

from support.gunicorn import ROOT, Gunicorn, make_keys
from morag_remote import metrics_location
from morag_remote.gunicorn_log import AccessFormatter, JsonLogger, json_formatter
from morag_remote.log import ACCESS_CONTEXT

CONF = str(ROOT / "gunicorn.conf.py")
API = "/api/v1/remote-jobs"


# -- gunicorn.conf.py ---------------------------------------------------------------------------

@pytest.fixture
def conf_env(monkeypatch, tmp_path):
    """The conf file sets defaults in os.environ: make sure the test leaves none behind, nor a
    metrics folder in shared memory."""
    for name in ("PROMETHEUS_MULTIPROC_DIR", "MORAG_REMOTE_REQUEST_LOG", "WEB_CONCURRENCY"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MORAG_REMOTE_INSTANCE_PATH", str(tmp_path / "instance"))
    yield tmp_path / "instance"
    shutil.rmtree(metrics_location.default_dir(str(tmp_path / "instance")), ignore_errors=True)


def test_conf_serves_with_threads_and_json_logs(conf_env):
    conf = runpy.run_path(CONF)
    assert conf["worker_class"] == "gthread" and conf["threads"] >= 16
    assert conf["workers"] == max(os.cpu_count() or 1, 2)
    assert conf["graceful_timeout"] > 20  # longer than the longest long poll
    assert conf["logger_class"] == "morag_remote.gunicorn_log.JsonLogger"
    assert conf["control_socket"] == str(conf_env / "gunicorn.ctl")


def test_conf_honours_web_concurrency(conf_env, monkeypatch):
    monkeypatch.setenv("WEB_CONCURRENCY", "5")
    assert runpy.run_path(CONF)["workers"] == 5


def test_conf_puts_metrics_files_in_shared_memory_and_turns_the_app_request_line_off(conf_env):
    runpy.run_path(CONF)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == metrics_location.default_dir(str(conf_env))
    if os.path.isdir("/dev/shm"):
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"].startswith(f"/dev/shm/morag-remote-{os.getuid()}-")
    assert os.environ["MORAG_REMOTE_REQUEST_LOG"] == "false"


def test_conf_keeps_a_metrics_dir_the_operator_chose(conf_env, monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "elsewhere"))
    conf = runpy.run_path(CONF)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path / "elsewhere")
    conf["on_starting"](None)
    assert (tmp_path / "elsewhere").is_dir()


def test_on_starting_empties_the_metrics_dir_of_its_own_files_only(conf_env):
    conf = runpy.run_path(CONF)
    prom = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    prom.mkdir(mode=0o700, parents=True)
    (prom / "counter_123.db").write_bytes(b"old run")
    (prom / "README").write_text("not ours")
    conf["on_starting"](None)
    assert sorted(p.name for p in prom.iterdir()) == ["README"]


def test_on_starting_creates_the_metrics_dir_private(conf_env):
    runpy.run_path(CONF)["on_starting"](None)
    prom = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert prom.is_dir() and stat.S_IMODE(prom.stat().st_mode) == 0o700


def test_child_exit_drops_live_gauges_and_keeps_counters(conf_env):
    conf = runpy.run_path(CONF)
    conf["on_starting"](None)
    prom = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    for name in ("gauge_livesum_4242.db", "counter_4242.db"):
        (prom / name).write_bytes(b"")
    conf["child_exit"](None, SimpleNamespace(pid=4242))
    assert sorted(p.name for p in prom.iterdir()) == ["counter_4242.db"]


# -- the JSON logger, in this process ------------------------------------------------------------

def _logger(**settings) -> JsonLogger:
    cfg = Config()
    for name, setting in {"accesslog": "-", "errorlog": "-", **settings}.items():
        cfg.set(name, setting)
    return JsonLogger(cfg)


def _access(logger: JsonLogger, **environ) -> None:
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": f"{API}/j1/download", "QUERY_STRING": "token=s3cr3t",
           "REMOTE_ADDR": "127.0.0.1", "HTTP_USER_AGENT": "gpu-worker/1.0", "SERVER_PROTOCOL": "HTTP/1.1",
           "RAW_URI": f"{API}/j1/download?token=s3cr3t", **environ}
    resp = SimpleNamespace(status="206 Partial Content", sent=4096, headers=[])
    logger.access(resp, SimpleNamespace(headers=[]), env, timedelta(seconds=2, microseconds=500000))


def test_access_line_is_json_with_the_app_context(capsys):
    _access(_logger(), **{ACCESS_CONTEXT: {"request_id": "r-1", "worker_id": "gpu-7", "job_id": "j1"}})
    [line] = capsys.readouterr().out.splitlines()
    entry = json.loads(line)
    assert {k: entry[k] for k in ("event", "logger", "level", "method", "path", "status", "bytes",
                                  "duration_ms", "remote_addr", "user_agent", "request_id", "worker_id",
                                  "job_id", "pid")} == {
        "event": "http.access", "logger": "gunicorn.access", "level": "info", "method": "GET",
        "path": f"{API}/j1/download", "status": 206, "bytes": 4096, "duration_ms": 2500.0,
        "remote_addr": "127.0.0.1", "user_agent": "gpu-worker/1.0", "request_id": "r-1", "worker_id": "gpu-7",
        "job_id": "j1", "pid": os.getpid()}
    assert entry["timestamp"].endswith("Z")


def test_access_line_is_what_the_structlog_formatter_renders(capsys):
    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, "http.access", (), None)
    record.__dict__.update(method="GET", path=f"{API}/mrk_inthepath/download", status=200, bytes=12,
                           duration_ms=1.5, remote_addr="127.0.0.1", user_agent="w", request_id="r-1",
                           worker_id=None, job_id="j1", pid=7, unrelated="not an access field")
    fast, full = AccessFormatter().format(record), json_formatter().format(record)
    assert "mrk_inthepath" not in fast and "unrelated" not in fast
    assert [(k, v) for k, v in json.loads(fast).items() if k != "timestamp"] == \
        [(k, v) for k, v in json.loads(full).items() if k != "timestamp"]


def test_an_access_record_carrying_an_exception_keeps_it():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("gunicorn.access", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "RuntimeError: boom" in json.loads(AccessFormatter().format(record))["exception"]


def test_access_line_never_carries_the_query_string(capsys):
    _access(_logger())
    assert "s3cr3t" not in capsys.readouterr().out


def test_access_line_of_a_request_the_app_never_saw_has_null_ids(capsys):
    _access(_logger())
    entry = json.loads(capsys.readouterr().out)
    assert (entry["request_id"], entry["worker_id"], entry["job_id"]) == (None, None, None)


def test_no_access_line_when_the_access_log_is_off(capsys):
    _access(_logger(accesslog=None))
    assert capsys.readouterr().out == ""


def test_gunicorn_messages_are_json_lines(capsys):
    _logger().info("Booting worker with pid: %s", 4242)
    entry = json.loads(capsys.readouterr().err)
    assert (entry["event"], entry["level"], entry["logger"]) == ("Booting worker with pid: 4242", "info",
                                                                 "gunicorn.error")


def test_gunicorn_messages_mask_keys_and_tokens(capsys):
    _logger().error("Invalid request from ip=1.2.3.4: GET /x?token=abc.def mrk_leakedkey")
    err = capsys.readouterr().err
    assert "abc.def" not in err and "mrk_leakedkey" not in err and "[redacted]" in err


# -- what the app hands to the server's access line -----------------------------------------------

@pytest.fixture
def server_environs(app) -> list[dict]:
    """The WSGI environ of each request as the server holds it after the app returned (as gunicorn
    reads it for the access line)."""
    seen: list[dict] = []
    inner = app.wsgi_app

    def server(environ, start_response):
        try:
            return inner(environ, start_response)
        finally:
            seen.append(environ)

    app.wsgi_app = server
    return seen


def test_the_app_leaves_request_and_worker_ids_in_the_environ_for_the_access_line(worker, server_environs):
    response = worker.client.get(f"{API}/poll", query_string={"worker_id": "w1", "content_types": "audio"},
                                 headers={**worker.headers, "X-Request-ID": "req-42"})
    assert response.status_code == 200
    context = server_environs[-1][ACCESS_CONTEXT]
    assert (context["request_id"], context["worker_id"]) == ("req-42", "w1")


def test_the_app_leaves_the_job_id_in_the_environ_for_the_access_line(producer, worker, server_environs):
    job_id = producer.create_id()
    worker.claim("audio")
    assert worker.result(job_id).status_code == 200
    assert server_environs[-1][ACCESS_CONTEXT]["job_id"] == job_id


def test_the_app_logs_each_request_itself_by_default(client):
    with capture_logs() as logs:
        client.get("/health")
    assert [e["path"] for e in logs if e["event"] == "http.request"] == ["/health"]


@pytest.mark.parametrize("app_config", [{"REQUEST_LOG": False}])
def test_the_app_leaves_the_request_line_to_the_server_when_told(client):
    with capture_logs() as logs:
        response = client.get("/health")
    assert response.status_code == 200 and response.headers["X-Request-ID"]
    assert not [e for e in logs if e["event"] == "http.request"]


# -- a real gunicorn -------------------------------------------------------------------------------

@pytest.mark.slow
def test_gunicorn_logs_one_json_access_line_per_request_with_request_worker_and_job_ids(tmp_path):
    instance = tmp_path / "instance"
    (instance / "sources").mkdir(parents=True)
    keys = make_keys(instance)
    source = instance / "sources" / "talk.mp3"
    source.write_bytes(b"\x00audio" * 1000)
    server = Gunicorn(instance, workers=2).start()

    def call(method: str, path: str, role: str, request_id: str, **kwargs) -> requests.Response:
        response = requests.request(method, server.url(path), timeout=30, **kwargs, headers={
            "Authorization": f"Bearer {keys[role]}", "X-Request-ID": request_id})
        assert response.status_code < 300, response.text
        return response

    try:
        job_id = call("POST", f"{API}/", "producer", "req-create", json={
            "source_file_path": str(source), "content_type": "audio", "ingestion_task_id": "t"}).json()["job_id"]
        polled = call("GET", f"{API}/poll", "worker", "req-poll",
                      params={"worker_id": "gpu-7", "content_types": "audio"}).json()
        call("GET", polled["source_file_url"], "worker", "req-download")
        call("PUT", f"{API}/{job_id}/result", "worker", "req-result", json={"success": True, "content": "x"})
    finally:
        server.stop()

    stdout, stderr = server.stdout_path.read_text(), server.stderr_path.read_text()
    assert all(json.loads(line) for line in (stdout + stderr).splitlines() if line.strip())  # machine-readable
    access = {e["request_id"]: e for e in map(json.loads, stdout.splitlines()) if e["event"] == "http.access"}
    assert {rid: (e["method"], e["status"], e["worker_id"], e["job_id"]) for rid, e in access.items()
            if rid.startswith("req-")} == {
        "req-create": ("POST", 201, None, None),
        "req-poll": ("GET", 200, "gpu-7", None),
        "req-download": ("GET", 200, None, job_id),
        "req-result": ("PUT", 200, None, job_id),
    }
    assert access["req-download"]["bytes"] == source.stat().st_size
    assert {e["pid"] for e in access.values()} <= set(server.booted_pids())
    assert "token=" not in stdout
    app_events = [json.loads(line)["event"] for line in stderr.splitlines()]
    assert "job.claimed" in app_events and "http.request" not in app_events  # one line per request
