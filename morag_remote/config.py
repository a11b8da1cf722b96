"""Configuration: built-in defaults, then ``<instance>/config.py``, then ``MORAG_REMOTE_*`` variables
(JSON values parsed), then the ``test_config`` given to ``create_app``; later wins.

:class:`Settings` is the typed view the service reads, so the service never touches Flask.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

ENV_PREFIX = "MORAG_REMOTE"

DEFAULT_CONTENT_TYPES = ["audio", "video", "document", "image", "web", "youtube"]
DEFAULT_LEASE_SECONDS = {"audio": 1800, "video": 3600, "document": 900, "default": 3600}

DEFAULTS: dict[str, Any] = {
    "JOBS_DATA_DIR": None,          # None: <instance>/remote_jobs
    "SOURCE_ROOTS": None,           # None: [<instance>/sources]
    "CONTENT_TYPES": DEFAULT_CONTENT_TYPES,
    "LEASE_SECONDS": DEFAULT_LEASE_SECONDS,
    "MAX_RETRIES": 3,
    "RETRY_BACKOFF_SECONDS": 30,
    "RETRY_BACKOFF_MAX_SECONDS": 3600,
    "PENDING_TTL_SECONDS": None,
    "MAX_CONTENT_LENGTH": 64 * 1024 * 1024,
    "AUTH_DISABLED": False,
    "CALLBACK_URL": None,
    "CALLBACK_SECRET": None,
    "CALLBACK_ALLOWED_PREFIXES": [],
    "CALLBACK_CONNECT_TIMEOUT_SECONDS": 2,
    "CALLBACK_READ_TIMEOUT_SECONDS": 5,
    "CALLBACK_RETRY_SECONDS": 10,       # first retry delay of a failed event; doubles each attempt
    "CALLBACK_RETRY_MAX_SECONDS": 3600,
    "CALLBACK_PUMP_INTERVAL_SECONDS": 5,  # how often requests retry due events (per process)
    "CALLBACK_RETENTION_DAYS": 7,       # delivered events kept this long
    "IDEMPOTENCY_TTL_SECONDS": 86400,   # Idempotency-Key records kept at least this long
    "POLL_MAX_WAIT_SECONDS": 20,
    "POLL_MAX_JOBS": 10,
    "POLL_MAX_WAITERS": 48,
    "LAPSED_PER_POLL": 20,
    "METRICS_PUBLIC": False,
    "REQUEST_LOG": True,            # the app's http.request line; gunicorn.conf.py logs access instead
    "DATABASE_URL": None,
    "DATABASE_POOL_SIZE": 10,       # connections per process (PostgreSQL backend)
    "DATABASE_TIMEOUT": 5.0,        # seconds to connect / to wait for a free connection, then 503
    "LOG_JSON": None,               # None: JSON lines unless debug
    "STORE_LOCK_TIMEOUT_SECONDS": 5,  # file store: wait this long for its lock, then 503 (None: for ever)
    "UI_SESSION_SECONDS": 8 * 3600,  # how long a sign-in to the dashboard (/ui) lasts
    "UI_COOKIE_SECURE": None,       # None: Secure when the request came over HTTPS; true: always
    # files: uploads, source checksums, artifacts
    "BLOB_DIR": None,               # None: <instance>/blobs; shared by every API host of a deployment
    "MAX_UPLOAD_BYTES": 20 * 1024 ** 3,
    "UPLOAD_EXPIRY_SECONDS": 86400,
    "UPLOAD_RESERVE_BYTES": 64 * 1024 ** 2,  # free space a chunk must leave on the blob store
    "MAX_ARTIFACT_BYTES": 4 * 1024 ** 3,       # one artifact
    "MAX_JOB_ARTIFACT_BYTES": 16 * 1024 ** 3,  # all artifacts of one attempt
    "MAX_ARTIFACTS": 100,                       # artifacts of one attempt
    "MAX_PROCESSING": {},           # content type -> most jobs processing at once, fleet-wide
    "ON_LAPSE": {"default": "requeue"},  # content type -> requeue | fail | hold (a vanished worker)
}


def instance_path_from_env() -> str | None:
    """``MORAG_REMOTE_INSTANCE_PATH``: the instance folder for the server and the CLI alike."""
    return os.environ.get(f"{ENV_PREFIX}_INSTANCE_PATH") or None


def resolve_paths(config: dict, instance_path: str) -> None:
    """Fill in the defaults that live under the instance folder."""
    if not config.get("JOBS_DATA_DIR"):
        config["JOBS_DATA_DIR"] = os.path.join(instance_path, "remote_jobs")
    if not config.get("SOURCE_ROOTS"):
        config["SOURCE_ROOTS"] = [os.path.join(instance_path, "sources")]
    if isinstance(config["SOURCE_ROOTS"], str):  # a single path given without JSON brackets
        config["SOURCE_ROOTS"] = [config["SOURCE_ROOTS"]]
    if not config.get("BLOB_DIR"):
        config["BLOB_DIR"] = os.path.join(instance_path, "blobs")


def store_lock_timeout(config: Mapping[str, Any]) -> float | None:
    """``STORE_LOCK_TIMEOUT_SECONDS`` as seconds; None (wait for ever) when unset or not positive."""
    value = config.get("STORE_LOCK_TIMEOUT_SECONDS")
    return float(value) if value is not None and float(value) > 0 else None


@dataclass(frozen=True)
class Settings:
    content_types: tuple[str, ...] = tuple(DEFAULT_CONTENT_TYPES)
    lease_seconds: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LEASE_SECONDS))
    max_retries: int = 3
    retry_backoff_seconds: float = 30
    retry_backoff_max_seconds: float = 3600
    pending_ttl_seconds: float | None = None
    poll_max_wait_seconds: float = 20
    poll_max_jobs: int = 10
    poll_max_waiters: int = 64
    lapsed_per_poll: int = 20
    source_roots: tuple[str, ...] = ()
    store_lock_timeout_seconds: float | None = 5
    max_processing: Mapping[str, int] = field(default_factory=dict)
    on_lapse: Mapping[str, str] = field(default_factory=lambda: {"default": "requeue"})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Settings":
        return cls(
            content_types=tuple(config["CONTENT_TYPES"]),
            lease_seconds=dict(config["LEASE_SECONDS"]),
            max_retries=int(config["MAX_RETRIES"]),
            retry_backoff_seconds=float(config["RETRY_BACKOFF_SECONDS"]),
            retry_backoff_max_seconds=float(config["RETRY_BACKOFF_MAX_SECONDS"]),
            pending_ttl_seconds=(float(config["PENDING_TTL_SECONDS"])
                                 if config.get("PENDING_TTL_SECONDS") else None),
            poll_max_wait_seconds=float(config["POLL_MAX_WAIT_SECONDS"]),
            poll_max_jobs=int(config["POLL_MAX_JOBS"]),
            poll_max_waiters=int(config["POLL_MAX_WAITERS"]),
            lapsed_per_poll=int(config["LAPSED_PER_POLL"]),
            source_roots=tuple(config["SOURCE_ROOTS"]),
            store_lock_timeout_seconds=store_lock_timeout(config),
            max_processing=_limits(config.get("MAX_PROCESSING")),
            on_lapse=_policies(config.get("ON_LAPSE")),
        )

    def lease_for(self, content_type: str) -> float:
        leases = self.lease_seconds
        return float(leases.get(content_type, leases.get("default", 3600)))

    def on_lapse_for(self, content_type: str) -> str:
        policies = self.on_lapse
        return policies.get(content_type, policies.get("default", "requeue"))


class ConfigError(ValueError):
    """A setting that cannot be used; the app refuses to start with the setting named."""


def _limits(value: Any) -> dict[str, int]:
    """``MAX_PROCESSING``: content type -> a whole number of jobs, 0 or more."""
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError("MAX_PROCESSING must be an object of content types and numbers, e.g. {\"video\": 4}")
    out = {}
    for name, limit in value.items():
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ConfigError(f"MAX_PROCESSING[{name!r}] must be a whole number, 0 or more")
        out[str(name)] = limit
    return out


def _policies(value: Any) -> dict[str, str]:
    """``ON_LAPSE``: content type (or ``default``) -> requeue, fail or hold."""
    out = {"default": "requeue"}
    if not value:
        return out
    if not isinstance(value, Mapping):
        raise ConfigError("ON_LAPSE must be an object, e.g. {\"default\": \"requeue\", \"web\": \"hold\"}")
    for name, policy in value.items():
        if policy not in ("requeue", "fail", "hold"):
            raise ConfigError(f"ON_LAPSE[{name!r}] must be requeue, fail or hold")
        out[str(name)] = policy
    return out
