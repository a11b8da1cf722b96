"""The remote-jobs resource: ``/api/v1/remote-jobs``. Views parse, call the service, serialize."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from flask import Blueprint, Response, g, request, url_for
from werkzeug.exceptions import MethodNotAllowed

from .. import schemas
from ..auth import ANY, Forbidden, current_principal, requires
from ..context import events, idempotent_creates, service, tokens, workers
from ..exceptions import InvalidRequest
from ..idempotency import HEADER as IDEMPOTENCY_HEADER
from ..idempotency import parse_key
from ..models import RemoteJob
from ..service import Caller
from ..sources import download_name
from ..store.base import JobFilter
from .http import json_body, query_args, respond, respond_file, schema

bp = Blueprint("remote_jobs", __name__, url_prefix="/api/v1/remote-jobs")
MAX_LEASE_ID = 64


def _caller(body_lease_id: str | None = None) -> Caller:
    principal = current_principal()
    lease_id = body_lease_id or request.headers.get("X-Lease-Id") or None
    if lease_id is not None and len(lease_id) > MAX_LEASE_ID:
        raise InvalidRequest(f"X-Lease-Id is longer than {MAX_LEASE_ID} characters",
                             {"X-Lease-Id": [f"at most {MAX_LEASE_ID} characters"]})
    return Caller(lease_id=lease_id, bound_worker_id=principal.worker_id)


@bp.post("")
@bp.post("/")
@requires("producer")
def create_job() -> Response:
    key = parse_key(request.headers.get(IDEMPOTENCY_HEADER))
    data = json_body(schema(schemas.CreateJobRequest, content_types=service().settings.content_types,
                            webhook_prefixes=events().settings.allowed_prefixes))
    if key is None:
        job, created = service().create(**data), True
    else:
        job, created = idempotent_creates().create(current_principal().name, key, data)
    response = respond(schema(schemas.CreateJobResponse), job, 201 if created else 200)
    response.headers["Location"] = url_for("remote_jobs.get_job", job_id=job.id)
    return response


def _claimed(job: RemoteJob) -> dict[str, Any]:
    token = tokens().issue(job.id, job.lease_id)
    url = url_for("remote_jobs.download", job_id=job.id, token=token)
    return {"id": job.id, "source_file_url": url, "content_type": job.content_type,
            "task_options": job.task_options, "lease_id": job.lease_id,
            "timeout_at": job.timeout_at, "retry_count": job.retry_count}


@bp.before_request
def _no_head_poll() -> None:
    """Flask adds HEAD to GET routes; a poll claims, so a HEAD would take jobs and drop the answer
    that names them. Refused before authentication, as any method a route does not serve is."""
    if request.method == "HEAD" and request.endpoint == "remote_jobs.poll":
        raise MethodNotAllowed(valid_methods=["GET", "POST"])


@bp.route("/poll", methods=["GET", "POST"])
@requires("worker")
def poll() -> Response:
    settings = service().settings
    loader = schema(schemas.PollRequest, max_jobs=settings.poll_max_jobs, max_wait=settings.poll_max_wait_seconds)
    data = query_args(loader) if request.method == "GET" else json_body(loader)
    bound = current_principal().worker_id
    if bound is not None and bound != data["worker_id"]:
        raise Forbidden(f"this key may only poll as worker {bound!r}")
    g.worker_id = data["worker_id"]
    workers().seen(data["worker_id"], data["content_types"], data["worker"])
    jobs = [_claimed(j) for j in service().poll(data["worker_id"], data["content_types"],
                                                data["max_jobs"], data["wait"])]
    first = jobs[0] if jobs else {}
    body = {"job_id": first.get("id"), "source_file_url": first.get("source_file_url"),
            "content_type": first.get("content_type"), "task_options": first.get("task_options"),
            "jobs": jobs}
    return respond(schema(schemas.PollResponse), body)


@bp.get("/<job_id>/download")
@requires("worker")
def download(job_id: str) -> Response:
    g.job_id = job_id
    token = query_args(schema(schemas.DownloadQuery))["token"]
    if token is None:
        lease_id = request.headers.get("X-Lease-Id") or None
    else:
        lease_id = tokens().lease_of(token, job_id)
        if lease_id is None:
            raise Forbidden("the download token is not valid for this job")
    principal = current_principal()
    job, fh, st = service().open_source(job_id, _caller(lease_id), privileged=principal.role == "admin")
    return respond_file(fh, st.st_size, st.st_mtime, download_name(job.source_file_path))


@bp.post("/<job_id>/heartbeat")
@requires("worker")
def heartbeat(job_id: str) -> Response:
    g.job_id = job_id
    data = json_body(schema(schemas.HeartbeatRequest), allow_empty=True)
    job = service().heartbeat(job_id, _caller(data["lease_id"]), data["progress"], data["message"])
    if job.worker_id is not None:
        workers().seen(job.worker_id, metadata=data["worker"])
    return respond(schema(schemas.HeartbeatResponse), job)


@bp.post("/<job_id>/release")
@requires("worker")
def release(job_id: str) -> Response:
    g.job_id = job_id
    data = json_body(schema(schemas.ReleaseRequest), allow_empty=True)
    return respond(schema(schemas.ReleaseResponse), service().release(job_id, _caller(data["lease_id"])))


@bp.put("/<job_id>/result")
@requires("worker")
def submit_result(job_id: str) -> Response:
    g.job_id = job_id
    data = json_body(schema(schemas.SubmitResultRequest))
    caller = _caller(data.pop("lease_id"))
    outcome = service().submit_result(job_id, caller, **data)
    return respond(schema(schemas.SubmitResultResponse),
                   {"status": outcome.job.status, "ingestion_continued": outcome.ingestion_continued})


@bp.get("/<job_id>/status")
@requires(*ANY)
def job_status(job_id: str) -> Response:
    job = service().get(job_id)
    body = dict(vars(job), estimated_completion=service().estimates.estimated_completion(job),
                event_delivery=events().delivery_state(job))
    return respond(schema(schemas.JobStatusResponse), body)


@bp.get("/<job_id>")
@requires("producer")
def get_job(job_id: str) -> Response:
    job = service().get(job_id)
    return respond(schema(schemas.JobDetail), SimpleNamespace(**vars(job), event_delivery=events().delivery_state(job)))


@bp.get("")
@bp.get("/")
@requires("producer")
def list_jobs() -> Response:
    q = query_args(schema(schemas.ListJobsQuery))
    filters = JobFilter(status=q["status"], content_type=q["content_type"],
                        ingestion_task_id=q["ingestion_task_id"], worker_id=q["worker_id"])
    jobs, next_cursor = service().list(filters, q["cursor"], q["limit"])
    return respond(schema(schemas.ListJobsResponse), {"jobs": jobs, "next_cursor": next_cursor})


@bp.post("/<job_id>/cancel")
@requires("producer")
def cancel_job(job_id: str) -> Response:
    return respond(schema(schemas.JobSummary), service().cancel(job_id))


@bp.post("/<job_id>/retry")
@requires("producer")
def retry_job(job_id: str) -> Response:
    return respond(schema(schemas.JobSummary), service().retry(job_id))


@bp.delete("/<job_id>")
@requires("admin")
def delete_job(job_id: str) -> Response:
    service().delete(job_id)
    return Response(status=204)
