"""API keys and roles.

Keys are 256-bit random strings shown once; only their SHA-256 is kept, by the backend beside the jobs
(``store.base.KeyRepository``: ``<instance>/api_keys.json`` or a table). A plain SHA-256 is enough for
keys of this entropy; the lookup compares digests with ``hmac.compare_digest``.

Roles: ``worker`` polls and works on jobs, ``producer`` creates and manages them, ``admin`` may do
everything. A worker key may be bound to a worker id: it then polls only as that id and acts only on
jobs that id holds.

A key's last use is written back at most once a minute per key and process (``LAST_USED_RESOLUTION``),
so authentication costs no write on almost every request.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Callable

from flask import current_app, g, request

from .context import key_store
from .exceptions import ServiceError

ROLES = ("worker", "producer", "admin")
ANY = ROLES
KEY_PREFIX = "mrk_"
LAST_USED_RESOLUTION = 60.0  # seconds: how often a key's last use is written back
NAME_RULE = "1-64 letters, digits, '-', '_' or '.'"
MAX_WORKER_ID = 128  # the API's worker_id limit
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}

class Unauthorized(ServiceError):
    status_code = 401
    title = "Unauthorized"


class Forbidden(ServiceError):
    status_code = 403
    title = "Forbidden"


class KeyRequestInvalid(ServiceError):
    status_code = 422
    title = "Invalid key request"


class KeyFileUnreadable(ServiceError):
    """The key file exists but is not a key list: fail closed (no request is let through)."""

    status_code = 503
    title = "API keys unavailable"


@dataclass
class ApiKey:
    name: str
    role: str
    key_hash: str
    worker_id: str | None = None
    created_at: str | None = None
    last_used_at: str | None = None

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("key_hash")
        return data


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    worker_id: str | None = None

    def can(self, roles: tuple[str, ...]) -> bool:
        return self.role == "admin" or self.role in roles


ANONYMOUS_ADMIN = Principal(name="auth-disabled", role="admin")


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def auth_disabled(value: Any) -> bool:
    """``MORAG_REMOTE_AUTH_DISABLED`` read strictly: anything but a clear yes or no refuses to start.

    The environment gives JSON values (``true``) or plain strings (``False``, ``yes``); a string that
    merely looks false must never turn authentication off.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"MORAG_REMOTE_AUTH_DISABLED must be true or false, not {value!r}")


def validate_key_request(name: str, role: str, worker_id: str | None) -> None:
    """The rules of a new key, the same for every key store; KeyRequestInvalid when broken."""
    if role not in ROLES:
        raise KeyRequestInvalid(f"role must be one of {', '.join(ROLES)}")
    if not name or len(name) > 64 or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
        raise KeyRequestInvalid(f"name must be {NAME_RULE}")
    if worker_id is not None and role != "worker":
        raise KeyRequestInvalid("only worker keys can be bound to a worker id")
    if worker_id is not None and not 0 < len(worker_id) <= MAX_WORKER_ID:
        raise KeyRequestInvalid(f"a worker id has 1-{MAX_WORKER_ID} characters")


def authenticate_request() -> Principal:
    """The caller of the current request, or Unauthorized."""
    if current_app.config["AUTH_DISABLED"]:
        return ANONYMOUS_ADMIN
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    store = key_store()
    key = store.authenticate(secret.strip())
    if key is None:
        if not store.has_keys():
            raise Unauthorized("no API key exists on this server yet; an operator creates one with "
                               "'flask --app morag_remote keys create'")
        raise Unauthorized("the API key is not valid (unknown or revoked)")
    return Principal(name=key.name, role=key.role, worker_id=key.worker_id)


def requires(*roles: str) -> Callable:
    """View decorator: the caller must hold one of ``roles`` (admin always may)."""

    def decorator(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            principal = authenticate_request()
            if not principal.can(roles):
                raise Forbidden(f"this key's role ({principal.role}) may not do this")
            g.principal = principal
            return view(*args, **kwargs)

        wrapped.required_roles = roles  # read by the OpenAPI builder
        return wrapped

    return decorator


def current_principal() -> Principal:
    """The caller ``@requires`` let in; outside such a view, whoever the request's key says (fail
    closed: a view that forgot ``@requires`` gets a 401, never the anonymous admin)."""
    principal = g.get("principal")
    if principal is None:
        principal = g.principal = authenticate_request()
    return principal
