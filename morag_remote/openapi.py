"""The OpenAPI 3 document of this API, generated from the marshmallow schemas with apispec.

:data:`OPERATIONS` is the one table that documents the API: for each Flask endpoint it names the
summary, the query and body schemas, the success status and schema and the errors the view can
answer. Everything else is read from the app, so it cannot disagree with what is served: the paths
and methods come from ``app.url_map`` (``<job_id>`` becomes ``{job_id}``), the roles from the
``required_roles`` that ``auth.requires`` puts on each view, and the bounds and choices from the
schemas built with the app's settings. ``tests/test_openapi.py`` fails when a route has no entry.

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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import marshmallow
import structlog
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin, OpenAPIConverter
from apispec.ext.marshmallow.common import resolve_schema_cls
from flask import Flask
from werkzeug.routing import AnyConverter, IntegerConverter, Rule, UnicodeConverter

from . import schemas
from .version import __version__
from .auth import ROLES
from .config import Settings

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

SchemaSource = type[marshmallow.Schema] | Callable[[Settings], marshmallow.Schema]


@dataclass(frozen=True)
class Operation:
    """How one endpoint is documented (see the module docstring for what is implied)."""

    summary: str
    tag: str
    description: str = ""
    query: SchemaSource | None = None       # query-string schema (class, or factory taking Settings)
    body: SchemaSource | None = None        # JSON request body schema
    body_required: bool = True
    success: int = 200
    response: SchemaSource | None = None    # JSON success body; None with content=None: no body
    content: Mapping[str, dict] | None = None  # non-JSON success bodies: media type -> schema
    success_headers: Mapping[str, dict] = field(default_factory=dict)
    errors: tuple[int, ...] = ()            # beyond the implied ones
    headers: tuple[str, ...] = ()           # request headers, by name in HEADER_PARAMETERS
    extra_responses: Mapping[int, dict] = field(default_factory=dict)  # other statuses, in full
    public_if: Callable[[Mapping[str, Any]], bool] | None = None  # config test: served without a key


def _metrics_public(config: Mapping[str, Any]) -> bool:
    from .metrics import is_public  # not at import: prometheus_client reads its mode when first imported

    return is_public(config["METRICS_PUBLIC"])


def _poll_request(settings: Settings) -> marshmallow.Schema:
    return schemas.PollRequest(max_jobs=settings.poll_max_jobs, max_wait=settings.poll_max_wait_seconds)


def _create_request(settings: Settings) -> marshmallow.Schema:
    return schemas.CreateJobRequest(content_types=settings.content_types)


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_FILE_HEADERS = {
    "Content-Length": {"description": "Bytes in this response.", "required": True,
                       "schema": {"type": "integer", "minimum": 0}},
    "Content-Disposition": {"description": "`attachment` with the source file's name.", "required": True,
                            "schema": {"type": "string"}},
    "Accept-Ranges": {"description": "Ranges are accepted in bytes.", "required": True,
                      "schema": {"type": "string", "enum": ["bytes"]}},
    "Last-Modified": {"description": "When the source file last changed.", "required": True,
                      "schema": {"type": "string"}},
}
_CONTENT_RANGE = {"description": "The bytes sent, as `bytes first-last/length`.", "required": True,
                  "schema": {"type": "string", "pattern": r"^bytes \d+-\d+/\d+$"}}

HEADER_PARAMETERS: dict[str, dict] = {
    "X-Lease-Id": {"in": "header", "name": "X-Lease-Id", "required": False,
                   "description": "The lease id of the attempt the caller works on (from the poll "
                                  "response); fences a stale worker.",
                   "schema": {"type": "string", "maxLength": 64}},
    "Idempotency-Key": {"in": "header", "name": "Idempotency-Key", "required": False,
                        "description": "Makes a retried create safe: the same key and body give the same job.",
                        "schema": {"type": "string", "pattern": r"^[\x21-\x7e]{1,255}$"}},
    "Range": {"in": "header", "name": "Range", "required": False,
              "description": "Resume a download: `bytes=first-[last]` (RFC 9110); answered with 206, or "
                             "416 when no byte of it exists.",
              "schema": {"type": "string"}},
}

_LOCATION = {"description": "The job's URL.", "required": True, "schema": {"type": "string"}}
_PUBLIC_TAG = "service"
_JOBS_TAG = "remote-jobs"
_WORKER_TAG = "workers"

OPERATIONS: dict[str, Operation] = {
    "health.health": Operation(
        summary="Liveness and store health", tag=_PUBLIC_TAG, response=schemas.HealthResponse,
        description="200 while the job store takes writes; 503 when it does not.", errors=(503,)),
    "metrics.metrics": Operation(
        summary="Prometheus metrics of the queue", tag=_PUBLIC_TAG,
        content={"text/plain": {"schema": {"type": "string"}},
                 "application/openmetrics-text": {"schema": {"type": "string"}}},
        public_if=_metrics_public,
        description="The Prometheus text format, or OpenMetrics when the scraper's `Accept` asks for it. "
                    "Served without a key when `MORAG_REMOTE_METRICS_PUBLIC` is true."),
    "docs.openapi_json": Operation(
        summary="This OpenAPI document", tag=_PUBLIC_TAG,
        content={"application/json": {"schema": {"type": "object", "required": ["openapi", "info", "paths"]}}}),
    "docs.page": Operation(
        summary="The API reference page (Swagger UI, served offline)", tag=_PUBLIC_TAG,
        content={"text/html": {"schema": {"type": "string"}}}),
    "docs.initializer": Operation(
        summary="The script that starts Swagger UI on the reference page", tag=_PUBLIC_TAG,
        content={"text/javascript": {"schema": {"type": "string"}}}),
    "docs.asset": Operation(
        summary="A Swagger UI asset of the reference page", tag=_PUBLIC_TAG,
        content={"text/css": {"schema": {"type": "string"}},
                 "text/javascript": {"schema": {"type": "string"}},
                 "image/png": _BINARY}),
    "remote_jobs.create_job": Operation(
        summary="Create a job", tag=_JOBS_TAG, body=_create_request, success=201,
        response=schemas.CreateJobResponse, headers=("Idempotency-Key",), errors=(409,),
        description="`source_file_path` must name a regular file inside the configured source roots. "
                    "With an `Idempotency-Key`, a repeated request with the same body answers 200 with the "
                    "job it created (422 with another body, 409 when that job was deleted or, on the "
                    "PostgreSQL backend, when another request with the key has been in progress too long).",
        success_headers={"Location": _LOCATION},
        extra_responses={200: {"description": "The job this Idempotency-Key already created.",
                               "headers": {"Location": _LOCATION},
                               "content": {"application/json": {"schema": "CreateJobResponse"}}}}),
    "remote_jobs.list_jobs": Operation(
        summary="List jobs (without result bodies)", tag=_JOBS_TAG, query=schemas.ListJobsQuery,
        response=schemas.ListJobsResponse,
        description="In creation order; pass `next_cursor` back as `cursor` for the next page."),
    "remote_jobs.get_job": Operation(
        summary="A whole job, with its result", tag=_JOBS_TAG, response=schemas.JobDetail),
    "remote_jobs.job_status": Operation(
        summary="A job's status", tag=_JOBS_TAG, response=schemas.JobStatusResponse),
    "remote_jobs.cancel_job": Operation(
        summary="Cancel a pending or processing job", tag=_JOBS_TAG, response=schemas.JobSummary,
        errors=(409,)),
    "remote_jobs.retry_job": Operation(
        summary="Put a failed, timed-out or cancelled job back in the queue", tag=_JOBS_TAG,
        response=schemas.JobSummary, errors=(409,)),
    "remote_jobs.delete_job": Operation(
        summary="Delete a job's record", tag=_JOBS_TAG, success=204),
    "stats.stats": Operation(
        summary="Queue depth, oldest pending job, active workers", tag=_JOBS_TAG,
        response=schemas.StatsResponse),
    "remote_jobs.poll": Operation(
        summary="Claim jobs (a worker's poll)", tag=_WORKER_TAG, query=_poll_request, body=_poll_request,
        response=schemas.PollResponse,
        description="The single-job fields are null when nothing was claimed; `jobs` lists every job "
                    "claimed. `wait` long-polls up to that many seconds. GET takes a query string, "
                    "POST a JSON body; a key bound to a worker id may poll only as that id (403)."),
    "remote_jobs.download": Operation(
        summary="Download the source file of a job held by the caller", tag=_WORKER_TAG,
        content={"application/octet-stream": _BINARY}, success_headers=_FILE_HEADERS,
        query=schemas.DownloadQuery, headers=("X-Lease-Id", "Range"), errors=(409, 416),
        description="Use `source_file_url` from the poll response (its `token` proves the attempt), or send "
                    "`X-Lease-Id`. 403 for a bad token or a source that may not be served, 409 once the "
                    "attempt is over.",
        extra_responses={206: {"description": "The requested byte range.",
                               "headers": {**_FILE_HEADERS, "Content-Range": _CONTENT_RANGE},
                               "content": {"application/octet-stream": _BINARY}}}),
    "remote_jobs.heartbeat": Operation(
        summary="Extend the lease of a job held by the caller", tag=_WORKER_TAG,
        body=schemas.HeartbeatRequest, body_required=False, response=schemas.HeartbeatResponse,
        headers=("X-Lease-Id",), errors=(409,),
        description="409 when the job was cancelled, re-queued or handed to another worker: stop working."),
    "remote_jobs.release": Operation(
        summary="Hand a held job back unfinished", tag=_WORKER_TAG,
        body=schemas.ReleaseRequest, body_required=False, response=schemas.ReleaseResponse,
        headers=("X-Lease-Id",), errors=(409,),
        description="The job is pending again at once, `retry_count` unchanged (`releases` counts "
                    "how often); for a worker that shuts down. 409 when the caller no longer holds it."),
    "workers.list_workers": Operation(
        summary="The workers heard from in the last day, with the jobs each holds", tag=_JOBS_TAG,
        response=schemas.WorkersResponse),
    "remote_jobs.submit_result": Operation(
        summary="Submit the result of a job held by the caller", tag=_WORKER_TAG,
        body=schemas.SubmitResultRequest, response=schemas.SubmitResultResponse,
        headers=("X-Lease-Id",), errors=(409,),
        description="A failure is retried with backoff while retries remain, unless `retryable` is false. "
                    "Sending the same result again answers as the first time; a result for an attempt "
                    "the caller does not hold is 409."),
}

_ERROR_TITLES = {
    400: ("BadRequest", "The request body is not a JSON object."),
    401: ("Unauthorized", "No valid API key (`Authorization: Bearer <key>`)."),
    403: ("Forbidden", "The key may not do this."),
    404: ("NotFound", "No such job (or source file)."),
    409: ("Conflict", "The job's state does not allow this, or the caller does not hold its lease."),
    413: ("PayloadTooLarge", "The request body is larger than the configured maximum."),
    416: ("RangeNotSatisfiable", "No byte of the requested range exists."),
    422: ("UnprocessableContent", "The request is well-formed but invalid; `errors` names the fields."),
    500: ("InternalServerError", "The job's record is damaged on disk (an operator runs `remote-jobs fsck`)."),
    503: ("ServiceUnavailable", "The job store is not writable, or the API key file cannot be read."),
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


def _instance(source: SchemaSource, settings: Settings) -> marshmallow.Schema:
    if isinstance(source, type):
        return source()
    return source(settings)


def _complete_schemas(sources: Iterable[SchemaSource], settings: Settings) -> frozenset[type]:
    """The success-body schema classes and every schema nested in them."""
    found: set[type] = set()
    todo = [_instance(s, settings) for s in sources]
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
    request_id = {"X-Request-ID": "X-Request-ID"}
    success: dict = {"description": op.summary, "headers": {**request_id, **op.success_headers}}
    if schema is not None:
        success["content"] = {"application/json": {"schema": schema}}
    elif op.content:
        success["content"] = dict(op.content)
    responses: dict[str, Any] = {str(op.success): success}
    for status, extra in op.extra_responses.items():
        responses[str(status)] = {**extra, "headers": {**request_id, **extra.get("headers", {})}}
    for status in sorted(errors):
        responses[str(status)] = _ERROR_TITLES[status][0]
    return responses


def _operation(rule: Rule, method: str, op: Operation, roles: tuple[str, ...] | None,
               converter: OpenAPIConverter, settings: Settings, rules: list[Rule]) -> dict:
    parameters = _path_parameters(rule, method, rules)
    if op.query is not None and method == "GET":
        parameters += _query_parameters(converter, _instance(op.query, settings))
    parameters += list(op.headers)
    parameters.append("X-Request-ID")
    has_body = op.body is not None and method in ("POST", "PUT", "PATCH")
    effective = op if has_body else _without_body(op)
    schema = _instance(op.response, settings) if op.response is not None else None
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
    if description:
        out["description"] = description
    if has_body:
        out["requestBody"] = {"required": op.body_required,
                              "content": {"application/json": {"schema": _instance(op.body, settings)}}}
    return out


def _without_body(op: Operation) -> Operation:
    """The GET half of an endpoint that reads a body on POST (poll) parses no body."""
    from dataclasses import replace

    return replace(op, body=None)


def _operation_ids(entries: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
    """Unique ids: the endpoint name, plus the method and a slash mark where the endpoint has several."""
    ids = {}
    by_endpoint: dict[str, list[tuple[str, str, str]]] = {}
    for entry in entries:
        by_endpoint.setdefault(entry[0], []).append(entry)
    for endpoint, group in by_endpoint.items():
        base = endpoint.replace(".", "_")
        methods = {m for _, m, _ in group}
        for entry in group:
            _, method, path = entry
            name = base
            if len(methods) > 1:
                name += "_" + method.lower()
            if len(group) > len(methods) and path.endswith("/"):
                name += "_slash"
            ids[entry] = name
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
    """Endpoints of ``app`` that OPERATIONS does not describe (each still gets a bare operation)."""
    return sorted({rule.endpoint for rule in app.url_map.iter_rules()
                   if rule.endpoint != "static" and rule.endpoint not in OPERATIONS})


def build_document(app: Flask) -> dict:
    """The OpenAPI document of ``app``: every route of its URL map, documented from OPERATIONS."""
    settings = Settings.from_config(app.config)
    plugin = _Plugin()
    spec = APISpec(title="morag-remote", version=__version__, openapi_version=OPENAPI_VERSION,
                   plugins=[plugin], info={"description": API_DESCRIPTION})
    converter = plugin.converter
    converter.complete = _complete_schemas(
        [op.response for op in OPERATIONS.values() if op.response is not None], settings)
    converter.add_attribute_function(_comma_list_property)
    _components(spec)

    entries = []
    rules = list(app.url_map.iter_rules())
    for rule in rules:
        if rule.endpoint == "static":
            continue
        for method in sorted((rule.methods or set()) - IGNORED_METHODS):
            entries.append((rule.endpoint, method, rule))
    ids = _operation_ids([(e, m, openapi_path(r)) for e, m, r in entries])

    paths: dict[str, dict[str, dict]] = {}
    for endpoint, method, rule in sorted(entries, key=lambda e: (openapi_path(e[2]), e[1])):
        path = openapi_path(rule)
        op = OPERATIONS.get(endpoint)
        if op is None:
            log.warning("openapi.undocumented_route", endpoint=endpoint, path=path, method=method)
            op = Operation(summary=f"Undocumented ({endpoint})", tag="undocumented")
        roles = getattr(app.view_functions[endpoint], "required_roles", None)
        if op.public_if is not None and op.public_if(app.config):
            roles = None
        operation = _operation(rule, method, op, tuple(roles) if roles is not None else None, converter,
                               settings, rules)
        operation["operationId"] = ids[(endpoint, method, path)]
        paths.setdefault(path, {})[method.lower()] = operation
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    return spec.to_dict()
