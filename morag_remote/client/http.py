"""The transport: one keep-alive ``http.client`` connection per thread, JSON in and out, and retries
of transient failures with capped exponential backoff and jitter.

Standard library only, so that a worker machine needs nothing but this package. What counts as
transient: no connection (refused, reset, DNS), a timeout, a broken answer, and the statuses 502,
503 and 504 (and 429), whose ``Retry-After`` is honoured (for a request that may not be resent,
only 503 and 429: a proxy's 502 or 504 does not say the server did nothing). A request that may
have reached the server (anything after the bytes were sent) is sent again only when the caller
says it is safe (``resend=True``: creates carry an ``Idempotency-Key``, heartbeats and results are
idempotent); a kept-alive connection that the server had closed before answering is retried once
at once on a fresh connection, for such a request, or for any whose bytes could not all be written.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import random
import select
import socket
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlencode, urlsplit

from .errors import ApiError, ClientError, ConfigError, ConnectionFailed, Conflict, error_for

RETRY_STATUSES = frozenset({429, 502, 503, 504})
# a result is idempotent and the end of long work: any server error may be passing (a full disk, a
# restart), so it is sent again like after no answer (not 501 or 505, which say it never can be)
# what a request that may not be resent is retried on: the server says it did nothing (a 502 or 504
# from a proxy does not: the upstream may have acted before the proxy gave up)
UNSENT_RETRY_STATUSES = frozenset({429, 503})
RESULT_RETRY_STATUSES = frozenset({429, *range(500, 600)}) - {501, 505}
MAX_ERROR_BODY = 64 * 1024


HOST_FULL_HEADER = "X-Poll-Host-Full"  # a poll the server could not let wait (its process had its most waiters)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry a transient failure.

    ``attempts`` counts every try (1: no retry); ``None`` retries until the server answers (for
    results, which must not be lost). The n-th delay is ``min(cap, base * 2**(n-1))``, of which a
    random half is taken off (so a thousand workers cut off together do not come back together),
    and never less than the server's ``Retry-After`` (itself capped at ``max_retry_after``).
    """

    attempts: int | None = 5
    base: float = 0.25
    cap: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, retry: int, retry_after: float | None = None,
              rng: Callable[[], float] = random.random) -> float:
        full = min(self.cap, self.base * 2.0 ** min(max(retry - 1, 0), 60))  # no overflow after 1024 tries
        delay = full / 2 + rng() * full / 2
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay

    def gives_up(self, attempt: int) -> bool:
        return self.attempts is not None and attempt >= self.attempts


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class _Attempt:
    """What one try ended in: an answer, or an OSError and whether the bytes may have been sent."""

    response: Response | None = None
    error: BaseException | None = None
    sent: bool = False     # the request may have been seen (we began to send it)
    written: bool = False  # every byte of it went out
    stale: bool = False


@dataclass(eq=False)  # hashed by identity: kept in a set of live connections
class _Conn:
    """A thread's connection. Only the thread-local holds it strongly: when the thread ends, the
    finalizer closes the socket (a worker starts threads per job; their connections must not pile
    up until the process runs out of file descriptors)."""

    conn: http.client.HTTPConnection
    used: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.closer = weakref.finalize(self, self.conn.close)


def parse_base_url(base_url: str) -> tuple[str, str, int | None, str]:
    """(scheme, host, port, path prefix) of an ``http://`` or ``https://`` URL; ConfigError else."""
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"the server URL {base_url!r} must start with http:// or https:// and name a host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"the server URL {base_url!r} has a bad port") from None
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _dropped(sock: socket.socket | None) -> bool:
    """Whether an idle kept-alive socket was closed by the server (readable with nothing to read)."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and not sock.recv(1, socket.MSG_PEEK)
    except (OSError, ValueError):
        return True


class Transport:
    """HTTP to one service. Thread-safe: each thread keeps its own connection, closed when the
    thread ends (or at once by :meth:`discard`)."""

    def __init__(self, base_url: str, key: str, timeout: float = 30.0, retry: RetryPolicy | None = None,
                 user_agent: str = "morag-remote-client",
                 on_retry: Callable[[str, str, str], None] | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        self.scheme, self.host, self.port, self.prefix = parse_base_url(base_url)
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self.rng = rng
        self._headers = {"Authorization": f"Bearer {key}", "User-Agent": user_agent,
                         "Accept": "application/json, application/problem+json"}
        self._local = threading.local()
        self._live: weakref.WeakSet[_Conn] = weakref.WeakSet()  # for abort() and close()
        self._live_lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return f"Transport({self.base_url!r})"

    # -- connections ----------------------------------------------------------------------------

    def _connection(self) -> _Conn:
        held = getattr(self._local, "conn", None)
        if held is None:
            cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            held = _Conn(cls(self.host, self.port, timeout=self.timeout))
            self._local.conn = held
            with self._live_lock:
                self._live.add(held)
        return held

    def _drop(self) -> None:
        held = getattr(self._local, "conn", None)
        if held is not None:
            self._local.conn = None
            with self._live_lock:
                self._live.discard(held)
            held.closer()

    def abort(self) -> None:
        """Break every connection in use (from another thread): a long poll in flight returns at
        once with ConnectionFailed. For a worker that stops polling on SIGTERM."""
        with self._live_lock:
            live = list(self._live)
        for held in live:
            sock = held.conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._live_lock:
            live, self._live = list(self._live), weakref.WeakSet()
        for held in live:
            held.closer()

    def url_path(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        """``path`` (absolute, from the API root) under the base URL's own path, with ``query``."""
        full = path if path.startswith(self.prefix + "/") and self.prefix else self.prefix + path
        if query:
            items = {k: v for k, v in query.items() if v is not None}
            if items:
                full += ("&" if "?" in full else "?") + urlencode(items)
        return full

    # -- one request ----------------------------------------------------------------------------

    def open(self, method: str, path: str, headers: Mapping[str, str] | None = None,
             timeout: float | None = None) -> http.client.HTTPResponse:
        """Send one request and return the answer unread (for streaming). No retry; OSError and
        http.client.HTTPException propagate. Read it to the end or call :meth:`discard`."""
        held = self._connection()
        conn = held.conn
        conn.timeout = timeout or self.timeout
        if conn.sock is not None:
            conn.sock.settimeout(conn.timeout)
        try:
            conn.request(method, path, headers={**self._headers, **(headers or {})})
            return conn.getresponse()
        except BaseException:
            self._drop()
            raise

    def discard(self) -> None:
        """Close and forget this thread's connection (after a stream that was not read to its end,
        or when a thread is done with the service)."""
        self._drop()

    def _once(self, method: str, path: str, body: bytes | None, headers: dict[str, str],
              timeout: float) -> _Attempt:
        held = self._connection()
        if held.used and _dropped(held.conn.sock):  # the server closed it while it was idle
            self._drop()
            held = self._connection()
        reused = held.used > 0
        conn = held.conn
        conn.timeout = timeout
        attempt = _Attempt()
        try:
            if conn.sock is None:
                conn.connect()
            conn.sock.settimeout(timeout)
            attempt.sent = True  # from here on the server may have seen it
            conn.request(method, path, body=body, headers=headers)
            attempt.written = True
            raw = conn.getresponse()
            data = raw.read()
            held.used += 1
            attempt.response = Response(raw.status, {k.lower(): v for k, v in raw.getheaders()}, data)
            if raw.will_close:
                self._drop()
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            attempt.error = exc
            attempt.stale = reused and isinstance(exc, (http.client.RemoteDisconnected, BrokenPipeError,
                                                        ConnectionResetError))
        return attempt

    def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None, json_body: Any = None,
                headers: Mapping[str, str] | None = None, timeout: float | None = None,
                retry: RetryPolicy | None = None, resend: bool = True, stop: threading.Event | None = None,
                conflict: type[Conflict] = Conflict, retry_statuses: frozenset[int] | None = None) -> Response:
        """Send a request, retrying transient failures; the answer when its status is below 400.

        An error status raises the matching :class:`ApiError`; no answer after the retries raises
        :class:`ConnectionFailed`. ``stop`` cuts the waits between tries short (the last failure is
        raised then); ``resend=False`` retries only failures that happened before the request was
        sent and the statuses 503 and 429. ``retry_statuses`` replaces the error statuses retried
        (default RETRY_STATUSES).
        """
        policy = retry or self.retry
        target = self.url_path(path, query)
        all_headers = dict(self._headers, **(headers or {}))
        body = None
        if json_body is not None:
            body = json.dumps(json_body, ensure_ascii=False).encode()  # "\u00fc" is 6 bytes, "ü" 2
            all_headers["Content-Type"] = "application/json"
        tries = 0
        while True:
            tries += 1
            attempt = self._once(method, target, body, all_headers, timeout or self.timeout)
            if attempt.error is not None and attempt.stale and (resend or not attempt.written) \
                    and not (stop is not None and stop.is_set()):
                # a kept-alive connection the server had closed: again at once on a new one; but
                # not a request that went out whole and may not be resent (the server may have
                # read it before the connection broke: a poll), nor once told to stop
                attempt = self._once(method, target, body, all_headers, timeout or self.timeout)
            response = attempt.response
            if response is not None and response.status < 400:
                return response
            if response is not None:
                failure: ClientError = self._error(method, path, response, conflict)
                retryable = response.status in (retry_statuses or (RETRY_STATUSES if resend else UNSENT_RETRY_STATUSES))
                retry_after = retry_after_seconds(response.headers.get("retry-after"))
                reason = str(response.status)
            else:
                failure = ConnectionFailed(method, path, attempt.error, tries)
                retryable = resend or not attempt.sent
                retry_after = None
                reason = type(attempt.error).__name__
            if not retryable or policy.gives_up(tries):
                raise failure
            delay = policy.delay(tries, retry_after, self.rng)
            if self.on_retry is not None:
                self.on_retry(method, path, reason)
            if stop is not None:
                if stop.wait(delay):
                    raise failure
            else:
                time.sleep(delay)

    @staticmethod
    def _error(method: str, path: str, response: Response, conflict: type[Conflict]) -> ApiError:
        problem: dict[str, Any]
        try:
            parsed = json.loads(response.body[:MAX_ERROR_BODY]) if response.body else {}
            problem = parsed if isinstance(parsed, dict) else {"detail": str(parsed)}
        except ValueError:
            problem = {"detail": response.body[:500].decode("utf-8", "replace")}
        problem.setdefault("status", response.status)
        problem.setdefault("title", http.client.responses.get(response.status, "Error"))
        if response.status in (502, 504) and "detail" not in problem:
            problem["detail"] = "a proxy in front of the service had no answer from it"
        return error_for(method, path, response.status, problem, response.headers, conflict)

