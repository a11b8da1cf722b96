"""gunicorn's logs as JSON lines through structlog (``logger_class`` in ``gunicorn.conf.py``).

- The access log: one ``http.access`` line per request, written by gunicorn after the last byte of
  the body is sent, so a streamed download's line has its real duration and byte count. It carries
  what the app learnt about the request (request id, worker id, job id; see ``log.ACCESS_CONTEXT``)
  and the gunicorn process id. The query string is not logged: a download URL carries a token.
- gunicorn's own messages (boot, worker exits, timeouts): the same JSON shape, event = the message,
  with keys, tokens and Bearer credentials masked as in the app's own lines (``log.RedactFilter``);
  a traceback is the ``exception`` field of its line, never lines of its own.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from typing import Any

import structlog
from gunicorn.glogging import Logger

from .log import ACCESS_CONTEXT, RedactFilter, _redact, _stack_info, stdlib_formatter

ACCESS_FIELDS = ("method", "path", "status", "bytes", "duration_ms", "remote_addr", "user_agent",
                 "request_id", "worker_id", "job_id", "pid")

_PRE_CHAIN = [
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.stdlib.ExtraAdder(allow=ACCESS_FIELDS),  # only ours: a record carries other attributes
    _stack_info,
]


def json_formatter() -> logging.Formatter:
    """A stdlib formatter that renders every record as one JSON object (structlog's renderer), an
    exception as the ``exception`` field of that line (``Error handling request`` and the like)."""
    return stdlib_formatter(json_lines=True, pre_chain=_PRE_CHAIN)


class AccessFormatter(logging.Formatter):
    """The access line as :func:`json_formatter` renders it (same keys, same order, same masking),
    built directly: one line per request goes through here, and structlog's processor chain cost
    several times what the line itself does. A record it was not made for (one carrying an
    exception) goes through the full formatter."""

    def __init__(self) -> None:
        super().__init__()
        self._full = json_formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return self._full.format(record)
        stamp = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat()
        event = {"event": record.getMessage(), "level": record.levelname.lower(), "logger": record.name,
                 "timestamp": stamp.replace("+00:00", "Z")}
        extra = record.__dict__
        for key in ACCESS_FIELDS:
            if key in extra:
                event[key] = extra[key]
        return json.dumps(_redact(None, None, event))


class JsonLogger(Logger):
    """gunicorn's logger with JSON formatters on its handlers and a structured access line."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log, formatter in ((self.error_log, json_formatter), (self.access_log, AccessFormatter)):
            for handler in log.handlers:
                if getattr(handler, "_gunicorn", False):
                    handler.setFormatter(formatter())
                    handler.addFilter(RedactFilter())

    def access(self, resp: Any, req: Any, environ: dict, request_time: _dt.timedelta) -> None:
        if not self.access_log_enabled:
            return
        status = resp.status
        if isinstance(status, str):
            status = status.split(None, 1)[0]
        context = environ.get(ACCESS_CONTEXT) or {}
        fields = {  # the keys of ACCESS_FIELDS
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO"),
            "status": int(status) if str(status).isdigit() else status,
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 2),
            "remote_addr": environ.get("REMOTE_ADDR"),
            "user_agent": environ.get("HTTP_USER_AGENT"),
            "request_id": context.get("request_id"),
            "worker_id": context.get("worker_id"),
            "job_id": context.get("job_id"),
            "pid": os.getpid(),
        }
        log = self.access_log
        try:
            if log.isEnabledFor(logging.INFO):
                # log.info() minus its walk up the stack for the caller's file and line, which the
                # line does not show; the record is otherwise the one info() would make
                log.handle(log.makeRecord(log.name, logging.INFO, "(unknown file)", 0, "http.access", (), None,
                                          extra=fields))
        except Exception:  # pragma: no cover - gunicorn's own policy: a log failure never fails a request
            self.exception("access log failed")
