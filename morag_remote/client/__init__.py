"""``morag_remote.client``: the HTTP client of the morag-remote API, for producers and workers.

Standard library only: importing it loads neither Flask, marshmallow nor psycopg, so a GPU worker
machine needs nothing else. ::

    from morag_remote.client import Client
    with Client("https://queue.example", key) as client:
        job = client.submit_and_wait("talk.mp3", "audio", "ingest-1", timeout=3600)
        print(job.content)
"""
from .api import RESULT_RETRY, Client, result_body
from .errors import (ApiError, BadRequest, ClientError, ConfigError, Conflict, ConnectionFailed, DownloadError,
                     DownloadStopped, Forbidden, InvalidRequest, LeaseLost, NotFound, PayloadTooLarge,
                     ReleaseUnsupported, ServerError, ServiceUnavailable, Unauthorized, WaitTimeout)
from .http import RetryPolicy
from .models import TERMINAL_STATUSES, ClaimedJob, ClaimedJobs, CreatedJob, Download, Heartbeat, Job, JobPage, JobStatus, ResultAnswer

__all__ = ["Client", "RetryPolicy", "RESULT_RETRY", "result_body", "TERMINAL_STATUSES",
           "ClaimedJob", "ClaimedJobs", "CreatedJob", "Download", "Heartbeat", "Job", "JobPage", "JobStatus", "ResultAnswer",
           "ApiError", "BadRequest", "ClientError", "ConfigError", "Conflict", "ConnectionFailed", "DownloadError",
           "DownloadStopped", "Forbidden", "InvalidRequest", "LeaseLost", "NotFound", "PayloadTooLarge",
           "ReleaseUnsupported", "ServerError", "ServiceUnavailable", "Unauthorized", "WaitTimeout"]
