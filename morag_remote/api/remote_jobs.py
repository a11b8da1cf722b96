"""The remote-jobs resource: ``/api/v1/remote-jobs``. Views parse, call the service, serialize."""
from __future__ import annotations

import hashlib
import os
from types import SimpleNamespace
from typing import Any

from flask import Blueprint, Response, g, request, url_for
from marshmallow import Schema
from werkzeug.exceptions import MethodNotAllowed

from .. import schemas
from ..auth import ANY, Forbidden, current_principal, requires
from ..artifacts import entries
from ..context import artifacts, events, idempotent_creates, service, tokens, workers
from ..exceptions import InvalidRequest
from ..idempotency import HEADER as IDEMPOTENCY_HEADER
from ..idempotency import parse_key
from ..models import RemoteJob
from ..service import Caller
from ..sources import download_name
from ..store.base import JobFilter
from .http import client_gone, documented, json_body, query_args, respond, respond_file, schema

bp = Blueprint("remote_jobs", __name__, url_prefix="/api/v1/remote-jobs")
MAX_LEASE_ID = 64
JOBS = "remote-jobs"
WORKERS = "workers"

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_LOCATION = {"description": "The job's URL.", "required": True, "schema": {"type": "string"}}
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
HOST_FULL_HEADER = "X-Poll-Host-Full"
_POLL_HEADERS = {
    HOST_FULL_HEADER: {"description": "`true` when nothing was claimed and the poll could not wait: the "
                                      "server process that took it already has its most waiting long "
                                      "polls. Back off (a few seconds, with jitter) before polling again.",
                       "required": False, "schema": {"type": "string", "enum": ["true"]}},
}
_CONTENT_RANGE = {"description": "The bytes sent, as `bytes first-last/length`.", "required": True,
                  "schema": {"type": "string", "pattern": r"^bytes \d+-\d+/\d+$"}}


def create_request() -> Schema:
    """The create body with the configured content types and webhook prefixes."""
    return schema(schemas.CreateJobRequest, content_types=service().settings.content_types,
                  webhook_prefixes=events().settings.allowed_prefixes)


def poll_request() -> Schema:
    """The poll's query string or body, bounded by the configured maximum jobs and wait."""
    settings = service().settings
    return schema(schemas.PollRequest, max_jobs=settings.poll_max_jobs, max_wait=settings.poll_max_wait_seconds)


def _caller(body_lease_id: str | None = None) -> Caller:
    principal = current_principal()
    lease_id = body_lease_id or request.headers.get("X-Lease-Id") or None
    if lease_id is not None and len(lease_id) > MAX_LEASE_ID:
        raise InvalidRequest(f"X-Lease-Id is longer than {MAX_LEASE_ID} characters",
                             {"X-Lease-Id": [f"at most {MAX_LEASE_ID} characters"]})
    return Caller(lease_id=lease_id, bound_worker_id=principal.worker_id)


@bp.post("")
@bp.post("/")
@documented(
    "Create a job", tag=JOBS, body=create_request, success=201, response=schemas.CreateJobResponse,
    headers=("Idempotency-Key",), errors=(409,), success_headers={"Location": _LOCATION},
    description="`source_file_path` must name a regular file inside the configured source roots. "
                "`requires` routes the job to workers that offer its labels and resources; "
                "`available_at` delays it, `expires_at` times it out if still pending then; "
                "`on_lapse` says what a lapsed lease does (requeue, fail, or hold for an operator). "
                "With an `Idempotency-Key`, a repeated request with the same body answers 200 with the "
                "job it created (422 with another body, 409 when that job was deleted or, on the "
                "PostgreSQL backend, when another request with the key has been in progress too long).",
    extra_responses={200: {"description": "The job this Idempotency-Key already created.",
                           "headers": {"Location": _LOCATION},
                           "content": {"application/json": {"schema": "CreateJobResponse"}}}})
@requires("producer")
def create_job() -> Response:
    key = parse_key(request.headers.get(IDEMPOTENCY_HEADER))
    data = json_body()
    if key is None:
        job, created = service().create(**data), True
    else:
        job, created = idempotent_creates().create(current_principal().name, key, data)
    response = respond(job, 201 if created else 200)
    response.headers["Location"] = url_for("remote_jobs.get_job", job_id=job.id)
    return response


def _claimed(job: RemoteJob) -> dict[str, Any]:
    token = tokens().issue(job.id, job.lease_id)
    url = url_for("remote_jobs.download", job_id=job.id, token=token)
    return {"id": job.id, "source_file_url": url, "content_type": job.content_type,
            "task_options": job.task_options, "lease_id": job.lease_id,
            "timeout_at": job.timeout_at, "retry_count": job.retry_count,
            "source_size": job.source_size, "source_sha256": job.source_sha256}


@bp.before_request
def _no_head_poll() -> None:
    """Flask adds HEAD to GET routes; a poll claims, so a HEAD would take jobs and drop the answer
    that names them. Refused before authentication, as any method a route does not serve is."""
    if request.method == "HEAD" and request.endpoint == "remote_jobs.poll":
        raise MethodNotAllowed(valid_methods=["GET", "POST"])


@bp.route("/poll", methods=["GET", "POST"])
@documented(
    "Claim jobs (a worker's poll)", tag=WORKERS, query=poll_request, body=poll_request,
    response=schemas.PollResponse, success_headers=_POLL_HEADERS,
    description="The single-job fields are null when nothing was claimed; `jobs` lists every job "
                "claimed. `wait` long-polls up to that many seconds; a poll that cannot wait because "
                f"the server process has its most waiters answers at once with `{HOST_FULL_HEADER}: true`. "
                "GET takes a query string, "
                "POST a JSON body; a key bound to a worker id may poll only as that id (403). "
                "`capabilities` (POST: `{labels, resources}`; GET: `labels=a,b&resources=name:number`) "
                "say what the worker offers: a job with `requires` is claimed only by a poll whose "
                "labels include all of its labels and whose resources meet every minimum; a poll "
                "without capabilities takes only jobs without requirements. Paused types and types "
                "at their limit of processing jobs are not claimed.")
@requires("worker")
def poll() -> Response:
    data = query_args() if request.method == "GET" else json_body()
    bound = current_principal().worker_id
    if bound is not None and bound != data["worker_id"]:
        raise Forbidden(f"this key may only poll as worker {bound!r}")
    g.worker_id = data["worker_id"]
    workers().seen(data["worker_id"], data["content_types"], data["worker"])
    claimed = service().poll(data["worker_id"], data["content_types"], data["max_jobs"], data["wait"],
                             client_gone(), capabilities=data["capabilities"])
    jobs = [_claimed(j) for j in claimed]
    first = jobs[0] if jobs else {}
    body = {"job_id": first.get("id"), "source_file_url": first.get("source_file_url"),
            "content_type": first.get("content_type"), "task_options": first.get("task_options"),
            "jobs": jobs}
    response = respond(body)
    if claimed.host_full:
        response.headers[HOST_FULL_HEADER] = "true"
    return response


@bp.get("/<job_id>/download")
@documented(
    "Download the source file of a job held by the caller", tag=WORKERS,
    content={"application/octet-stream": _BINARY}, success_headers=_FILE_HEADERS,
    query=schemas.DownloadQuery, headers=("X-Lease-Id", "Range"), errors=(409, 416),
    description="Use `source_file_url` from the poll response (its `token` proves the attempt), or send "
                "`X-Lease-Id`. 403 for a bad token or a source that may not be served, 409 once the "
                "attempt is over.",
    extra_responses={206: {"description": "The requested byte range.",
                           "headers": {**_FILE_HEADERS, "Content-Range": _CONTENT_RANGE},
                           "content": {"application/octet-stream": _BINARY}}})
@requires("worker")
def download(job_id: str) -> Response:
    g.job_id = job_id
    token = query_args()["token"]
    if token is None:
        lease_id = request.headers.get("X-Lease-Id") or None
    else:
        lease_id = tokens().lease_of(token, job_id)
        if lease_id is None:
            raise Forbidden("the download token is not valid for this job")
    principal = current_principal()
    job, fh, st = service().open_source(job_id, _caller(lease_id), privileged=principal.role == "admin")
    try:
        sha256 = service().check_source(job, fh, st)  # 409 when the bytes are not the job's any more
    except BaseException:
        fh.close()
        raise
    name = job.source_name or download_name(job.source_file_path)
    body = None
    if sha256 is None and "Range" not in request.headers and job.source_stat is not None:
        body = _hashing(fh, st, job.id)  # the first full download learns the sha256 for the next ones
    return respond_file(fh, st.st_size, st.st_mtime, name, etag=_etag(st), sha256=sha256, body=body)


def _etag(st) -> str:
    """The file's identity and version: the same for as long as the bytes are the job's (a changed
    file is a 409), and the same before and after a first download learnt the sha256, so that a
    download resumed with If-Range across that moment still gets its 206."""
    return f"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"


def _hashing(fh, st, job_id: str):
    """The file in pieces, hashed as they are sent; a download that sent every byte records the
    sha256 on the job (with the stat it was taken at), so later downloads carry ``Repr-Digest``."""
    jobs = service()

    def pieces():
        hasher, sent = hashlib.sha256(), 0
        try:
            while piece := fh.read(1024 * 1024):
                hasher.update(piece)
                sent += len(piece)
                yield piece
            if sent == st.st_size:
                jobs.record_source_digest(job_id, hasher.hexdigest(), os.fstat(fh.fileno()))
        finally:
            fh.close()

    return pieces()


@bp.post("/<job_id>/heartbeat")
@documented(
    "Extend the lease of a job held by the caller", tag=WORKERS, body=schemas.HeartbeatRequest,
    body_required=False, response=schemas.HeartbeatResponse, headers=("X-Lease-Id",), errors=(409,),
    description="409 when the job was cancelled, re-queued or handed to another worker: stop working.")
@requires("worker")
def heartbeat(job_id: str) -> Response:
    g.job_id = job_id
    data = json_body()
    job = service().heartbeat(job_id, _caller(data["lease_id"]), data["progress"], data["message"])
    if job.worker_id is not None:
        workers().seen(job.worker_id, metadata=data["worker"])
    return respond(job)


@bp.post("/<job_id>/release")
@documented(
    "Hand a held job back unfinished", tag=WORKERS, body=schemas.ReleaseRequest, body_required=False,
    response=schemas.ReleaseResponse, headers=("X-Lease-Id",), errors=(409,),
    description="The job is pending again at once, `retry_count` unchanged (`releases` counts how "
                "often); for a worker that shuts down. 409 when the caller no longer holds it.")
@requires("worker")
def release(job_id: str) -> Response:
    g.job_id = job_id
    data = json_body()
    return respond(service().release(job_id, _caller(data["lease_id"])))


@bp.put("/<job_id>/result")
@documented(
    "Submit the result of a job held by the caller", tag=WORKERS, body=schemas.SubmitResultRequest,
    response=schemas.SubmitResultResponse, headers=("X-Lease-Id",), errors=(409,),
    description="A failure is retried with backoff while retries remain, unless `retryable` is false. "
                "Sending the same result again answers as the first time; a result for an attempt "
                "the caller does not hold is 409.")
@requires("worker")
def submit_result(job_id: str) -> Response:
    g.job_id = job_id
    data = json_body()
    caller = _caller(data.pop("lease_id"))
    expected = data.pop("artifacts")
    staged, attempt = None, None
    if data["success"]:
        staged, attempt = artifacts().for_result(job_id, caller.lease_id, expected)
    outcome = service().submit_result(job_id, caller, **data, artifacts=staged, artifacts_attempt=attempt)
    return respond({"status": outcome.job.status, "ingestion_continued": outcome.ingestion_continued})


@bp.get("/<job_id>/status")
@documented("A job's status", tag=JOBS, response=schemas.JobStatusResponse)
@requires(*ANY)
def job_status(job_id: str) -> Response:
    job = service().get(job_id)
    body = dict(vars(job), estimated_completion=service().estimates.estimated_completion(job),
                event_delivery=events().delivery_state(job))
    return respond(body)


@bp.get("/<job_id>")
@documented("A whole job, with its result", tag=JOBS, response=schemas.JobDetail)
@requires("producer")
def get_job(job_id: str) -> Response:
    job = service().get(job_id)
    values = {**vars(job), "artifacts": _artifact_entries(job)}
    return respond(SimpleNamespace(**values, event_delivery=events().delivery_state(job)))


def _artifact_entries(job: RemoteJob) -> list[dict[str, Any]]:
    return entries(job, lambda name: url_for("remote_jobs.get_artifact", job_id=job.id, name=name))


@bp.get("")
@bp.get("/")
@documented("List jobs (without result bodies)", tag=JOBS, query=schemas.ListJobsQuery,
            response=schemas.ListJobsResponse,
            description="In creation order; pass `next_cursor` back as `cursor` for the next page.")
@requires("producer")
def list_jobs() -> Response:
    q = query_args()
    filters = JobFilter(status=q["status"], content_type=q["content_type"],
                        ingestion_task_id=q["ingestion_task_id"], worker_id=q["worker_id"])
    jobs, next_cursor = service().list(filters, q["cursor"], q["limit"])
    return respond({"jobs": jobs, "next_cursor": next_cursor})


@bp.post("/<job_id>/cancel")
@documented("Cancel a pending, processing or held job", tag=JOBS, response=schemas.JobSummary, errors=(409,))
@requires("producer")
def cancel_job(job_id: str) -> Response:
    return respond(service().cancel(job_id))


@bp.post("/<job_id>/retry")
@documented("Put a failed, timed-out, cancelled or held job back in the queue", tag=JOBS,
            response=schemas.JobSummary, errors=(409,))
@requires("producer")
def retry_job(job_id: str) -> Response:
    return respond(service().retry(job_id))


@bp.delete("/<job_id>")
@documented("Delete a job's record", tag=JOBS, success=204)
@requires("admin")
def delete_job(job_id: str) -> Response:
    service().delete(job_id)
    artifacts().remove_job(job_id)
    return Response(status=204)


_ARTIFACT_HEADERS = {
    **_FILE_HEADERS,
    "ETag": {"description": "The artifact's sha256, as a strong validator for `If-Range`.", "required": True,
             "schema": {"type": "string"}},
    "Repr-Digest": {"description": "`sha-256=:<base64>:` of the whole artifact (RFC 9530).", "required": True,
                    "schema": {"type": "string"}},
}


@bp.put("/<job_id>/artifacts/<path:name>")
@documented(
    "Upload a result artifact for the attempt the caller holds", tag=WORKERS, response=schemas.ArtifactStored,
    success=201, headers=("X-Lease-Id", "Content-Digest"), errors=(400, 409, 413, 422, 507),
    request_content={"application/octet-stream": _BINARY},
    description="The body is the file, streamed. It is staged for the current attempt and becomes part "
                "of the job with its successful result; an attempt that ends otherwise loses it. The "
                "name: no path separators, no dot files, at most 255 bytes of UTF-8 (422). 409 when "
                "the caller does not hold the job's lease (before or after the bytes came); "
                "`Content-Digest: sha-256=:<base64>:` is checked (400, nothing stored). 200 when it "
                "replaced an artifact of the same name.",
    extra_responses={200: {"description": "An artifact of the same name was replaced.",
                           "content": {"application/json": {"schema": "ArtifactStored"}}}})
@requires("worker")
def put_artifact(job_id: str, name: str) -> Response:
    g.job_id = job_id
    request.max_content_length = artifacts().settings.max_bytes
    artifact, new = artifacts().put(job_id, name, _caller(), request.stream, request.content_length,
                                    request.headers.get("Content-Digest"))
    return respond(artifact, 201 if new else 200)


@bp.get("/<job_id>/artifacts/<path:name>")
@documented(
    "Download a result artifact of a completed job", tag=JOBS,
    content={"application/octet-stream": _BINARY}, success_headers=_ARTIFACT_HEADERS,
    headers=("Range",), errors=(416,),
    description="Artifacts are listed in `GET /<id>` (`artifacts`); `Range` resumes (206), `If-Range` "
                "with the ETag keeps a resume from splicing other bytes.",
    extra_responses={206: {"description": "The requested byte range.",
                           "headers": {**_ARTIFACT_HEADERS, "Content-Range": _CONTENT_RANGE},
                           "content": {"application/octet-stream": _BINARY}}})
@requires("producer")
def get_artifact(job_id: str, name: str) -> Response:
    job = service().get(job_id)
    entry, fh, st = artifacts().open(job, name)
    return respond_file(fh, st.st_size, st.st_mtime, entry["name"], etag=f"sha256-{entry['sha256']}",
                        sha256=entry["sha256"])
