"""Result artifacts: files a worker uploads while it holds a job's lease, staged for that attempt,
and made part of the job, atomically, by its successful result.

- ``PUT /<id>/artifacts/<name>`` checks the lease before and after the bytes are stored, so a
  worker whose lease lapsed gets 409 and what it sent is never shown. Bytes go to the blob store
  under the attempt (its lease id); a name uploaded again replaces the earlier upload of the attempt.
- The successful result reads the attempt's staged artifacts (a name it expects but that is not
  there is 422) and the job record takes their names, sizes, sha256 and files in the same write
  that completes it: the record is the only list the producer is shown.
- Artifacts of any other attempt (lost lease, failure, cancel, release) are discarded when the job
  moves on (this module observes the service's transitions), and ``fsck --repair`` removes any
  left by a crash; deleting a job and ``cleanup-old`` remove its artifacts.
"""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Callable, Iterator

import structlog

from .errors import NO_SPACE
from .exceptions import (ArtifactNotFound, DigestMismatch, JobNotFound, InsufficientStorage, InvalidRequest, LeaseConflict,
                         PayloadTooLarge, ServiceError)
from .models import Action, RemoteJob, Status
from .store.base import BlobStore, Finding, JobRepository, StoredArtifact

log = structlog.get_logger(__name__)

PIECE = 1024 * 1024
MAX_NAME_BYTES = 255
_DIGEST = re.compile(r"(?:^|,)\s*sha-256\s*=\s*:([A-Za-z0-9+/=]*):")


@dataclass(frozen=True)
class ArtifactSettings:
    max_bytes: int = 4 * 1024 ** 3
    max_job_bytes: int = 16 * 1024 ** 3
    max_count: int = 100

    @classmethod
    def from_config(cls, config) -> "ArtifactSettings":
        return cls(int(config["MAX_ARTIFACT_BYTES"]), int(config["MAX_JOB_ARTIFACT_BYTES"]),
                   int(config["MAX_ARTIFACTS"]))


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name an artifact, or None: no path separators, no dot files (nor ``..``),
    no NUL or other control characters, 1-255 bytes of UTF-8."""
    if not name:
        return "is empty"
    if "/" in name or "\\" in name:
        return "contains a path separator"
    if name.startswith("."):
        return "starts with a dot (no dot files, no '.' or '..')"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "contains a NUL or another control character"
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(encoded) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes as UTF-8 ({len(encoded)})"
    return None


def check_name(name: str) -> None:
    problem = name_problem(name)
    if problem is not None:
        raise InvalidRequest(f"the artifact name {problem}", {"name": [problem]})


def content_sha256(header: str | None) -> bytes | None:
    """The sha-256 a ``Content-Digest`` header states (RFC 9530); None when it states none."""
    match = _DIGEST.search(header or "")
    if not match:
        return None
    try:
        digest = base64.b64decode(match.group(1), validate=True)
    except binascii.Error:
        digest = b""
    if len(digest) != 32:
        raise DigestMismatch("Content-Digest's sha-256 is not 32 bytes of base64")
    return digest


def repr_digest(sha256_hex: str) -> str:
    return f"sha-256=:{base64.b64encode(bytes.fromhex(sha256_hex)).decode()}:"


class Artifacts:
    def __init__(self, blobs: BlobStore, service: Any, settings: ArtifactSettings) -> None:
        self.blobs = blobs
        self.service = service
        self.settings = settings
        self.count_bytes: Callable[[int], None] = lambda n: None  # metrics set it

    # -- the worker ------------------------------------------------------------------------------

    def put(self, job_id: str, name: str, caller: Any, stream: BinaryIO, content_length: int | None,
            digest_header: str | None) -> tuple[StoredArtifact, bool]:
        """Store one artifact for the caller's attempt; (the artifact, whether it is new)."""
        check_name(name)
        expected = content_sha256(digest_header)
        job = self.service.get(job_id)
        self.service.holder_check(job, caller)  # 409: not processing, or another attempt's lease
        attempt = job.lease_id
        staged = [a for a in self.blobs.staged_artifacts(job_id, attempt)]
        others = [a for a in staged if a.name != name]
        if len(others) >= self.settings.max_count:
            raise InvalidRequest(f"an attempt may upload at most {self.settings.max_count} artifacts",
                                 {"name": [f"at most {self.settings.max_count} artifacts"]})
        limit = min(self.settings.max_bytes, self.settings.max_job_bytes - sum(a.size for a in others))
        if content_length is not None and content_length > limit:
            raise PayloadTooLarge(self._too_large(limit))
        try:
            artifact = self.blobs.stage_artifact(job_id, attempt, name, _pieces(stream, content_length), limit,
                                                 expected)
        except PayloadTooLarge:
            raise PayloadTooLarge(self._too_large(limit)) from None
        except FileNotFoundError:  # the attempt's folder was discarded meanwhile: the lease moved on
            raise LeaseConflict(f"job {job_id} moved on while the artifact was uploaded: it was discarded",
                                job_status=self.service.get(job_id).status) from None
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise InsufficientStorage("the blob store's disk is full: the artifact was not stored") from None
            raise
        now = self.service.get(job_id)
        if now.lease_id != attempt or now.status != Status.PROCESSING.value:
            # stored under an attempt that is over: never shown, discarded with it
            raise LeaseConflict(f"the lease on job {job_id} was lost while the artifact was uploaded; "
                                "it will not be part of any result", job_status=now.status)
        self.count_bytes(artifact.size)
        log.info("artifact.staged", job_id=job_id, name=name, size=artifact.size, attempt=attempt)
        return artifact, name not in {a.name for a in staged}

    def _too_large(self, limit: int) -> str:
        return (f"the artifact is larger than the {limit} bytes it may have (MAX_ARTIFACT_BYTES per file, "
                "MAX_JOB_ARTIFACT_BYTES per attempt)")

    def for_result(self, job_id: str, lease_id: str | None, expected: list[str] | None
                   ) -> tuple[list[dict[str, Any]] | None, str | None]:
        """The artifacts a successful result takes (and the attempt they belong to): those staged
        for the attempt, or exactly the ``expected`` names (422 when one is missing)."""
        job = self.service.get(job_id)
        attempt = lease_id or job.lease_id
        staged = self.blobs.staged_artifacts(job_id, attempt) if attempt else []
        if expected is not None:
            for name in expected:
                check_name(name)
            have = {a.name: a for a in staged}
            missing = [n for n in dict.fromkeys(expected) if n not in have]
            if missing:
                raise InvalidRequest(f"the result expects artifacts that were not uploaded: {', '.join(missing)}",
                                     {"artifacts": [f"not uploaded: {n}" for n in missing]})
            staged = [have[n] for n in dict.fromkeys(expected)]
        if not staged:
            return None, attempt
        return [{**asdict(a), "attempt": attempt} for a in staged], attempt

    # -- the producer ----------------------------------------------------------------------------

    def open(self, job: RemoteJob, name: str) -> tuple[dict[str, Any], BinaryIO, Any]:
        entry = next((a for a in job.artifacts or () if a.get("name") == name), None)
        if entry is None:
            raise ArtifactNotFound(f"job {job.id} has no artifact named {name!r}")
        try:
            fh, st = self.blobs.open_blob(entry["file"])
        except FileNotFoundError:
            raise ArtifactNotFound(f"the artifact {name!r} of job {job.id} is missing from the blob store "
                                   "(an operator runs remote-jobs fsck)") from None
        return entry, fh, st

    # -- housekeeping ----------------------------------------------------------------------------

    @staticmethod
    def keep_of(job: RemoteJob) -> set[str]:
        keep = {a["attempt"] for a in job.artifacts or () if a.get("attempt")}
        if job.status == Status.PROCESSING.value and job.lease_id:
            keep.add(job.lease_id)
        return keep

    def job_changed(self, action: Action, job: RemoteJob) -> None:
        """The service's observer: an attempt that ended without its result taking the artifacts
        (lapse, failure, cancel, release, a new claim) has them discarded now."""
        if action in (Action.HEARTBEAT, Action.COMPLETE):
            return
        self.blobs.remove_artifacts(job.id, self.keep_of(job))

    def remove_job(self, job_id: str) -> None:
        self.blobs.remove_artifacts(job_id, ())

    def sweep(self, store: JobRepository) -> int:
        """Remove the artifacts of jobs that no longer exist (after ``cleanup-old``)."""
        try:
            existing = {job.id for job in store.iter_all()}
        except (ValueError, TypeError, KeyError, JobNotFound):  # an unreadable job: fsck first
            return 0
        removed = 0
        for job_id in self.blobs.artifact_job_ids():
            if job_id not in existing and not job_id.startswith("."):
                removed += self.blobs.remove_artifacts(job_id, ())
        return removed

    def fsck(self, store: JobRepository, repair: bool) -> list[Finding]:
        def referenced() -> tuple[set[str], dict[str, set[str]]] | None:
            """What the jobs name; None when a job cannot be read (the backend's fsck reports it):
            then nothing is taken for an orphan."""
            sources: set[str] = set()
            keep: dict[str, set[str]] = {}
            try:
                for job in store.iter_all():
                    sources.add(job.source_file_path)
                    keep[job.id] = self.keep_of(job)
            except (ValueError, TypeError, KeyError, JobNotFound):
                return None
            return sources, keep

        return self.blobs.fsck(referenced, repair)


def _pieces(stream: BinaryIO, content_length: int | None) -> Iterator[bytes]:
    """The body in pieces; a body that ends before its Content-Length (the client went away) is
    an error, so that the part that came is never stored as the artifact."""
    received = 0
    while True:
        piece = stream.read(PIECE)
        if not piece:
            if content_length is not None and received < content_length:
                raise ServiceError(f"the body ended after {received} of its {content_length} bytes: nothing "
                                   "was stored")
            return
        received += len(piece)
        yield piece


def entries(job: RemoteJob, url: Callable[[str], str]) -> list[dict[str, Any]]:
    """What a producer is shown of a job's artifacts: name, size, sha256 and download URL."""
    return [{"name": a["name"], "size": a["size"], "sha256": a["sha256"], "url": url(a["name"])}
            for a in job.artifacts or ()]
