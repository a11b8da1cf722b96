"""API keys and roles.

Keys are 256-bit random strings shown once; only their SHA-256 is kept, in ``<instance>/api_keys.json``
(written atomically under a lock, so the CLI can add or revoke keys while gunicorn serves: every
process reloads the file when it changes). A plain SHA-256 is enough for keys of this entropy; the
lookup compares digests with ``hmac.compare_digest``.

Roles: ``worker`` polls and works on jobs, ``producer`` creates and manages them, ``admin`` may do
everything. A worker key may be bound to a worker id: it then polls only as that id and acts only on
jobs that id holds.

A key's last use is written back at most once a minute per key and process (``LAST_USED_RESOLUTION``),
so authentication costs no write on almost every request.
"""
from __future__ import annotations

import functools
import hashlib
import hmac
import json
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
from .store.atomic import FileLock, write_json_atomic

ROLES = ("worker", "producer", "admin")
ANY = ROLES
KEY_PREFIX = "mrk_"
LAST_USED_RESOLUTION = 60.0  # seconds: how often a key's last use is written back
NAME_RULE = "1-64 letters, digits, '-', '_' or '.'"
MAX_WORKER_ID = 128  # the API's worker_id limit
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}

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


class KeyStore:
    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.lock = FileLock(self.path.with_name(self.path.name + ".lock"))
        self.clock = clock  # monotonic seconds: only paces the last-used write-back
        self._keys: dict[str, ApiKey] = {}
        self._stamp: tuple[int, ...] | None = None
        self._used: dict[str, float] = {}

    def _load(self) -> dict[str, ApiKey]:
        """The keys, re-read only when the file changed (another process created or revoked one).

        Every request asks; the common answer (unchanged) costs one ``stat`` of the path. When it
        changed, the stamp kept is that of the file actually read.
        """
        try:
            if self._stamp is not None and _stamp(os.stat(self.path)) == self._stamp:
                return self._keys
            fh = open(self.path, "rb")
        except FileNotFoundError:
            self._keys, self._stamp = {}, None
            return self._keys
        except OSError as exc:  # a directory in its place, no permission: fail closed, as for bad JSON
            log.error("keys.file_unreadable", file=self.path.name, error=exc.strerror)
            raise KeyFileUnreadable(f"the API key file {self.path.name} is not readable ({exc.strerror}); "
                                    "fix or remove it, then create keys again") from None
        with fh:
            stamp = _stamp(os.fstat(fh.fileno()))
            if stamp != self._stamp:
                try:
                    keys = {k["name"]: ApiKey(**k) for k in json.loads(fh.read())["keys"]}
                except (ValueError, TypeError, KeyError, AttributeError):
                    log.error("keys.file_unreadable", file=self.path.name)
                    raise KeyFileUnreadable(f"the API key file {self.path.name} is not readable; "
                                            "fix or remove it, then create keys again") from None
                self._keys, self._stamp = keys, stamp
        return self._keys

    def _save(self, keys: dict[str, ApiKey]) -> None:
        write_json_atomic(self.path, {"keys": [asdict(k) for k in keys.values()]})
        self._stamp = None

    def create(self, name: str, role: str, worker_id: str | None = None) -> tuple[ApiKey, str]:
        validate_key_request(name, role, worker_id)
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
        """Write the key's last use back, at most once per ``LAST_USED_RESOLUTION`` per process.

        Best effort: a full disk or a read-only instance folder must not turn a good key into a 500.
        """
        now = self.clock()
        last = self._used.get(name)
        if last is not None and now - last < LAST_USED_RESOLUTION:
            return
        self._used[name] = now
        try:
            with self.lock.hold():
                keys = dict(self._load())
                if name in keys:
                    keys[name].last_used_at = to_iso(utcnow())
                    self._save(keys)
        except OSError as exc:
            log.warning("key.last_used_unsaved", name=name, error=exc.strerror)


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    """What changes whenever the key file is rewritten (it is replaced by a rename: a new inode)."""
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size)


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
