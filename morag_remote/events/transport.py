"""One HTTP POST of an event body, with separate connect and read timeouts and no redirects.

Plain ``http.client`` (no extra dependency): it never follows a redirect (a 3xx is a failed attempt,
so an allowed receiver cannot forward the request to an address the allow-list refuses), ignores
proxy variables, and sends the body bytes exactly as signed. The receiver's answer body is not read.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from . import signing

USER_AGENT = "morag-remote-events/1"


@dataclass(frozen=True)
class AttemptResult:
    ok: bool
    status: int | None = None
    error: str | None = None


def post_event(url: str, body: bytes, event_id: str, secret: str | None, *,
               connect_timeout: float, read_timeout: float, timestamp: int | None = None) -> AttemptResult:
    """POST ``body`` to ``url``; ok when the receiver answered 2xx."""
    ts = int(time.time()) if timestamp is None else timestamp
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-MoRAG-Event-Id": event_id,
        "X-MoRAG-Timestamp": str(ts),
        "Connection": "close",
    }
    if secret:
        headers["X-MoRAG-Signature"] = signing.signature(secret, ts, body)
    try:  # the operator's CALLBACK_URL is not checked at start: a bad one is a failed attempt
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("not an http(s) URL with a host")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=connect_timeout, context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=connect_timeout)
    except ValueError as exc:
        return AttemptResult(False, error=f"bad callback URL: {exc}")
    try:
        conn.connect()
        conn.sock.settimeout(read_timeout)
        conn.request("POST", target, body=body, headers=headers)
        status = conn.getresponse().status
    except socket.timeout:
        return AttemptResult(False, error="timed out")
    except (OSError, http.client.HTTPException, UnicodeError) as exc:  # UnicodeError: a URL http.client cannot send
        return AttemptResult(False, error=f"{type(exc).__name__}: {exc}"[:300])
    finally:
        conn.close()
    if 200 <= status < 300:
        return AttemptResult(True, status=status)
    return AttemptResult(False, status=status, error=f"HTTP {status}")
