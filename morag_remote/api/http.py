"""Request parsing and response writing shared by the blueprints: load once on the way in with a
schema, dump once on the way out, and the :func:`documented` decorator that names those schemas.

A view declares its operation once, next to its ``@requires``::

    @bp.get("/stats")
    @documented("Queue depth", tag="remote-jobs", response=schemas.StatsResponse)
    @requires(*ANY)
    def stats() -> Response:
        return respond(service().queue_summary())

``json_body()``, ``query_args()`` and ``respond()`` take their schemas from that declaration, and
``openapi.build_document`` reads the same one (as it reads ``required_roles``), so what a view
loads and dumps and what the document says it does cannot disagree. A schema that depends on the
app's settings is declared as a factory (called in an app context) rather than a class; both sides
call the same factory.
"""
from __future__ import annotations

import functools
import socket
import unicodedata
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Mapping, TypeVar
from urllib.parse import quote

from flask import Response, current_app, request
from marshmallow import Schema
from werkzeug.exceptions import BadRequest
from werkzeug.wsgi import wrap_file

from .. import jsonrules
from ..artifacts import repr_digest
from ..jsonrules import MAX_DOCUMENT_DEPTH
from ..sources import PIECE

SchemaSource = type[Schema] | Callable[[], Schema]
View = TypeVar("View", bound=Callable[..., Any])


@dataclass(frozen=True)
class Operation:
    """How one view is served and documented (``openapi.py`` says which errors are implied)."""

    summary: str
    tag: str
    description: str = ""
    query: SchemaSource | None = None       # query-string schema, loaded by query_args()
    body: SchemaSource | None = None        # JSON request body schema, loaded by json_body()
    body_required: bool = True              # False: an empty body loads as {}
    success: int = 200                      # respond()'s status unless the view names another
    response: SchemaSource | None = None    # JSON success body, dumped by respond()
    content: Mapping[str, dict] | None = None  # non-JSON success bodies: media type -> schema
    request_content: Mapping[str, dict] | None = None  # non-JSON request bodies: media type -> schema
    success_headers: Mapping[str, dict] = field(default_factory=dict)
    errors: tuple[int, ...] = ()            # beyond the implied ones
    headers: tuple[str, ...] = ()           # request headers, by name in openapi.HEADER_PARAMETERS
    extra_responses: Mapping[int, dict] = field(default_factory=dict)  # other statuses, in full


@dataclass(frozen=True)
class Hidden:
    """A route that is served but is not an operation of the API (the docs page's own files)."""

    reason: str


def documented(summary: str, tag: str, **details: Any) -> Callable[[View], View]:
    """View decorator: the view's :class:`Operation` (the view itself is returned unchanged)."""
    operation = Operation(summary, tag, **details)

    def decorator(view: View) -> View:
        view.operation = operation  # type: ignore[attr-defined]
        return view

    return decorator


def hidden(reason: str) -> Callable[[View], View]:
    """View decorator: served, but left out of the OpenAPI document, for ``reason``."""

    def decorator(view: View) -> View:
        view.operation = Hidden(reason)  # type: ignore[attr-defined]
        return view

    return decorator


def operation_of(view: Callable[..., Any]) -> Operation | Hidden | None:
    return getattr(view, "operation", None)


def resolve(source: SchemaSource) -> Schema:
    """The schema instance a source stands for (in an app context: a factory reads the settings)."""
    return schema(source) if isinstance(source, type) else source()


def _current_operation() -> Operation:
    operation = operation_of(current_app.view_functions[request.endpoint])
    if not isinstance(operation, Operation):
        raise LookupError(f"{request.endpoint} is not @documented")
    return operation


def _declared(kind: str) -> Schema:
    """The schema the current view declares as its ``query``, ``body`` or ``response``."""
    source = getattr(_current_operation(), kind)
    if source is None:
        raise LookupError(f"{request.endpoint} declares no {kind} schema in @documented")
    return resolve(source)


@functools.lru_cache(maxsize=256)
def schema(cls: type[Schema], **options: Any) -> Schema:
    """One shared instance per schema class and options (hashable: tuples, numbers). Building a
    marshmallow schema deep-copies its fields, which cost a hot request more than loading it;
    ``load`` and ``dump`` do not change the instance, so threads may share it."""
    return cls(**options)


def json_body() -> dict[str, Any]:
    """The request's JSON body loaded by the view's declared ``body`` schema: 400 when it is not a
    JSON object, 422 when invalid; an empty body loads as ``{}`` where the body is not required.

    The body is parsed here rather than with ``request.get_json``, which lets a deeply nested
    document escape as a RecursionError (a 500); nesting deeper than MAX_DOCUMENT_DEPTH is refused too,
    since every later dump and load of the job would have to survive it again.
    """
    loader = _declared("body")
    raw = request.get_data(cache=True)
    if not raw and not _current_operation().body_required:
        return loader.load({})
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
    return loader.load(payload)


def query_args() -> dict[str, Any]:
    """The query string loaded by the view's declared ``query`` schema (a repeated parameter keeps
    its first value)."""
    args = request.args.to_dict()
    jsonrules.refuse_nul(args)
    return _declared("query").load(args)


def respond(obj: Any, status: int | None = None) -> Response:
    """``obj`` dumped by the view's declared ``response`` schema, with its declared success status
    unless ``status`` names another one the view documents."""
    dumper = _declared("response")
    return current_app.response_class(current_app.json.dumps(dumper.dump(obj)),
                                      status=status or _current_operation().success,
                                      mimetype="application/json")


def client_gone() -> "ClientConnection | None":
    """A check of whether the caller of this request has hung up, or None where the server does not
    give the connection to the app (gunicorn does: ``gunicorn.socket``)."""
    sock = request.environ.get("gunicorn.socket")
    return None if sock is None else ClientConnection(sock)


class ClientConnection:
    """Called: whether the caller hung up. A peek that reads end of file (or a reset) means gone;
    pending bytes (a pipelined request) or none yet mean still there. ``fileno``: the socket, for
    the long polls to watch for a hang-up (``service/polling.py``) instead of asking."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def __call__(self) -> bool:
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except ValueError:  # a TLS socket takes no flags: cannot tell, so assume it is there
            return False
        except OSError:
            return True


def respond_file(fh: BinaryIO, size: int, mtime: float, name: str, *, etag: str | None = None,
                 sha256: str | None = None, body: Any = None) -> Response:
    """A streamed attachment with Content-Length, Last-Modified and Range (206) support; with
    ``etag`` an ETag (so ``If-Range`` can compare it), with ``sha256`` a ``Repr-Digest`` (RFC 9530,
    the whole file's digest, on a 206 too). ``body`` replaces the file wrapper (one that hashes what
    it sends), for a request without Range only."""
    # 1 MiB pieces: werkzeug's and gunicorn's default of 8 KiB made a GiB 131,072 reads and sends,
    # which bounded a download by the server's CPU
    response = current_app.response_class(body if body is not None else wrap_file(request.environ, fh, PIECE),
                                          mimetype="application/octet-stream", direct_passthrough=True)
    response.content_length = size
    response.last_modified = mtime
    response.headers.set("Content-Disposition", "attachment", **attachment_names(name))
    response.cache_control.no_store = True
    if etag is not None:
        response.set_etag(etag)
    if sha256 is not None:
        response.headers["Repr-Digest"] = repr_digest(sha256)
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
