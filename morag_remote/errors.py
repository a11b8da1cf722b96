"""Every error this API returns is RFC 9457 problem details (``application/problem+json``):
``{"type", "title", "status", "detail", "request_id"}``, plus ``errors: {field: [messages]}`` for
validation. Views raise (a ServiceError, a marshmallow ValidationError, a werkzeug HTTPException);
this module alone turns them into responses. A crash inside the server is a 500 in the same shape,
without a traceback.
"""
from __future__ import annotations

from typing import Any

import structlog
from flask import Flask, Response, current_app, g, json
from marshmallow import ValidationError
from werkzeug.exceptions import HTTPException, InternalServerError, RequestEntityTooLarge

from .exceptions import ServiceError

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger(__name__)


def problem(status: int, title: str, detail: str, **extra: Any) -> Response:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    request_id = g.get("request_id") if g else None
    if request_id:
        body["request_id"] = request_id
    response = Response(json.dumps(body), status=status, mimetype=PROBLEM_JSON)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="morag-remote"'
    return response


def _flatten(messages: Any) -> dict[str, list[str]]:
    """marshmallow's nested messages as {field: [message, ...]} (nested keys dotted)."""
    if isinstance(messages, list):
        return {"_schema": [str(m) for m in messages]}
    out: dict[str, list[str]] = {}
    for key, value in messages.items():
        if isinstance(value, dict):
            for sub, msgs in _flatten(value).items():
                out[f"{key}.{sub}"] = msgs
        else:
            out[str(key)] = [str(m) for m in (value if isinstance(value, list) else [value])]
    return out


def handle_validation(exc: ValidationError) -> Response:
    errors = _flatten(exc.messages)
    fields_named = ", ".join(sorted(errors))
    return problem(422, "Validation failed", f"invalid fields: {fields_named}", errors=errors)


def handle_service(exc: ServiceError) -> Response:
    response = problem(exc.status_code, exc.title, exc.detail, **exc.extra)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def handle_http(exc: HTTPException) -> Response:
    code = exc.code or 500
    detail = exc.description or exc.name
    if isinstance(exc, RequestEntityTooLarge):
        limit = current_app.config.get("MAX_CONTENT_LENGTH")
        detail = (f"the request body is larger than the {limit} bytes this server accepts "
                  "(MORAG_REMOTE_MAX_CONTENT_LENGTH)")
    response = problem(code, exc.name, detail)
    # The headers werkzeug attaches to the error (Allow on 405, Content-Range on 416, ...) belong
    # to the problem response too; only its HTML content type does not.
    for name, value in exc.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def handle_unexpected(exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        return handle_http(exc)
    log.exception("request.crashed", error_type=type(exc).__name__)
    return problem(500, InternalServerError().name, "the server failed to handle the request")


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(ValidationError, handle_validation)
    app.register_error_handler(ServiceError, handle_service)
    app.register_error_handler(HTTPException, handle_http)
    app.register_error_handler(Exception, handle_unexpected)
