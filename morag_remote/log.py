"""structlog set-up and the per-request log line.

Configured once (the first app built in a process configures it); every line is key=value, JSON
lines unless in debug. A request id is bound per request (``X-Request-ID`` when the client sent a
sane one, else a new one) and echoed back. Nothing secret is logged: headers are never logged, and
``redact`` masks anything shaped like a key or a download token that a caller passes in by mistake.
"""
from __future__ import annotations

import logging
import re
import sys
import time
import uuid

import structlog
from flask import Flask, Response, g, request

_configured = False
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SECRET_KEYS = {"authorization", "token", "key", "api_key", "secret", "password"}

log = structlog.get_logger("morag_remote.request")


def _redact(_, __, event_dict: dict) -> dict:
    for name in list(event_dict):
        if name.lower() in _SECRET_KEYS:
            event_dict[name] = "[redacted]"
    return event_dict


def configure_logging(json_lines: bool) -> None:
    global _configured
    if _configured:
        return
    _configured = True
    logging.basicConfig(format="%(message)s", stream=sys.stderr, level=logging.INFO)
    renderer = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def init_request_logging(app: Flask) -> None:
    @app.before_request
    def _bind_request_id() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=g.request_id)

    @app.after_request
    def _log_request(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.get("request_id", "")
        started = g.get("started")
        duration_ms = round((time.perf_counter() - started) * 1000, 2) if started else None
        log.info("http.request", method=request.method, path=request.path, status=response.status_code,
                 duration_ms=duration_ms, worker_id=g.get("worker_id"), job_id=g.get("job_id"))
        return response

    @app.teardown_request
    def _unbind(_exc: BaseException | None) -> None:
        structlog.contextvars.clear_contextvars()
