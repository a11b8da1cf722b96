"""Signed, expiring download tokens bound to a job's current attempt.

The poll response's ``source_file_url`` carries one, so a worker that sends only its key and that
URL (the seed's worker) can download, and the URL stops working once the attempt is over: the token
names the lease id, which a re-queue or a new claim replaces.

A token that is forged, altered, expired or issued for another job is 403 (it proves nothing); a
genuine token for this job whose attempt is over is 409, like every other stale worker's request:
the worker was right once, and the answer tells it the job moved on.
"""
from __future__ import annotations

from itsdangerous import BadData, URLSafeTimedSerializer

SALT = "morag-remote.download"
MAX_AGE_SECONDS = 7 * 24 * 3600  # an upper bound only: the lease check is what ends a token


class DownloadTokens:
    def __init__(self, secret_key: str) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt=SALT)

    def issue(self, job_id: str, lease_id: str) -> str:
        return self._serializer.dumps([job_id, lease_id])

    def lease_of(self, token: str, job_id: str) -> str | None:
        """The lease id the token was issued for, when it is genuine, unexpired and for this job."""
        try:
            value = self._serializer.loads(token, max_age=MAX_AGE_SECONDS)
        except BadData:
            return None
        if not (isinstance(value, list) and len(value) == 2 and value[0] == job_id):
            return None
        return value[1] if isinstance(value[1], str) else None
