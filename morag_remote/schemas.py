"""Request and response schemas: the single description of the API (the OpenAPI document is built
from them).

Request bodies use ``unknown = RAISE`` (a typo from a client is an error) except the result body,
which uses ``EXCLUDE``: workers in the field written against the seed may send extra fields, and
rejecting an hour of GPU work over an unknown key helps no one.
"""
from __future__ import annotations

import json

from marshmallow import (EXCLUDE, INCLUDE, RAISE, Schema, ValidationError, fields, post_load, validate,
                         validates, validates_schema)

from . import jsonrules
from .events.destinations import webhook_problem
from .models import STATUSES, to_iso
from .routing import MAX_LABELS, MAX_MINIMUMS, MAX_NAME_LENGTH, ON_LAPSE, Capabilities, RoutingError, parse_resources

ID_LENGTH = validate.Length(min=1, max=128)
CONTENT_TYPE_LENGTH = validate.Length(min=1, max=64)
PATH_LENGTH = validate.Length(min=1, max=4096)
TEXT_LENGTH = validate.Length(max=10_000)
MAX_OPTIONS_BYTES = 64 * 1024
MAX_METADATA_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32


class StrictSchema(Schema):
    class Meta:
        unknown = RAISE


def _json_size_check(value: dict, limit: int, name: str) -> None:
    if jsonrules.depth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ValidationError(f"{name} nests objects or arrays more than {MAX_JSON_DEPTH} levels deep")
    if len(json.dumps(value, default=str)) > limit:
        raise ValidationError(f"{name} is larger than {limit} bytes as JSON")


def _add_validator(schema: Schema, name: str, validator: validate.Validator) -> None:
    """Give one schema instance's field an extra validator (a new list: marshmallow copies fields
    shallowly, so appending would change the field of every other instance too)."""
    field = schema.fields[name]
    field.validators = [*field.validators, validator]


class StrictBoolean(fields.Boolean):
    """Only JSON true/false: "no" or 0 for ``success`` is more likely a client bug than a verdict."""

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):
            raise ValidationError("must be true or false")
        return value


SHA256_HEX = validate.Regexp(r"^[0-9a-fA-F]{64}$", error="must be a sha256 as 64 hex digits")


class Number(fields.Float):
    """A JSON number (not a string of one, not true/false), finite."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError("must be a number")
        return super()._deserialize(value, attr, data, **kwargs)


class Timestamp(fields.AwareDateTime):
    """An ISO 8601 time with an offset, loaded as its normalized text (``...Z``): a create's body is
    kept as JSON by ``Idempotency-Key`` records, and the service parses it."""

    def _deserialize(self, value, attr, data, **kwargs):
        return to_iso(super()._deserialize(value, attr, data, **kwargs))


LABEL = fields.String(validate=validate.Length(min=1, max=MAX_NAME_LENGTH))
LABELS = validate.Length(max=MAX_LABELS, error=f"at most {MAX_LABELS} labels")


class RequirementsSchema(StrictSchema):
    """``requires`` of a create: labels the worker must all have, minimums its resources must meet."""

    labels = fields.List(LABEL, load_default=list, validate=LABELS)
    min = fields.Dict(keys=fields.String(validate=validate.Length(min=1, max=MAX_NAME_LENGTH)),
                      values=Number(allow_nan=False), load_default=dict,
                      validate=validate.Length(max=MAX_MINIMUMS, error=f"at most {MAX_MINIMUMS} names"))


class CapabilitiesSchema(StrictSchema):
    """``capabilities`` of a poll (JSON form): what the worker has."""

    labels = fields.List(LABEL, load_default=list, validate=LABELS)
    resources = fields.Dict(keys=fields.String(validate=validate.Length(min=1, max=MAX_NAME_LENGTH)),
                            values=Number(allow_nan=False), load_default=dict,
                            validate=validate.Length(max=MAX_MINIMUMS, error=f"at most {MAX_MINIMUMS} names"))


class CreateJobRequest(StrictSchema):
    source_file_path = fields.String(load_default=None, validate=PATH_LENGTH,
                                     metadata={"description": "A file inside the source roots; or give "
                                               "`source_upload_id`."})
    source_upload_id = fields.String(load_default=None, validate=validate.Length(min=1, max=2048),
                                     metadata={"description": "A finished upload's id (or its URL) "
                                               "instead of `source_file_path`."})
    source_sha256 = fields.String(load_default=None, validate=SHA256_HEX,
                                  metadata={"description": "The source's sha256, verified by the server."})
    content_type = fields.String(required=True, validate=CONTENT_TYPE_LENGTH)
    task_options = fields.Dict(keys=fields.String(), load_default=dict)
    ingestion_task_id = fields.String(required=True, validate=ID_LENGTH)
    priority = fields.Integer(load_default=0, validate=validate.Range(min=-1000, max=1000))
    max_retries = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=0, max=100))
    requires = fields.Nested(RequirementsSchema, load_default=None, allow_none=True)
    available_at = Timestamp(load_default=None, allow_none=True)
    expires_at = Timestamp(load_default=None, allow_none=True)
    on_lapse = fields.String(load_default=None, allow_none=True, validate=validate.OneOf(ON_LAPSE))

    def __init__(self, *args, content_types: tuple[str, ...] = (), webhook_prefixes: tuple[str, ...] = (),
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.allowed_content_types = content_types
        self.webhook_prefixes = webhook_prefixes
        if content_types:  # a field validator, so the OpenAPI document lists the choices
            _add_validator(self, "content_type",
                           validate.OneOf(content_types, error=f"must be one of: {', '.join(content_types)}"))

    @validates("task_options")
    def _options_size(self, value: dict, **_) -> None:
        _json_size_check(value, MAX_OPTIONS_BYTES, "task_options")

    @validates_schema(skip_on_field_errors=False)
    def _one_source(self, data: dict, **_) -> None:
        if (data.get("source_file_path") is None) == (data.get("source_upload_id") is None):
            raise ValidationError("give exactly one of source_file_path and source_upload_id",
                                  "source_file_path")

    @validates("task_options")
    def _webhook_allowed(self, value: dict, **_) -> None:
        if "webhook_url" in value:
            problem = webhook_problem(value["webhook_url"], self.webhook_prefixes)
            if problem:
                raise ValidationError({"webhook_url": [problem]})


class CreateJobResponse(Schema):
    job_id = fields.String(attribute="id")
    status = fields.String()
    created_at = fields.AwareDateTime()


class CommaList(fields.Field):
    """A list given as ``a,b,c`` (query string) or as a JSON list (body)."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            items = [v.strip() for v in value.split(",")]
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            items = [v.strip() for v in value]
        else:
            raise ValidationError("must be a comma-separated string or a list of strings")
        items = [v for v in items if v]
        if not items:
            raise ValidationError("name at least one content type")
        if len(items) > 32 or any(len(v) > 64 for v in items):
            raise ValidationError("at most 32 content types of at most 64 characters")
        if not all(_is_text(v) for v in items):
            raise ValidationError("content types must be text (a lone surrogate such as \\ud800 is none)")
        return items


def _is_text(value: str) -> bool:
    """Whether ``value`` is text every store can hold: UTF-8 has no form for a lone surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class WorkerInfo(StrictSchema):
    """What a worker may say about itself in a poll or a heartbeat (``GET /workers`` lists it)."""

    hostname = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=255))
    version = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=64))
    concurrency = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=1, max=10_000))
    labels = fields.Dict(keys=fields.String(validate=validate.Length(min=1, max=64)),
                         values=fields.String(validate=validate.Length(max=256)), load_default=dict,
                         validate=validate.Length(max=32))


class LabelList(fields.Field):
    """Labels as ``a,b`` (query string) or a JSON list."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValidationError("must be a comma-separated string or a list of strings")
        if len(value) > MAX_LABELS or any(not v or len(v) > MAX_NAME_LENGTH for v in value):
            raise ValidationError(f"at most {MAX_LABELS} labels of 1 to {MAX_NAME_LENGTH} characters")
        return value


class ResourceList(fields.Field):
    """Resources as ``gpu_memory_gb:48,cpus:8`` (query string) or a JSON object of numbers."""

    def _deserialize(self, value, attr, data, **kwargs):
        try:
            if isinstance(value, str):
                return parse_resources(value)
            return Capabilities.parse(resources=value).resources
        except RoutingError as exc:
            raise ValidationError(exc.message) from None


class PollRequest(StrictSchema):
    worker_id = fields.String(required=True, validate=ID_LENGTH)
    content_types = CommaList(required=True)
    max_jobs = fields.Integer(load_default=1)
    wait = fields.Float(load_default=0.0)
    worker = fields.Nested(WorkerInfo, load_default=None, allow_none=True)
    # what the worker offers (routing.py): the JSON form, or labels/resources (the query-string form)
    capabilities = fields.Nested(CapabilitiesSchema, load_default=None, allow_none=True)
    labels = LabelList(load_default=None, metadata={"type": "string", "example": "cuda12,whisper-large-v3"})
    resources = ResourceList(load_default=None, metadata={"type": "string", "example": "gpu_memory_gb:48"})

    @post_load
    def _capabilities(self, data: dict, **_) -> dict:
        """One ``capabilities`` value (routing.Capabilities, or None when the poll names none)."""
        given = data.pop("capabilities")
        labels, resources = data.pop("labels"), data.pop("resources")
        if given is not None and (labels is not None or resources is not None):
            raise ValidationError("give capabilities, or labels and resources, not both", "capabilities")
        if given is not None:
            labels, resources = given["labels"], given["resources"]
        data["capabilities"] = (None if labels is None and resources is None
                                else Capabilities(frozenset(labels or ()), dict(resources or {})))
        return data

    def __init__(self, *args, max_jobs: int = 10, max_wait: float = 20.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_jobs_allowed = max_jobs
        self.max_wait = max_wait
        # field validators (not @validates methods), so the OpenAPI document states the bounds
        _add_validator(self, "max_jobs", validate.Range(min=1, max=max_jobs, error=f"must be between 1 and {max_jobs}"))
        _add_validator(self, "wait",
                       validate.Range(min=0, max=max_wait, error=f"must be between 0 and {max_wait:g} seconds"))


class ClaimedJob(Schema):
    job_id = fields.String(attribute="id")
    source_file_url = fields.String()
    content_type = fields.String()
    task_options = fields.Dict()
    lease_id = fields.String()
    timeout_at = fields.AwareDateTime()
    retry_count = fields.Integer()
    source_size = fields.Integer(allow_none=True)
    source_sha256 = fields.String(allow_none=True)


class PollResponse(Schema):
    job_id = fields.String(allow_none=True)
    source_file_url = fields.String(allow_none=True)
    content_type = fields.String(allow_none=True)
    task_options = fields.Dict(allow_none=True)
    jobs = fields.List(fields.Nested(ClaimedJob))


class DownloadQuery(Schema):
    """The download URL's query string: the signed token the poll response put there, if any.

    Unknown parameters are ignored (EXCLUDE): download clients append cache-busters and the like.
    An empty token is a token that does not verify (403), not a malformed request.
    """

    class Meta:
        unknown = EXCLUDE

    token = fields.String(load_default=None, validate=validate.Length(max=2048))


class LeaseMixin(Schema):
    lease_id = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=64))


class HeartbeatRequest(LeaseMixin, StrictSchema):
    progress = fields.Float(load_default=None, allow_none=True, validate=validate.Range(min=0, max=1))
    message = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=1000))
    worker = fields.Nested(WorkerInfo, load_default=None, allow_none=True)


class ReleaseRequest(LeaseMixin, StrictSchema):
    """An empty body is fine: the lease id may come as ``X-Lease-Id`` (or a bound key)."""


class ReleaseResponse(Schema):
    job_id = fields.String(attribute="id")
    status = fields.String()
    retry_count = fields.Integer()
    releases = fields.Integer()


class HeartbeatResponse(Schema):
    job_id = fields.String(attribute="id")
    status = fields.String()
    timeout_at = fields.AwareDateTime()
    progress = fields.Float(allow_none=True)


class SubmitResultRequest(LeaseMixin):
    class Meta:
        unknown = EXCLUDE

    success = StrictBoolean(required=True)
    content = fields.String(load_default=None, allow_none=True)
    metadata = fields.Dict(keys=fields.String(), load_default=None, allow_none=True)
    error_message = fields.String(load_default=None, allow_none=True, validate=TEXT_LENGTH)
    processing_time = fields.Float(load_default=None, allow_none=True, validate=validate.Range(min=0))
    retryable = StrictBoolean(load_default=None, allow_none=True)
    artifacts = fields.List(fields.String(validate=validate.Length(min=1, max=255)), load_default=None,
                            allow_none=True, validate=validate.Length(max=1000),
                            metadata={"description": "The artifact names this result expects "
                                      "(422 when one was not uploaded); without it, every artifact "
                                      "uploaded for the attempt."})

    @validates("metadata")
    def _metadata_size(self, value: dict | None, **_) -> None:
        if value is not None:
            _json_size_check(value, MAX_METADATA_BYTES, "metadata")


class SubmitResultResponse(Schema):
    status = fields.String()
    ingestion_continued = fields.Boolean()


class EventDeliveryState(Schema):
    """Where the job's completion event is (present once the job is terminal and events are on)."""

    event_id = fields.String()
    state = fields.String(metadata={"enum": ["pending", "retrying", "delivered"]})
    attempts = fields.Integer()
    last_error = fields.String(allow_none=True)
    delivered_at = fields.AwareDateTime(allow_none=True)
    next_attempt_at = fields.AwareDateTime(allow_none=True)


class JobStatusResponse(Schema):
    job_id = fields.String(attribute="id")
    status = fields.String()
    content_type = fields.String()
    worker_id = fields.String(allow_none=True)
    created_at = fields.AwareDateTime()
    started_at = fields.AwareDateTime(allow_none=True)
    completed_at = fields.AwareDateTime(allow_none=True)
    error_message = fields.String(allow_none=True)
    retry_count = fields.Integer()
    max_retries = fields.Integer()
    progress = fields.Float(allow_none=True)
    progress_message = fields.String(allow_none=True)
    timeout_at = fields.AwareDateTime(allow_none=True)
    estimated_completion = fields.AwareDateTime(allow_none=True)
    event_delivery = fields.Nested(EventDeliveryState, allow_none=True)


class JobSummary(Schema):
    """A job without its result body (for lists)."""

    id = fields.String()
    job_id = fields.Function(lambda job: job.id, metadata={"type": "string"})
    ingestion_task_id = fields.String()
    source_file_path = fields.String()
    content_type = fields.String()
    task_options = fields.Dict()
    status = fields.String()
    worker_id = fields.String(allow_none=True)
    created_at = fields.AwareDateTime()
    started_at = fields.AwareDateTime(allow_none=True)
    completed_at = fields.AwareDateTime(allow_none=True)
    updated_at = fields.AwareDateTime(allow_none=True)
    error_message = fields.String(allow_none=True)
    retry_count = fields.Integer()
    max_retries = fields.Integer()
    timeout_at = fields.AwareDateTime(allow_none=True)
    available_at = fields.AwareDateTime(allow_none=True)
    priority = fields.Integer()
    attempt = fields.Integer()
    progress = fields.Float(allow_none=True)
    progress_message = fields.String(allow_none=True)
    releases = fields.Integer()
    requires = fields.Nested(RequirementsSchema, allow_none=True)
    expires_at = fields.AwareDateTime(allow_none=True)
    on_lapse = fields.String(allow_none=True, metadata={"enum": list(ON_LAPSE)})


class ArtifactEntry(Schema):
    name = fields.String()
    size = fields.Integer()
    sha256 = fields.String()
    url = fields.String()


class JobDetail(JobSummary):
    result_data = fields.Dict(allow_none=True)
    source_upload_id = fields.String(allow_none=True)
    source_size = fields.Integer(allow_none=True)
    source_sha256 = fields.String(allow_none=True)
    artifacts = fields.List(fields.Nested(ArtifactEntry))
    event_delivery = fields.Nested(EventDeliveryState, allow_none=True)


class ListJobsQuery(StrictSchema):
    status = fields.String(load_default=None, validate=validate.OneOf(STATUSES))
    content_type = fields.String(load_default=None, validate=validate.Length(max=64))
    ingestion_task_id = fields.String(load_default=None, validate=ID_LENGTH)
    worker_id = fields.String(load_default=None, validate=ID_LENGTH)
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    cursor = fields.String(load_default=None, validate=validate.Length(min=1, max=64))


class ListJobsResponse(Schema):
    jobs = fields.List(fields.Nested(JobSummary))
    next_cursor = fields.String(allow_none=True)


class HealthResponse(Schema):
    status = fields.String()
    store = fields.String()
    detail = fields.String()


class ProblemSchema(Schema):
    """RFC 9457 problem details, as every error of this API is rendered (by ``errors.problem``, which
    always writes the four required members; extension members such as ``job_status`` may follow)."""

    class Meta:
        unknown = INCLUDE

    type = fields.String(required=True)
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    errors = fields.Dict(keys=fields.String(), values=fields.List(fields.String()))
    request_id = fields.String()




class TypeState(Schema):
    """One content type's operator controls, as in force now across the fleet."""

    content_type = fields.String()
    paused = fields.Boolean()
    max_processing = fields.Integer(allow_none=True)
    limit_source = fields.String(allow_none=True, metadata={"enum": ["runtime", "config"]})
    processing = fields.Integer()
    updated_at = fields.AwareDateTime(allow_none=True)


class LimitRequest(StrictSchema):
    """A run-time limit: the most jobs of the type processing at once (null: back to MAX_PROCESSING)."""

    max_processing = fields.Integer(required=True, allow_none=True, strict=True,
                                    validate=validate.Range(min=0, max=1_000_000))


class StatsResponse(Schema):
    counts = fields.Dict(keys=fields.String(), values=fields.Dict(keys=fields.String(), values=fields.Integer()))
    totals = fields.Dict(keys=fields.String(), values=fields.Integer())
    oldest_pending_age_seconds = fields.Float(allow_none=True)
    active_workers = fields.List(fields.String())
    types = fields.Dict(keys=fields.String(), values=fields.Nested(TypeState))


class HeldJob(Schema):
    job_id = fields.String()
    content_type = fields.String()
    started_at = fields.AwareDateTime(allow_none=True)
    timeout_at = fields.AwareDateTime(allow_none=True)
    progress = fields.Float(allow_none=True)
    progress_message = fields.String(allow_none=True)
    attempt = fields.Integer()


class WorkerEntry(Schema):
    worker_id = fields.String()
    last_seen = fields.AwareDateTime(allow_none=True)
    content_types = fields.List(fields.String())
    hostname = fields.String(allow_none=True)
    version = fields.String(allow_none=True)
    concurrency = fields.Integer(allow_none=True)
    labels = fields.Dict(keys=fields.String(), values=fields.String())
    jobs = fields.List(fields.Nested(HeldJob))


class WorkersResponse(Schema):
    workers = fields.List(fields.Nested(WorkerEntry))


class UploadStatus(Schema):
    """A tus upload, as ``GET /uploads/<id>`` shows it (``HEAD`` gives the same in tus headers)."""

    upload_id = fields.String(attribute="id")
    length = fields.Integer()
    offset = fields.Integer()
    complete = fields.Boolean()
    sha256 = fields.String(allow_none=True)
    metadata = fields.Dict(keys=fields.String(), values=fields.String())
    created_at = fields.AwareDateTime()
    expires_at = fields.AwareDateTime()
    completed_at = fields.AwareDateTime(allow_none=True)


class ArtifactStored(Schema):
    name = fields.String()
    size = fields.Integer()
    sha256 = fields.String()
