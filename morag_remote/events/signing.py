"""Event signatures: ``X-MoRAG-Signature: sha256=<hex>``, the HMAC-SHA256 with the shared secret over
``<X-MoRAG-Timestamp> + "." + <exact body bytes>``.

The timestamp is part of what is signed so a captured request cannot be replayed later with a fresh
timestamp; ``verify`` (for receivers written in Python) also refuses timestamps too far from now.
"""
from __future__ import annotations

import hashlib
import hmac
import time

SCHEME = "sha256="
DEFAULT_TOLERANCE_SECONDS = 300


def signature(secret: str, timestamp: int | str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return SCHEME + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, header: str, *, now: float | None = None,
           tolerance: float = DEFAULT_TOLERANCE_SECONDS) -> bool:
    """True when ``header`` is the signature of ``body`` at ``timestamp`` and the timestamp is fresh."""
    try:
        sent = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body), header or "")
