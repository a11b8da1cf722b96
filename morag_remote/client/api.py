"""``Client``: one typed method per endpoint a producer or a worker uses."""
from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any, Callable, Iterable, Iterator, Mapping

from .download import download as _download
from .errors import ApiError, DownloadError, LeaseLost, ReleaseUnsupported, WaitTimeout
from .http import HOST_FULL_HEADER, RESULT_RETRY_STATUSES, RetryPolicy, Transport
from .models import (TERMINAL_STATUSES, ClaimedJob, ClaimedJobs, CreatedJob, Download, Heartbeat, Job, JobPage, JobStatus, ResultAnswer,
                     parse_http_date, parse_time)

API = "/api/v1/remote-jobs"
# A result is the end of an hour of GPU work: retried until the server answers it (or ``stop``).
RESULT_RETRY = RetryPolicy(attempts=None, base=0.5, cap=30.0)
_JOB_NOT_FOUND = "Job not found"


class Client:
    """The morag-remote API over HTTP.

    ``timeout`` bounds each request's connect and every read (a long poll adds its ``wait``).
    ``retry`` is the policy for transient failures (see :class:`RetryPolicy`); ``on_retry(method,
    path, reason)`` is told about each retry (the worker counts them in a metric).
    """

    def __init__(self, base_url: str, key: str, timeout: float = 30.0, retry: RetryPolicy | None = None,
                 on_retry: Callable[[str, str, str], None] | None = None,
                 user_agent: str = "morag-remote-client") -> None:
        self.transport = Transport(base_url, key, timeout=timeout, retry=retry, on_retry=on_retry,
                                   user_agent=user_agent)

    def __repr__(self) -> str:
        return f"Client({self.transport.base_url!r})"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    def forget_connection(self) -> None:
        """Close the calling thread's connection now (a thread that is about to end; it would be
        closed when the thread object is gone anyway)."""
        self.transport.discard()

    def abort(self) -> None:
        """Break the requests in flight from another thread (a long poll returns at once)."""
        self.transport.abort()

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.transport.request(method, path, **kwargs).json()

    # -- anyone ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/health")

    def stats(self) -> dict[str, Any]:
        """Queue depth by status and content type (any key may read it: a cheap check of a key)."""
        return self._json("GET", f"{API}/stats")

    def openapi(self) -> dict[str, Any]:
        return self._json("GET", "/openapi.json")

    def status(self, job_id: str) -> JobStatus:
        return JobStatus.from_json(self._json("GET", f"{API}/{job_id}/status"))

    # -- producers ------------------------------------------------------------------------------

    def create(self, source_file_path: str, content_type: str, ingestion_task_id: str, *,
               task_options: Mapping[str, Any] | None = None, priority: int | None = None,
               max_retries: int | None = None, idempotency_key: str | None = None,
               requires: Mapping[str, Any] | None = None, available_at: str | None = None,
               expires_at: str | None = None, on_lapse: str | None = None) -> CreatedJob:
        """Create a job. Every create carries an ``Idempotency-Key`` (a new one unless given), so a
        create retried after a lost answer gets the first job back instead of making a second.
        ``requires`` (``{"labels": [...], "min": {name: number}}``), ``available_at`` and
        ``expires_at`` (ISO 8601 with an offset) and ``on_lapse`` (requeue, fail, hold) route and
        schedule it."""
        body: dict[str, Any] = {"source_file_path": source_file_path, "content_type": content_type,
                                "ingestion_task_id": ingestion_task_id, "task_options": dict(task_options or {})}
        if priority is not None:
            body["priority"] = priority
        if max_retries is not None:
            body["max_retries"] = max_retries
        for name, value in (("requires", requires), ("available_at", available_at),
                            ("expires_at", expires_at), ("on_lapse", on_lapse)):
            if value is not None:
                body[name] = dict(value) if isinstance(value, Mapping) else value
        key = idempotency_key or uuid.uuid4().hex
        response = self.transport.request("POST", f"{API}/", json_body=body, headers={"Idempotency-Key": key})
        data = response.json()
        return CreatedJob(job_id=data["job_id"], status=data["status"], created_at=parse_time(data.get("created_at")),
                          location=response.headers.get("location"), created=response.status == 201)

    def get(self, job_id: str) -> Job:
        """The whole job, with ``result_data`` once it completed."""
        return Job.from_json(self._json("GET", f"{API}/{job_id}"))

    def list(self, *, status: str | None = None, content_type: str | None = None,
             ingestion_task_id: str | None = None, worker_id: str | None = None, limit: int | None = None,
             cursor: str | None = None) -> JobPage:
        query = {"status": status, "content_type": content_type, "ingestion_task_id": ingestion_task_id,
                 "worker_id": worker_id, "limit": limit, "cursor": cursor}
        data = self._json("GET", f"{API}/", query=query)
        return JobPage([Job.from_json(j) for j in data["jobs"]], data.get("next_cursor"))

    def iter_jobs(self, **filters: Any) -> Iterator[Job]:
        """Every job matching ``filters`` (those of :meth:`list`), page after page."""
        cursor = None
        while True:
            page = self.list(**filters, cursor=cursor)
            yield from page.jobs
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> Job:
        return Job.from_json(self._json("POST", f"{API}/{job_id}/cancel", resend=False))

    def retry(self, job_id: str) -> Job:
        """Re-open a failed, timed-out, cancelled or held job."""
        return Job.from_json(self._json("POST", f"{API}/{job_id}/retry", resend=False))

    def delete(self, job_id: str) -> None:
        """Remove the record (admin key)."""
        self.transport.request("DELETE", f"{API}/{job_id}", resend=False)

    def wait(self, job_id: str, timeout: float, interval: float = 0.25, max_interval: float = 5.0) -> Job:
        """The job once it is terminal (completed, failed, timeout, cancelled); WaitTimeout when it
        is not within ``timeout`` seconds. Reads its status at growing intervals."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = self.status(job_id).status
            if last in TERMINAL_STATUSES:
                return self.get(job_id)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(job_id, timeout, last)
            time.sleep(min(interval, remaining))
            interval = min(interval * 1.5, max_interval)

    def submit_and_wait(self, source_file_path: str, content_type: str, ingestion_task_id: str, *,
                        timeout: float, **create: Any) -> Job:
        """Create a job and return it finished (see :meth:`wait`)."""
        created = self.create(source_file_path, content_type, ingestion_task_id, **create)
        return self.wait(created.job_id, timeout)

    # -- workers --------------------------------------------------------------------------------

    def poll(self, worker_id: str, content_types: Iterable[str], *, max_jobs: int = 1, wait: float = 0.0,
             worker: Mapping[str, Any] | None = None, stop: threading.Event | None = None,
             capabilities: Mapping[str, Any] | None = None) -> ClaimedJobs:
        """Claim up to ``max_jobs`` jobs, waiting up to ``wait`` seconds for one (a long poll).

        ``worker`` is the optional metadata (hostname, version, concurrency, labels) a server with the
        workers registry keeps; a server without it answers 422 naming the field. Only failures
        before the request was sent are retried: a poll resent after a lost answer would claim
        again, and the jobs of the lost answer come back when their leases lapse. ``host_full``
        on the answer: the server could not let this poll wait (see :class:`ClaimedJobs`).
        """
        body: dict[str, Any] = {"worker_id": worker_id, "content_types": list(content_types),
                                "max_jobs": max_jobs, "wait": wait}
        if worker:
            body["worker"] = dict(worker)
        if capabilities is not None:  # {"labels": [...], "resources": {name: number}}
            body["capabilities"] = dict(capabilities)
        response = self.transport.request("POST", f"{API}/poll", json_body=body, timeout=self.transport.timeout + wait,
                                          resend=False, stop=stop)
        data = response.json()
        date = parse_http_date(response.headers.get("date"))
        jobs = ClaimedJobs(ClaimedJob.from_json(j, server_date=date) for j in data.get("jobs") or [])
        jobs.host_full = response.headers.get(HOST_FULL_HEADER.lower()) == "true"
        return jobs

    def download(self, job: ClaimedJob | str, dest: str, *, lease_id: str | None = None,
                 stop: threading.Event | None = None, on_bytes: Callable[[int], None] | None = None) -> Download:
        """Stream the job's source file to ``dest`` (a path, or a folder to keep the server's file
        name in), resuming with Range after a broken connection; sizes and the server's sha-256
        (when it sends one) are checked. ``job``: the claimed job or its ``source_file_url``."""
        url = job.source_file_url if isinstance(job, ClaimedJob) else job
        if isinstance(job, ClaimedJob) and lease_id is None:
            lease_id = job.lease_id
        got = _download(self.transport, url, dest, lease_id=lease_id, stop=stop, on_bytes=on_bytes)
        if isinstance(job, ClaimedJob) and job.source_sha256 and got.sha256 != job.source_sha256:
            os.unlink(got.path)  # the poll said which bytes the job has: these are not them
            raise DownloadError(f"the downloaded bytes' sha-256 is {got.sha256}, the poll announced {job.source_sha256}")
        return got

    def heartbeat(self, job_id: str, *, lease_id: str | None = None, progress: float | None = None,
                  message: str | None = None, worker: Mapping[str, Any] | None = None,
                  stop: threading.Event | None = None) -> Heartbeat:
        """Extend the lease; LeaseLost when the job was cancelled or moved on (stop working)."""
        body: dict[str, Any] = {}
        if lease_id is not None:
            body["lease_id"] = lease_id
        if progress is not None:
            body["progress"] = min(max(float(progress), 0.0), 1.0)
        if message is not None:
            body["message"] = message[:1000]
        if worker:
            body["worker"] = dict(worker)
        response = self.transport.request("POST", f"{API}/{job_id}/heartbeat", json_body=body, conflict=LeaseLost,
                                          stop=stop)
        data = response.json()
        return Heartbeat(job_id=data["job_id"], status=data["status"], timeout_at=parse_time(data.get("timeout_at")),
                         progress=data.get("progress"), server_date=parse_http_date(response.headers.get("date")))

    def result(self, job_id: str, *, success: bool, content: str | None = None,
               metadata: Mapping[str, Any] | None = None, error_message: str | None = None,
               processing_time: float | None = None, retryable: bool | None = None,
               lease_id: str | None = None, stop: threading.Event | None = None,
               retry: RetryPolicy | None = None) -> ResultAnswer:
        """Submit the attempt's result, retried until the server answers (``stop`` ends the
        retries early). The same body sent again is answered as the first was."""
        body = result_body(success=success, content=content, metadata=metadata, error_message=error_message,
                           processing_time=processing_time, retryable=retryable, lease_id=lease_id)
        return self.send_result(job_id, body, stop=stop, retry=retry)

    def send_result(self, job_id: str, body: Mapping[str, Any], *, stop: threading.Event | None = None,
                    retry: RetryPolicy | None = None) -> ResultAnswer:
        """Send a result body as built by :func:`result_body` (a worker keeps it on disk first).
        Server errors (5xx) are retried like no answer: the same body is answered as the first."""
        headers = {"X-Lease-Id": body["lease_id"]} if body.get("lease_id") else None
        data = self._json("PUT", f"{API}/{job_id}/result", json_body=dict(body), headers=headers,
                          conflict=LeaseLost, retry=retry or RESULT_RETRY, stop=stop,
                          retry_statuses=RESULT_RETRY_STATUSES)
        return ResultAnswer(status=data["status"], ingestion_continued=bool(data.get("ingestion_continued")))

    def release(self, job_id: str, *, lease_id: str | None = None,
                stop: threading.Event | None = None) -> dict[str, Any]:
        """Hand the job back at once, without counting a failed attempt. ReleaseUnsupported when the
        server has no such route (an older server); LeaseLost when the job is no longer held."""
        body = {"lease_id": lease_id} if lease_id else {}
        try:
            return self._json("POST", f"{API}/{job_id}/release", json_body=body, conflict=LeaseLost, stop=stop)
        except ApiError as exc:
            if exc.status == 405 or (exc.status == 404 and exc.title != _JOB_NOT_FOUND):
                raise ReleaseUnsupported(f"the server at {self.transport.base_url} has no release endpoint "
                                         f"({exc.status})") from exc
            raise


def result_body(*, success: bool, content: str | None = None, metadata: Mapping[str, Any] | None = None,
                error_message: str | None = None, processing_time: float | None = None,
                retryable: bool | None = None, lease_id: str | None = None) -> dict[str, Any]:
    """The JSON body of ``PUT /<id>/result`` (fields left out when None)."""
    body: dict[str, Any] = {"success": success}
    for name, value in (("content", content), ("metadata", dict(metadata) if metadata is not None else None),
                        ("error_message", error_message), ("processing_time", processing_time),
                        ("retryable", retryable), ("lease_id", lease_id)):
        if value is not None:
            body[name] = value
    return body
