"""Request parsing and response writing shared by the blueprints: load once on the way in with a
schema, dump once on the way out."""
from __future__ import annotations

import functools
import unicodedata
from typing import Any, BinaryIO
from urllib.parse import quote

from flask import Response, current_app, request
from marshmallow import Schema
from werkzeug.exceptions import BadRequest
from werkzeug.wsgi import wrap_file

from .. import jsonrules
from ..jsonrules import MAX_DOCUMENT_DEPTH


@functools.lru_cache(maxsize=256)
def schema(cls: type[Schema], **options: Any) -> Schema:
    """One shared instance per schema class and options (hashable: tuples, numbers). Building a
    marshmallow schema deep-copies its fields, which cost a hot request more than loading it;
    ``load`` and ``dump`` do not change the instance, so threads may share it."""
    return cls(**options)


def json_body(schema: Schema, allow_empty: bool = False) -> dict[str, Any]:
    """The request's JSON body loaded by ``schema``: 400 when it is not a JSON object, 422 when invalid.

    The body is parsed here rather than with ``request.get_json``, which lets a deeply nested
    document escape as a RecursionError (a 500); nesting deeper than MAX_DOCUMENT_DEPTH is refused too,
    since every later dump and load of the job would have to survive it again.
    """
    raw = request.get_data(cache=True)
    if allow_empty and not raw:
        return schema.load({})
    try:
        payload = jsonrules.loads(raw)
    except RecursionError:
        raise BadRequest("the request body nests arrays or objects too deeply") from None
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("the request body must be a JSON object")
    if jsonrules.depth(payload, MAX_DOCUMENT_DEPTH) > MAX_DOCUMENT_DEPTH:
        raise BadRequest(f"the request body is nested deeper than {MAX_DOCUMENT_DEPTH} levels")
    jsonrules.refuse_nul(payload)
    return schema.load(payload)


def query_args(schema: Schema) -> dict[str, Any]:
    """The query string loaded by ``schema`` (a repeated parameter keeps its first value)."""
    args = request.args.to_dict()
    jsonrules.refuse_nul(args)
    return schema.load(args)


def respond(schema: Schema, obj: Any, status: int = 200) -> Response:
    return current_app.response_class(current_app.json.dumps(schema.dump(obj)), status=status,
                                      mimetype="application/json")


def respond_file(fh: BinaryIO, size: int, mtime: float, name: str) -> Response:
    """A streamed attachment with Content-Length, Last-Modified and Range (206) support."""
    response = current_app.response_class(wrap_file(request.environ, fh),
                                          mimetype="application/octet-stream", direct_passthrough=True)
    response.content_length = size
    response.last_modified = mtime
    response.headers.set("Content-Disposition", "attachment", **attachment_names(name))
    response.cache_control.no_store = True
    try:
        return response.make_conditional(request.environ, accept_ranges=True, complete_length=size)
    except BaseException:  # an unsatisfiable Range (416): the file is not sent, so close it now
        response.close()
        raise


def attachment_names(name: str) -> dict[str, str]:
    """Content-Disposition's name parameters for a file name (RFC 6266), which HTTP headers can carry
    whatever the name holds: ``filename`` in printable ASCII (accents dropped, other characters and
    control characters as ``_``) and, when that is not the name, ``filename*`` with the name's UTF-8
    percent-encoded; not for a name that is not UTF-8 (its bytes name no characters)."""
    plain = "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))
    plain = "".join(c if " " <= c <= "~" else "_" for c in plain)
    names = {"filename": plain}
    if plain != name:
        try:
            names["filename*"] = "UTF-8''" + quote(name.encode("utf-8"), safe="!#$&+-.^_`|~")
        except UnicodeEncodeError:  # surrogate escapes of bytes that are not UTF-8
            pass
    return names
