"""A download streamed to disk and resumed with ``Range`` when the stream breaks.

The bytes go to ``<dest>.part`` and are renamed into place once their count equals the size the
server announced (``Content-Length`` of a 200, the complete length of a 206's ``Content-Range``)
and, when the server sends ``Repr-Digest: sha-256=:<base64>:``, their SHA-256 matches. A resumed
request carries ``If-Range`` with the first answer's validator, so a file that changed on the
server in between comes whole again (200) rather than spliced.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import threading
import time
from typing import Callable
from urllib.parse import unquote, urlsplit

from .errors import ConnectionFailed, DownloadError, DownloadStopped, LeaseLost
from .http import RETRY_STATUSES, Response, RetryPolicy, Transport, retry_after_seconds
from .models import Download

CHUNK = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+)")
_SHA256 = re.compile(r"(?:^|,)\s*sha-256\s*=\s*:([A-Za-z0-9+/=]+):")
_FILENAME_STAR = re.compile(r"filename\*\s*=\s*UTF-8''([^;\s]+)", re.IGNORECASE)
_FILENAME = re.compile(r'filename\s*=\s*"?([^";]+)"?', re.IGNORECASE)


def expected_sha256(header: str | None) -> bytes | None:
    """The SHA-256 a ``Repr-Digest`` header states (RFC 9530), or None."""
    match = _SHA256.search(header or "")
    if not match:
        return None
    try:
        return base64.b64decode(match.group(1), validate=True)
    except ValueError:
        return None


def attachment_name(header: str | None) -> str | None:
    """A safe file name from ``Content-Disposition`` (``filename*`` first): the last path part, no
    leading dots, no control characters; None when nothing usable is left."""
    if not header:
        return None
    match = _FILENAME_STAR.search(header)
    name = unquote(match.group(1), errors="replace") if match else None
    if name is None:
        plain = _FILENAME.search(header)
        name = plain.group(1) if plain else None
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if c >= " " and c != "\x7f").lstrip(".").strip()
    return name[:200] or None


def request_target(transport: Transport, url: str) -> str:
    """The request target of a ``source_file_url`` (relative to the base URL, or absolute)."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return transport.url_path(path) if not parts.scheme else path


class _Broken(Exception):
    """The stream ended or failed before every byte came; resume."""


class _LocalWrite(Exception):
    """Writing the file failed (a full disk): not the network's fault, so not retried."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def download(transport: Transport, url: str, dest: str, *, lease_id: str | None = None,
             retry: RetryPolicy | None = None, stop: threading.Event | None = None,
             on_bytes: Callable[[int], None] | None = None, timeout: float | None = None) -> Download:
    """Fetch ``url`` into ``dest`` (a file path, or an existing folder: the server's file name is
    used there). A broken stream is resumed with Range; retries follow ``retry`` (counted from the
    last progress). 409 is LeaseLost; sizes or digest that disagree raise DownloadError; ``stop``
    set ends it between two chunks (or during a wait between tries) with DownloadStopped."""
    policy = retry or transport.retry
    target = request_target(transport, url)
    fetch = _Fetch(transport, target, lease_id, timeout, on_bytes, stop)
    into_folder = os.path.isdir(dest)
    part = os.path.join(dest, ".download.part") if into_folder else dest + ".part"
    failures = 0
    with open(part, "wb") as fh:
        while True:
            try:
                if stop is not None and stop.is_set():
                    raise DownloadStopped(f"GET {target.split('?')[0]}: stopped after {fetch.have} bytes")
                if fetch.step(fh):
                    break
                failures = 0
                continue
            except DownloadStopped:
                fh.close()
                _remove(part)
                raise
            except _LocalWrite as exc:
                fh.close()
                _remove(part)
                raise exc.error from None
            except _Broken as exc:
                if fetch.progressed:
                    failures = 0
                failures += 1
                cause = exc.__cause__ or exc
            except (OSError, http.client.HTTPException) as exc:
                failures += 1
                cause = exc
            if isinstance(cause, _Status):
                failure: Exception = cause.error
                retry_after = cause.retry_after
            else:
                failure = ConnectionFailed("GET", target.split("?")[0], cause, failures)
                retry_after = None
            if policy.gives_up(failures):
                _remove(part)
                raise failure
            delay = policy.delay(failures, retry_after, transport.rng)
            if stop is not None and stop.wait(delay):
                _remove(part)
                raise DownloadStopped(f"GET {target.split('?')[0]}: stopped after {fetch.have} bytes") from failure
            if stop is None:
                time.sleep(delay)
        written = fh.tell()
    if fetch.total is not None and written != fetch.total:
        _remove(part)
        raise DownloadError(f"the file holds {written} bytes, the server announced {fetch.total}")
    if fetch.digest is not None and fetch.hasher.digest() != fetch.digest:
        _remove(part)
        raise DownloadError(f"the downloaded bytes' sha-256 is {fetch.hasher.hexdigest()}, the server "
                            f"announced {fetch.digest.hex()}")
    name = fetch.filename
    final = os.path.join(dest, name or "source") if into_folder else dest
    os.replace(part, final)
    return Download(path=final, size=fetch.have, sha256=fetch.hasher.hexdigest(),
                    digest_checked=fetch.digest is not None, resumed=fetch.resumes,
                    filename=name)


class _Status(Exception):
    def __init__(self, error: Exception, retry_after: float | None) -> None:
        self.error = error
        self.retry_after = retry_after


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Fetch:
    """The state of one download across its requests."""

    def __init__(self, transport: Transport, target: str, lease_id: str | None, timeout: float | None,
                 on_bytes: Callable[[int], None] | None, stop: threading.Event | None = None) -> None:
        self.transport = transport
        self.stop = stop
        self.target = target
        self.lease_id = lease_id
        self.timeout = timeout
        self.on_bytes = on_bytes
        self.have = 0
        self.total: int | None = None
        self.validator: str | None = None
        self.digest: bytes | None = None
        self.filename: str | None = None
        self.hasher = hashlib.sha256()
        self.resumes = 0
        self.progressed = False

    def step(self, fh) -> bool:
        """One request; True when every byte is in. Raises _Broken to resume."""
        self.progressed = False
        headers = {"X-Lease-Id": self.lease_id} if self.lease_id else {}
        fh.seek(self.have)  # whatever a broken try wrote past what was counted goes
        fh.truncate()
        if self.have:
            headers["Range"] = f"bytes={self.have}-"
            if self.validator:
                headers["If-Range"] = self.validator
        try:
            resp = self.transport.open("GET", self.target, headers, self.timeout)
        except (OSError, http.client.HTTPException) as exc:
            raise _Broken("no answer") from exc
        try:
            if not self._accept(resp, fh):
                return True
            self._read(resp, fh)
        except BaseException:
            resp.close()
            self.transport.discard()  # a connection whose stream broke is not used again
            raise
        if not resp.isclosed():
            resp.close()
            self.transport.discard()
        if self.total is None:  # no length announced (chunked): a clean end is the end
            return True
        if self.have >= self.total:
            if self.have > self.total:
                raise DownloadError(f"the server sent {self.have} bytes, more than the {self.total} it announced")
            return True
        self.transport.discard()
        raise _Broken(f"the stream ended after {self.have} of {self.total} bytes")

    def _accept(self, resp: http.client.HTTPResponse, fh) -> bool:
        """Check the answer's status and headers; False when nothing is left to read."""
        if resp.status == 206:
            match = _CONTENT_RANGE.match(resp.getheader("Content-Range") or "")
            if not match or int(match.group(1)) != self.have:
                raise DownloadError(f"the server answered Range bytes={self.have}- with "
                                    f"Content-Range {resp.getheader('Content-Range')!r}")
            if self.total is not None and int(match.group(3)) != self.total:
                raise DownloadError(f"the resumed answer says the file has {match.group(3)} bytes, the first "
                                    f"said {self.total}: it changed on the server")
            self.total = int(match.group(3))
            self.resumes += 1
        elif resp.status == 200:
            if self.have:  # the file changed (If-Range failed) or the server ignores Range: start over
                fh.seek(0)
                fh.truncate()
                self.have = 0
                self.hasher = hashlib.sha256()
            length = resp.getheader("Content-Length")
            self.total = int(length) if length and length.isdigit() else None
            self.validator = resp.getheader("ETag") or resp.getheader("Last-Modified")
            self.filename = attachment_name(resp.getheader("Content-Disposition"))
        elif resp.status == 416 and self.total is not None and self.have == self.total:
            resp.read()
            return False
        else:
            body = resp.read(64 * 1024)
            answer = Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)
            error = Transport._error("GET", self.target.split("?")[0], answer, LeaseLost)
            if resp.status in RETRY_STATUSES:
                raise _Broken(f"answered {resp.status}") from _Status(error, retry_after_seconds(resp.getheader("Retry-After")))
            raise error
        digest = expected_sha256(resp.getheader("Repr-Digest"))
        if digest is not None:
            self.digest = digest
        return True

    def _read(self, resp: http.client.HTTPResponse, fh) -> None:
        while True:
            if self.stop is not None and self.stop.is_set():
                raise DownloadStopped(f"GET {self.target.split('?')[0]}: stopped after {self.have} bytes")
            try:
                chunk = resp.read1(CHUNK)  # what has come, so that a slow stream still sees stop
            except (OSError, http.client.HTTPException) as exc:
                raise _Broken("the stream broke") from exc
            if not chunk:
                return
            try:
                fh.write(chunk)
            except OSError as exc:
                raise _LocalWrite(exc) from exc
            self.hasher.update(chunk)
            self.have += len(chunk)
            self.progressed = True
            if self.on_bytes is not None:
                self.on_bytes(len(chunk))
