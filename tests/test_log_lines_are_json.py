"""Every log line is one JSON object: structlog's own lines, other libraries' stdlib records
(psycopg_pool's warnings, anything logged through ``logging``) and gunicorn's, an exception being
the ``exception`` field of its line and never lines of its own, secrets masked in all of them."""
from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from gunicorn.config import Config

from support.gunicorn import Gunicorn, wait_for
from morag_remote.gunicorn_log import JsonLogger
from morag_remote.log import stdlib_formatter

REPO = Path(__file__).resolve().parent.parent
SECRET_KEY = "mrk_s3cretKEYvalue_0123456789"


def _json_lines(text: str) -> list[dict]:
    """Each line of ``text`` parsed; fails naming the first line that is not one JSON object."""
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"a log line is not JSON: {line!r}\nin:\n{text}") from None
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


_THIRD_PARTY = f"""
import logging, structlog
from morag_remote.log import configure_logging

configure_logging(json_lines={{json_lines}})
pool = logging.getLogger("psycopg.pool")
try:
    try:
        raise ConnectionRefusedError("connection to server failed\\n\\tIs the server running?")
    except ConnectionRefusedError as exc:
        raise RuntimeError("pool broken while holding {SECRET_KEY} and token=abc.def") from exc
except RuntimeError:
    pool.exception("error connecting in %r: %s", "pool-1", "line one\\nline two")
pool.warning("discarding broken connection: %s", "<conn>", stack_info=True)
structlog.get_logger("app").info("app.line", n=1)
"""


def _run(json_lines: bool) -> str:
    done = subprocess.run([sys.executable, "-c", _THIRD_PARTY.format(json_lines=json_lines)], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stderr


def test_a_third_party_record_with_a_traceback_is_one_json_line_with_the_traceback_inside():
    err = _run(json_lines=True)
    lines = _json_lines(err)
    assert len(lines) == 3, err
    error, warning, app = lines
    assert (error["logger"], error["level"]) == ("psycopg.pool", "error")
    assert error["event"] == "error connecting in 'pool-1': line one\nline two"
    assert error["timestamp"].endswith("Z")
    trace = error["exception"]
    assert trace.startswith("Traceback (most recent call last):")
    assert "ConnectionRefusedError: connection to server failed" in trace
    assert "The above exception was the direct cause" in trace and "RuntimeError: pool broken" in trace
    # secrets are masked in the traceback as in the message
    assert SECRET_KEY not in err and "abc.def" not in err and "[redacted]" in trace
    # a record's stack_info is a field as well
    assert (warning["logger"], warning["level"]) == ("psycopg.pool", "warning")
    assert warning["stack"].startswith("Stack (most recent call last):")
    assert "exception" not in warning
    # structlog's own lines keep their shape, next to the library's
    assert (app["event"], app["n"], app["level"]) == ("app.line", 1, "info")


def test_in_development_a_third_party_record_is_rendered_by_the_console_renderer():
    err = _run(json_lines=False)
    first = err.splitlines()[0]
    assert not first.startswith("{")
    assert "error connecting in 'pool-1'" in first and "[error" in first and "psycopg.pool" in err
    assert "RuntimeError: pool broken" in err and SECRET_KEY not in err
    assert "app.line" in err


def test_the_formatter_renders_a_foreign_record_as_structlog_renders_its_own():
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = logging.LogRecord("some.library", logging.ERROR, __file__, 1, "failed %s", ("x",), sys.exc_info())
    [line] = stdlib_formatter().format(record).splitlines()
    entry = json.loads(line)
    assert entry["event"] == "failed x" and entry["logger"] == "some.library" and entry["level"] == "error"
    assert entry["exception"].endswith("ValueError: bad\nvalue")
    # the record itself is untouched: another handler may still format it its own way
    assert record.exc_info is not None and record.args == ("x",)


def test_a_gunicorn_error_log_traceback_is_one_json_line(capsys):
    cfg = Config()
    cfg.set("errorlog", "-")
    cfg.set("accesslog", "-")
    logger = JsonLogger(cfg)
    try:
        raise OSError(f"Bearer {SECRET_KEY} broke")
    except OSError:
        logger.exception("Error handling request %s", "/api/v1/remote-jobs/poll")
    logger.access(type("R", (), {"status": "500 Internal Server Error", "sent": 0, "headers": []})(),
                  type("Q", (), {"headers": []})(), {"REQUEST_METHOD": "GET", "PATH_INFO": "/x"}, timedelta(0))
    captured = capsys.readouterr()
    [line] = _json_lines(captured.err)
    assert line["event"] == "Error handling request /api/v1/remote-jobs/poll"
    assert line["logger"] == "gunicorn.error" and line["level"] == "error"
    assert "Traceback (most recent call last):" in line["exception"] and "OSError" in line["exception"]
    assert SECRET_KEY not in captured.err
    [access] = _json_lines(captured.out)
    assert access["event"] == "http.access" and access["status"] == 500


# -- a real gunicorn ------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


class _AnyHealth(Gunicorn):
    """Started once /health answers at all: without its database it answers 503."""

    def _healthy(self) -> bool:
        import requests

        try:
            return requests.get(self.url("/health"), timeout=10).status_code in (200, 503)
        except requests.ConnectionError:
            return False


@pytest.mark.slow
def test_a_gunicorn_worker_whose_database_is_down_logs_only_json_lines(tmp_path):
    """psycopg_pool's warnings (multi-line messages) and the worker's warm-up failure (with its
    traceback) on a real gunicorn worker's stderr: every line one JSON object."""
    import requests

    url = f"postgresql://postgres:{SECRET_KEY}@127.0.0.1:{_closed_port()}/nowhere"
    server = _AnyHealth(tmp_path / "instance", workers=1,
                        env={"MORAG_REMOTE_DATABASE_URL": url, "MORAG_REMOTE_DATABASE_TIMEOUT": "1"})
    try:
        server.start()
        assert requests.get(server.url("/health"), timeout=10).status_code == 503
        wait_for(lambda: "store warm-up failed" in server.stderr(), 30, "the warm-up failure")
        wait_for(lambda: server.stderr().count('"psycopg.pool"') >= 2, 30, "psycopg_pool's warnings")
    finally:
        server.stop()
    err = server.stderr()
    entries = _json_lines(err)
    pool = [e for e in entries if e.get("logger") == "psycopg.pool"]
    assert pool and all(e["level"] == "warning" for e in pool)
    assert any("Connection refused" in e["event"] and "\n" in e["event"] for e in pool)  # one line all the same
    [warm_up] = [e for e in entries if e["event"].startswith("store warm-up failed")]
    assert warm_up["logger"] == "gunicorn.error" and warm_up["level"] == "warning"
    assert warm_up["exception"].startswith("Traceback (most recent call last):")
    assert SECRET_KEY not in err
    assert any(e["event"].startswith("Booting worker") for e in entries)
    assert not any("exited with code" in e["event"] or "was sent" in e["event"] for e in entries)
