"""structlog set-up and the per-request log line.

Configured once (the first app built in a process configures it); every line is key=value, JSON
lines unless in debug. A request id is bound per request (``X-Request-ID`` when the client sent a
sane one, else a new one) and echoed back. Each request is logged once: by the app
(``http.request``) or, under ``gunicorn.conf.py``, by the server once the body is sent
(``http.access``, see ``gunicorn_log.py``; that config turns ``REQUEST_LOG`` off). Nothing secret
is logged: headers and query strings are never logged, fields named like a secret are masked, and
:func:`redact_text` masks anything shaped like an API key, a ``token=`` parameter or a ``Bearer``
credential in every logged string (tracebacks included), and in the lines of stdlib loggers
(werkzeug's request lines under ``flask run``, gunicorn's under ``gunicorn_log.JsonLogger``).

Other libraries' records (psycopg_pool's warnings, werkzeug's lines) go through the root logger's
handler, whose formatter is structlog's (:func:`stdlib_formatter`): they come out in the same shape
as the app's own lines, one JSON object per line, an exception as the ``exception`` field.
"""
from __future__ import annotations

import functools
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
_SECRET_TEXT = re.compile(r"mrk_[A-Za-z0-9_-]+|(?<=token=)[^&\s\"'#]+|(?i:(?<=bearer ))[^\s\"']+")
REDACTED = "[redacted]"

log = structlog.get_logger("morag_remote.request")

# WSGI environ key: what the app learnt about a request (request id, worker id, job id), read by
# the server's access log after the response is sent.
ACCESS_CONTEXT = "morag_remote.access_context"


def redact_text(text: str) -> str:
    """``text`` with API keys, ``token=`` values and Bearer credentials replaced by ``[redacted]``."""
    return _SECRET_TEXT.sub(REDACTED, text)


@functools.lru_cache(maxsize=1024)
def _secret_name(name: str) -> bool:
    return name.lower() in _SECRET_KEYS


def _redact(_, __, event_dict: dict) -> dict:
    """Mask fields named like a secret, and secrets in every string value. The strings are searched
    once, joined: a secret in one of them is a match in the whole, and most lines have none."""
    strings = []
    for name, value in event_dict.items():
        if _secret_name(name):
            event_dict[name] = REDACTED
        elif isinstance(value, str):
            strings.append(value)
    if strings and _SECRET_TEXT.search("\x00".join(strings)):
        for name, value in event_dict.items():
            if isinstance(value, str):
                event_dict[name] = redact_text(value)
    return event_dict


class RedactFilter(logging.Filter):
    """The stdlib side of :func:`_redact`, for handlers that print other libraries' records."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def _stack_info(_, __, event_dict: dict) -> dict:
    """A stdlib record's ``stack_info`` (the text ``logging`` captured) as the field ``stack``."""
    stack = event_dict.pop("stack_info", None)
    if isinstance(stack, str):
        event_dict["stack"] = stack
    return event_dict


# What every line gets, structlog's own and other libraries' stdlib records alike: the request
# context, the level and the time; a stdlib record also its logger's name and its stack, if any.
_COMMON = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]
FOREIGN_PRE_CHAIN = [*_COMMON, structlog.stdlib.add_logger_name, _stack_info]
# Then, for every line: an exception becomes a field (``exception``, the traceback as one string,
# so a line is one JSON object and never a line followed by a traceback), and secrets are masked.
_FINISH = [structlog.processors.format_exc_info, _redact]


def renderer(json_lines: bool):
    return structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer(colors=False)


def stdlib_formatter(json_lines: bool = True, pre_chain: list | None = None) -> logging.Formatter:
    """A ``logging`` formatter that renders a stdlib record (psycopg_pool's, werkzeug's, gunicorn's)
    as structlog renders its own lines: one JSON object, traceback included, secrets masked."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=FOREIGN_PRE_CHAIN if pre_chain is None else pre_chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_FINISH, renderer(json_lines)],
    )


def configure_logging(json_lines: bool) -> None:
    """structlog's lines, and the root logger's handler for every library's stdlib records (unless
    someone configured the root logger before us: then their handlers stay, with our masking)."""
    global _configured
    if _configured:
        return
    _configured = True
    handler = logging.StreamHandler(sys.stderr)  # one write per record: message and newline together
    handler.setFormatter(stdlib_formatter(json_lines))
    logging.basicConfig(handlers=[handler], level=logging.INFO)
    for each in logging.getLogger().handlers:
        if not any(isinstance(f, RedactFilter) for f in each.filters):
            each.addFilter(RedactFilter())
    structlog.configure(
        processors=[*_COMMON, *_FINISH, renderer(json_lines)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        # One write per line: PrintLogger's print() writes the message and the newline separately, and
        # a stdlib handler's line (gunicorn's, a library's) on the same stream in another thread could
        # land between the two, joining two JSON objects on one line.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
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
        context = {"request_id": g.get("request_id"), "worker_id": g.get("worker_id"), "job_id": g.get("job_id")}
        request.environ[ACCESS_CONTEXT] = context  # for the server's access line (gunicorn_log.py)
        if app.config["REQUEST_LOG"]:
            started = g.get("started")
            duration_ms = round((time.perf_counter() - started) * 1000, 2) if started else None
            log.info("http.request", method=request.method, path=request.path, status=response.status_code,
                     duration_ms=duration_ms, **context)
        return response

    @app.teardown_request
    def _unbind(_exc: BaseException | None) -> None:
        structlog.contextvars.clear_contextvars()
