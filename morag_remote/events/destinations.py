"""Where an event may be sent: the operator's ``CALLBACK_URL``, or a job's own
``task_options.webhook_url`` when it starts with one of ``CALLBACK_ALLOWED_PREFIXES``.

A producer must not be able to make the server POST to an arbitrary address (an internal admin
port, a cloud metadata service), so a job's URL is checked against the operator's list when the job
is created and again before each attempt. A prefix that ends in a host name matches only that host
(``https://hooks.example`` allows ``https://hooks.example/x`` but not ``https://hooks.example.evil``),
and URLs with credentials, whitespace or backslashes are refused outright. Redirects are never followed
(see ``transport.py``), so an allowed receiver cannot bounce the request elsewhere.
"""
from __future__ import annotations

from typing import Iterable
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
_BOUNDARY = "/?#"


def normalize_prefixes(value: Iterable[str] | str | None) -> tuple[str, ...]:
    """The configured prefixes as a tuple (a single string is one prefix)."""
    if not value:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(p) for p in value if p)


def webhook_problem(url: object, prefixes: Iterable[str]) -> str | None:
    """Why ``url`` may not be a job's webhook (None when it may)."""
    if not isinstance(url, str) or not url:
        return "must be a non-empty string"
    if len(url) > MAX_URL_LENGTH:
        return f"must be at most {MAX_URL_LENGTH} characters"
    if any(c.isspace() or ord(c) < 0x20 or c == "\\" for c in url):
        return "must not contain whitespace, control characters or backslashes"
    if not url.isascii():
        return "must be ASCII (percent-encode other characters, and write a host name in its xn-- form)"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return "is not a valid URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http(s) URL with a host"
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials"
    allowed = tuple(prefixes)
    if not allowed:
        return "is not accepted: no webhook URL prefixes are configured (MORAG_REMOTE_CALLBACK_ALLOWED_PREFIXES)"
    if not any(_matches(url, prefix) for prefix in allowed):
        return "does not start with an allowed prefix (MORAG_REMOTE_CALLBACK_ALLOWED_PREFIXES)"
    return None


def _matches(url: str, prefix: str) -> bool:
    if not url.startswith(prefix):
        return False
    if len(url) == len(prefix) or prefix.endswith(tuple(_BOUNDARY)):
        return True
    return url[len(prefix)] in _BOUNDARY


def job_webhook(task_options: dict | None, prefixes: Iterable[str]) -> str | None:
    """The job's own webhook URL when it names an allowed one, else None."""
    url = (task_options or {}).get("webhook_url")
    if url is None or webhook_problem(url, prefixes) is not None:
        return None
    return url
