"""Request parsing and response writing shared by the blueprints: load once on the way in with a
schema, dump once on the way out."""
from __future__ import annotations

from typing import Any, BinaryIO

from flask import Response, current_app, request
from marshmallow import Schema
from werkzeug.exceptions import BadRequest
from werkzeug.wsgi import wrap_file


def json_body(schema: Schema, allow_empty: bool = False) -> dict[str, Any]:
    """The request's JSON body loaded by ``schema``: 400 when it is not JSON, 422 when invalid."""
    if allow_empty and not request.get_data(cache=True):
        payload: Any = {}
    else:
        try:
            payload = request.get_json(force=True, silent=True)
        except RecursionError:  # json raises it, not ValueError, for very deep nesting
            raise BadRequest("the request body nests arrays or objects too deeply") from None
        if payload is None:
            raise BadRequest("the request body must be a JSON object")
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    return schema.load(payload)


def query_args(schema: Schema) -> dict[str, Any]:
    """The query string loaded by ``schema`` (a repeated parameter keeps its last value)."""
    return schema.load(request.args.to_dict())


def respond(schema: Schema, obj: Any, status: int = 200) -> Response:
    return current_app.response_class(current_app.json.dumps(schema.dump(obj)), status=status,
                                      mimetype="application/json")


def respond_file(fh: BinaryIO, size: int, mtime: float, name: str) -> Response:
    """A streamed attachment with Content-Length, Last-Modified and Range (206) support."""
    response = current_app.response_class(wrap_file(request.environ, fh),
                                          mimetype="application/octet-stream", direct_passthrough=True)
    response.content_length = size
    response.last_modified = mtime
    response.headers.set("Content-Disposition", "attachment", filename=name)
    response.cache_control.no_store = True
    return response.make_conditional(request.environ, accept_ranges=True, complete_length=size)
