"""The OpenAPI 3 document of this API, generated from the marshmallow schemas with apispec.

Each view documents itself: ``@documented`` (``api/http.py``) puts an :class:`~.api.http.Operation`
on it (summary, query and body schemas, success status and schema, the errors it can answer), and
the view's ``json_body()``, ``query_args()`` and ``respond()`` take their schemas from that same
declaration. Everything else is read from the app, so it cannot disagree with what is served: the
paths and methods come from ``app.url_map`` (``<job_id>`` becomes ``{job_id}``), the roles from the
``required_roles`` that ``auth.requires`` puts on each view (and ``public_if``, a config test under
which the view is served without a key), and the bounds and choices from the schemas built with
the app's settings. ``tests/test_openapi.py`` fails when a route is not documented.

A route is described once: where an endpoint serves a path with and without a trailing slash, the
path without it is documented and the other named in its description. Views marked ``@hidden``
(the docs page's own files) are served but are not operations of the API, so they are left out.

The errors every operation shares are implied rather than listed: a key is needed (401), a role is
needed that not every key has (403), a body is parsed (400 malformed JSON, 413 too large, 422
invalid), a query string is parsed (422), a path names a job (404). Every error is
``application/problem+json`` (``schemas.ProblemSchema``), every response carries ``X-Request-ID``.

Schemas that the views dump as a success body are *complete*: ``respond()`` writes every field of
them every time, so the document marks every property required; with marshmallow's default
``unknown = RAISE`` apispec closes them (``additionalProperties: false``), so a field a view
started to send without declaring it is caught by the schemathesis run.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Iterable

import marshmallow
import structlog
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin, OpenAPIConverter
from apispec.ext.marshmallow.common import resolve_schema_cls
from flask import Flask
from werkzeug.routing import AnyConverter, IntegerConverter, Rule, UnicodeConverter

from . import schemas
from .api.http import Hidden, Operation, SchemaSource, operation_of, resolve
from .version import __version__
from .auth import ROLES

log = structlog.get_logger(__name__)

OPENAPI_VERSION = "3.0.3"
PROBLEM_JSON = "application/problem+json"
SECURITY_SCHEME = "bearerAuth"
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"  # what log.py echoes back; anything else is replaced
IGNORED_METHODS = frozenset({"HEAD", "OPTIONS"})

API_DESCRIPTION = (
    "The remote job queue that hands MoRAG's heavy conversions to GPU workers. Producers create jobs "
    "and read their results; workers poll, download the source file, send heartbeats and submit a "
    "result; every call but `/health`, `/openapi.json` and `/docs` needs `Authorization: Bearer <key>`. "
    "Errors are RFC 9457 problem details (`application/problem+json`).")

_REQUEST_ID = {"X-Request-ID": "X-Request-ID"}

def _header(name: str, description: str, **schema: object) -> dict:
    """An optional request header's parameter object: a string, constrained by ``schema``."""
    return {"in": "header", "name": name, "required": False, "description": description,
            "schema": {"type": "string", **schema}}


_TOKEN = r"^[\x21-\x7e]{1,255}$"
_DIGITS = r"^\d{1,20}$"
HEADER_PARAMETERS: dict[str, dict] = {header["name"]: header for header in (
    _header("X-Lease-Id", "The lease id of the attempt the caller works on (from the poll response); fences "
            "a stale worker.", maxLength=64),
    _header("Idempotency-Key", "Makes a retried create safe: the same key and body give the same job.",
            pattern=_TOKEN),
    _header("Range", "Resume a download: `bytes=first-[last]` (RFC 9110); answered with 206, or 416 when no "
            "byte of it exists."),
    _header("Upload-Length", "tus: the upload's whole length in bytes.", pattern=_DIGITS),
    _header("Upload-Metadata", "tus: comma-separated `key base64value` pairs (`filename`, `sha256`)."),
    _header("Upload-Offset", "tus: where this chunk starts (the upload's current offset).", pattern=_DIGITS),
    _header("Upload-Checksum", "tus checksum: `<sha256|sha1|md5> <base64 digest>` of this chunk."),
    _header("Tus-Resumable", "tus: the protocol version, `1.0.0`."),
    _header("Content-Digest", "`sha-256=:<base64>:` of the body (RFC 9530), checked."),
)}

_ERROR_TITLES = {
    400: ("BadRequest", "The request body is not a JSON object."),
    401: ("Unauthorized", "No valid API key (`Authorization: Bearer <key>`)."),
    403: ("Forbidden", "The key may not do this."),
    404: ("NotFound", "No such job (or source file)."),
    409: ("Conflict", "The job's state does not allow this, the caller does not hold its lease, the "
                      "source changed since the job was created, or (uploads) the offset is not the upload's."),
    410: ("Gone", "The upload expired before it was finished."),
    412: ("PreconditionFailed", "A tus version this server does not speak."),
    413: ("PayloadTooLarge", "The request body is larger than the configured maximum."),
    415: ("UnsupportedMediaType", "A tus PATCH must be `application/offset+octet-stream`."),
    416: ("RangeNotSatisfiable", "No byte of the requested range exists."),
    422: ("UnprocessableContent", "The request is well-formed but invalid; `errors` names the fields."),
    500: ("InternalServerError", "The job's record is damaged on disk (an operator runs `remote-jobs fsck`)."),
    460: ("ChecksumMismatch", "tus checksum: the chunk does not match `Upload-Checksum`; nothing was appended."),
    503: ("ServiceUnavailable", "The job store is not writable, or the API key file cannot be read."),
    507: ("InsufficientStorage", "The blob store's disk is too full for the bytes; nothing was stored."),
}


class _Converter(OpenAPIConverter):
    """apispec's converter, plus: complete response schemas list every property as required."""

    complete: frozenset[type] = frozenset()

    def schema2jsonschema(self, schema: Any) -> dict:
        out = super().schema2jsonschema(schema)
        if resolve_schema_cls(schema) in self.complete:
            out["required"] = sorted(out["properties"])
        return out


class _Plugin(MarshmallowPlugin):
    Converter = _Converter


def _comma_list_property(self: OpenAPIConverter, field: marshmallow.fields.Field, **_: Any) -> dict:
    """A :class:`schemas.CommaList` in a JSON body: a comma-separated string or a list of strings."""
    if isinstance(field, schemas.CommaList):
        return {"anyOf": [{"type": "string", "minLength": 1}, _COMMA_ARRAY]}
    return {}


_COMMA_ARRAY = {"type": "array", "minItems": 1, "maxItems": 32, "items": {"type": "string", "maxLength": 64}}


def _complete_schemas(sources: Iterable[SchemaSource]) -> frozenset[type]:
    """The success-body schema classes and every schema nested in them."""
    found: set[type] = set()
    todo = [resolve(s) for s in sources]
    while todo:
        schema = todo.pop()
        if type(schema) in found:
            continue
        found.add(type(schema))
        for f in schema.fields.values():
            inner = f.inner if isinstance(f, marshmallow.fields.List) else f
            if isinstance(inner, marshmallow.fields.Nested):
                todo.append(inner.schema)
    return frozenset(found)


def openapi_path(rule: Rule) -> str:
    """``/api/v1/remote-jobs/<job_id>/status`` -> ``/api/v1/remote-jobs/{job_id}/status``."""
    return re.sub(r"<(?:[^<>:]+:)?([^<>:]+)>", r"{\1}", rule.rule)


def _shadowing_literals(rule: Rule, method: str, name: str, rules: list[Rule]) -> list[str]:
    """Values of ``name`` that another route of ``method`` takes first: werkzeug matches a literal
    segment before a variable, so ``GET /api/v1/remote-jobs/stats`` is never ``GET .../{job_id}``."""
    segments = rule.rule.split("/")
    try:
        index = segments.index(f"<{name}>") if f"<{name}>" in segments else next(
            i for i, seg in enumerate(segments) if seg.startswith("<") and seg.endswith(f":{name}>"))
    except StopIteration:  # pragma: no cover - a variable inside a segment (a<x>b): nothing shadows it
        return []
    found = set()
    for other in rules:
        theirs = other.rule.split("/")
        if other is rule or method not in (other.methods or ()) or len(theirs) != len(segments):
            continue
        literal = theirs[index]
        if not literal or literal.startswith("<"):
            continue
        if all(i == index or a == b or (a.startswith("<") and b.startswith("<"))
               for i, (a, b) in enumerate(zip(segments, theirs))):
            found.add(literal)
    return sorted(found)


def _path_parameters(rule: Rule, method: str, rules: list[Rule]) -> list[dict]:
    params = []
    for name in sorted(rule.arguments):
        converter = rule._converters.get(name)  # werkzeug keeps no public accessor for them
        if isinstance(converter, AnyConverter):
            schema: dict = {"type": "string", "enum": sorted(converter.items)}
        elif isinstance(converter, IntegerConverter):
            schema = {"type": "integer", "minimum": 0}
        elif isinstance(converter, UnicodeConverter):
            schema = {"type": "string", "minLength": 1, "pattern": "^[^/]+$"}
        else:
            schema = {"type": "string", "minLength": 1}
        shadowed = [v for v in _shadowing_literals(rule, method, name, rules) if v in schema.get("enum", [v])]
        if shadowed:
            schema["not"] = {"enum": shadowed}
        params.append({"in": "path", "name": name, "required": True, "schema": schema})
    return params


def _query_parameters(converter: OpenAPIConverter, schema: marshmallow.Schema) -> list[dict]:
    params = []
    for name, f in schema.fields.items():
        if f.dump_only:
            continue
        param: dict = {"in": "query", "name": f.data_key or name, "required": f.required}
        if isinstance(f, schemas.CommaList):
            param.update(schema=dict(_COMMA_ARRAY), style="form", explode=False)
        else:
            prop = converter.field2property(f)
            if prop.get("default", 0) is None:  # "absent" is not a value a query string can send
                del prop["default"]
            prop.pop("nullable", None)
            param["schema"] = prop
        params.append(param)
    return params


def _implied_errors(rule: Rule, op: Operation, roles: tuple[str, ...] | None) -> set[int]:
    errors = set(op.errors)
    if roles is not None:
        errors.update((401, 503))  # 503: the key file cannot be read (fail closed)
        if set(roles) != set(ROLES):
            errors.add(403)
    if op.body is not None:
        errors.update((400, 413, 422))
    if op.query is not None:
        errors.add(422)
    if "job_id" in rule.arguments:
        errors.update((404, 500))  # 500: the job's record exists but cannot be read
    elif rule.arguments:
        errors.add(404)
    return errors


def _responses(op: Operation, schema: marshmallow.Schema | None, errors: set[int]) -> dict:
    success: dict = {"description": op.summary, "headers": {**_REQUEST_ID, **op.success_headers}}
    if schema is not None:
        success["content"] = {"application/json": {"schema": schema}}
    elif op.content:
        success["content"] = dict(op.content)
    responses: dict[str, Any] = {str(op.success): success}
    for status, extra in op.extra_responses.items():
        responses[str(status)] = {**extra, "headers": {**_REQUEST_ID, **extra.get("headers", {})}}
    for status in sorted(errors):
        responses[str(status)] = _ERROR_TITLES[status][0]
    return responses


def _operation(route: _Route, op: Operation, roles: tuple[str, ...] | None,
               converter: OpenAPIConverter, rules: list[Rule]) -> dict:
    rule, method = route.rule, route.method
    parameters = _path_parameters(rule, method, rules)
    if op.query is not None and method == "GET":
        parameters += _query_parameters(converter, resolve(op.query))
    parameters += list(op.headers)
    parameters.append("X-Request-ID")
    has_body = op.body is not None and method in ("POST", "PUT", "PATCH")
    effective = op if has_body else replace(op, body=None)  # poll's GET half parses no body
    schema = resolve(op.response) if op.response is not None else None
    out: dict[str, Any] = {
        "summary": op.summary,
        "tags": [op.tag],
        "parameters": parameters,
        "responses": _responses(op, schema, _implied_errors(rule, effective, roles)),
    }
    description = op.description
    if roles is None:
        out["security"] = []
    else:
        out["security"] = [{SECURITY_SCHEME: []}]
        out["x-required-roles"] = list(roles)
        who = "any key" if set(roles) == set(ROLES) else " or ".join(roles) + " key (admin may too)"
        description = f"Needs {who}. {description}".strip()
    if route.aliases:
        also = ", ".join(f"`{alias}`" for alias in route.aliases)
        description = f"{description} Also served at {also}.".strip()
    if description:
        out["description"] = description
    if has_body:
        out["requestBody"] = {"required": op.body_required,
                              "content": {"application/json": {"schema": resolve(op.body)}}}
    elif op.request_content:
        out["requestBody"] = {"required": False, "content": dict(op.request_content)}
    return out


@dataclass(frozen=True, eq=False)  # by identity: werkzeug rules are not hashable
class _Route:
    """One documented operation: an endpoint's method at one path (and the paths it aliases)."""

    endpoint: str
    method: str
    rule: Rule
    aliases: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return openapi_path(self.rule)


def _routes(app: Flask) -> list[_Route]:
    """Every route of ``app`` that is an API operation, once: ``@hidden`` views are left out, and an
    endpoint's method served with and without a trailing slash is one route at the path without."""
    twins: dict[tuple[str, str, str], list[Rule]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static" or isinstance(operation_of(app.view_functions[rule.endpoint]), Hidden):
            continue
        for method in sorted((rule.methods or set()) - IGNORED_METHODS):
            key = (rule.endpoint, method, openapi_path(rule).rstrip("/") or "/")
            twins.setdefault(key, []).append(rule)
    routes = []
    for (endpoint, method, _), group in twins.items():
        group.sort(key=lambda r: len(r.rule))
        routes.append(_Route(endpoint, method, group[0], tuple(openapi_path(r) for r in group[1:])))
    return sorted(routes, key=lambda r: (r.path, r.method))


def _operation_ids(routes: list[_Route]) -> dict[_Route, str]:
    """Unique ids: the endpoint name, plus the method where the endpoint has several."""
    methods: dict[str, set[str]] = {}
    for route in routes:
        methods.setdefault(route.endpoint, set()).add(route.method)
    ids = {}
    for route in routes:
        name = route.endpoint.replace(".", "_")
        if len(methods[route.endpoint]) > 1:
            name += "_" + route.method.lower()
        ids[route] = name
    return ids


def _components(spec: APISpec) -> None:
    spec.components.security_scheme(SECURITY_SCHEME, {
        "type": "http", "scheme": "bearer",
        "description": "An API key made with `flask keys create --role {worker,producer,admin}`."})
    spec.components.header("X-Request-ID", {
        "description": "The request id: the one the client sent when it matched the pattern, else a new one.",
        "required": True, "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN}})
    spec.components.parameter("X-Request-ID", "header", {
        "description": "An id to find this request in the server's logs (echoed back).",
        "required": False, "schema": {"type": "string", "pattern": REQUEST_ID_PATTERN}})
    for name, param in HEADER_PARAMETERS.items():
        spec.components.parameter(name, "header", {k: v for k, v in param.items() if k not in ("in", "name")})
    spec.components.schema("Problem", schema=schemas.ProblemSchema)
    for status, (name, description) in _ERROR_TITLES.items():
        headers: dict[str, Any] = {"X-Request-ID": "X-Request-ID"}
        if status == 401:
            headers["WWW-Authenticate"] = {"description": "`Bearer realm=\"morag-remote\"`", "required": True,
                                           "schema": {"type": "string", "pattern": "^Bearer "}}
        if status == 416:
            headers["Content-Range"] = {"description": "`bytes */length`: the size of the file.", "required": True,
                                        "schema": {"type": "string", "pattern": r"^bytes \*/\d+$"}}
        spec.components.response(name, {"description": description, "headers": headers,
                                        "content": {PROBLEM_JSON: {"schema": "Problem"}}})


def undocumented_endpoints(app: Flask) -> list[str]:
    """Endpoints of ``app`` whose view is neither ``@documented`` nor ``@hidden`` (each still gets a
    bare operation, tagged ``undocumented``)."""
    return sorted({rule.endpoint for rule in app.url_map.iter_rules()
                   if rule.endpoint != "static" and operation_of(app.view_functions[rule.endpoint]) is None})


def build_document(app: Flask) -> dict:
    """The OpenAPI document of ``app``: every API route of its URL map, as its view documents it."""
    with app.app_context():  # the schema factories read the app's settings
        return _build(app)


def _build(app: Flask) -> dict:
    plugin = _Plugin()
    spec = APISpec(title="morag-remote", version=__version__, openapi_version=OPENAPI_VERSION,
                   plugins=[plugin], info={"description": API_DESCRIPTION})
    routes = _routes(app)
    operations = {route: operation_of(app.view_functions[route.endpoint]) for route in routes}
    converter = plugin.converter
    converter.complete = _complete_schemas(
        {op.response for op in operations.values() if op is not None and op.response is not None})
    converter.add_attribute_function(_comma_list_property)
    _components(spec)

    ids = _operation_ids(routes)
    rules = list(app.url_map.iter_rules())
    paths: dict[str, dict[str, dict]] = {}
    for route in routes:
        view = app.view_functions[route.endpoint]
        op = operations[route]
        if op is None:
            log.warning("openapi.undocumented_route", endpoint=route.endpoint, path=route.path,
                        method=route.method)
            op = Operation(summary=f"Undocumented ({route.endpoint})", tag="undocumented")
        roles = getattr(view, "required_roles", None)
        public_if = getattr(view, "public_if", None)
        if public_if is not None and public_if(app.config):
            roles = None
        operation = _operation(route, op, tuple(roles) if roles is not None else None, converter, rules)
        operation["operationId"] = ids[route]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    for path, item in paths.items():
        spec.path(path=path, operations=item)
    return spec.to_dict()
