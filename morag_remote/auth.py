"""API keys and roles.

Keys are 256-bit random strings shown once; only their SHA-256 is kept, in ``<instance>/api_keys.json``
(written atomically under a lock, so the CLI can add or revoke keys while gunicorn serves: every
process reloads the file when it changes). A plain SHA-256 is enough for keys of this entropy; the
lookup compares digests with ``hmac.compare_digest``.

Roles: ``worker`` polls and works on jobs, ``producer`` creates and manages them, ``admin`` may do
everything. A worker key may be bound to a worker id: it then polls only as that id and acts only on
jobs that id holds.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import structlog
from flask import current_app, g, request

from .context import KEYS
from .exceptions import ServiceError
from .models import to_iso, utcnow
from .store.atomic import FileLock, read_json, write_json_atomic

ROLES = ("worker", "producer", "admin")
ANY = ROLES
KEY_PREFIX = "mrk_"
LAST_USED_RESOLUTION = 60.0  # seconds: how often a key's last use is written back

log = structlog.get_logger(__name__)


class Unauthorized(ServiceError):
    status_code = 401
    title = "Unauthorized"


class Forbidden(ServiceError):
    status_code = 403
    title = "Forbidden"


class KeyRequestInvalid(ServiceError):
    status_code = 422
    title = "Invalid key request"


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
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock = FileLock(self.path.with_name(self.path.name + ".lock"))
        self._keys: dict[str, ApiKey] = {}
        self._stamp: tuple[int, int] | None = None
        self._used: dict[str, float] = {}

    def _load(self) -> dict[str, ApiKey]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._keys, self._stamp = {}, None
            return self._keys
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp != self._stamp:
            data = read_json(self.path)
            self._keys = {k["name"]: ApiKey(**k) for k in data.get("keys", [])}
            self._stamp = stamp
        return self._keys

    def _save(self, keys: dict[str, ApiKey]) -> None:
        write_json_atomic(self.path, {"keys": [asdict(k) for k in keys.values()]})
        self._stamp = None

    def create(self, name: str, role: str, worker_id: str | None = None) -> tuple[ApiKey, str]:
        if role not in ROLES:
            raise KeyRequestInvalid(f"role must be one of {', '.join(ROLES)}")
        if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
            raise KeyRequestInvalid("name must be 1-64 letters, digits, '-', '_' or '.'")
        if worker_id is not None and role != "worker":
            raise KeyRequestInvalid("only worker keys can be bound to a worker id")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.lock.hold():
            keys = dict(self._load())
            if name in keys:
                raise KeyRequestInvalid(f"a key named {name!r} exists; revoke it first")
            key = ApiKey(name=name, role=role, key_hash=hash_key(secret), worker_id=worker_id,
                         created_at=to_iso(utcnow()))
            keys[name] = key
            self._save(keys)
        log.info("key.created", name=name, role=role, worker_id=worker_id)
        return key, secret

    def list(self) -> list[ApiKey]:
        with self.lock.hold(exclusive=False):
            return sorted(self._load().values(), key=lambda k: k.name)

    def revoke(self, name: str) -> None:
        with self.lock.hold():
            keys = dict(self._load())
            if name not in keys:
                raise KeyRequestInvalid(f"no key named {name!r}")
            del keys[name]
            self._save(keys)
        log.info("key.revoked", name=name)

    def has_keys(self) -> bool:
        return bool(self._load())

    def authenticate(self, secret: str) -> ApiKey | None:
        digest = hash_key(secret)
        found = None
        for key in self._load().values():  # every comparison runs: no early exit to time
            if hmac.compare_digest(key.key_hash, digest):
                found = key
        if found is not None:
            self._touch(found.name)
        return found

    def _touch(self, name: str) -> None:
        now = time.monotonic()
        if now - self._used.get(name, -LAST_USED_RESOLUTION) < LAST_USED_RESOLUTION:
            return
        self._used[name] = now
        with self.lock.hold():
            keys = dict(self._load())
            if name in keys:
                keys[name].last_used_at = to_iso(utcnow())
                self._save(keys)


def key_store() -> KeyStore:
    return current_app.extensions[KEYS]


def authenticate_request() -> Principal:
    """The caller of the current request, or Unauthorized."""
    if current_app.config["AUTH_DISABLED"]:
        return ANONYMOUS_ADMIN
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("send an API key as 'Authorization: Bearer <key>'")
    key = key_store().authenticate(secret.strip())
    if key is None:
        raise Unauthorized("the API key is not valid")
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
    return g.get("principal") or ANONYMOUS_ADMIN
