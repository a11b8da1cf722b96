"""Every object the factory attaches to the app (``app.extensions``): its key and its accessor.

Views, CLI commands and hooks reach these through the accessors (``service()``, ``key_store()``...),
never through module globals. This module imports nothing of the package at run time, so any
module may use it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from flask import current_app

if TYPE_CHECKING:
    from .events.delivery import EventDelivery
    from .idempotency import IdempotentCreates
    from .metrics import MetricsExporter
    from .service import JobService
    from .store.base import Backend, KeyRepository
    from .tokens import DownloadTokens
    from .throughput import Throughput
    from .workers import Workers
    from .artifacts import Artifacts
    from .uploads import Uploads

BACKEND = "morag_remote.backend"
SERVICE = "morag_remote.service"
TOKENS = "morag_remote.tokens"
KEYS = "morag_remote.keys"
EVENTS = "morag_remote.events"
IDEMPOTENCY = "morag_remote.idempotency"
METRICS = "morag_remote.metrics"
DOCUMENT = "morag_remote.openapi"
WORKERS = "morag_remote.workers"
THROUGHPUT = "morag_remote.throughput"
BLOBS = "morag_remote.blobs"
UPLOADS = "morag_remote.uploads"
ARTIFACTS = "morag_remote.artifacts"


def backend() -> Backend:
    return current_app.extensions[BACKEND]


def service() -> JobService:
    return current_app.extensions[SERVICE]


def tokens() -> DownloadTokens:
    return current_app.extensions[TOKENS]


def key_store() -> KeyRepository:
    return current_app.extensions[KEYS]


def events() -> EventDelivery:
    return current_app.extensions[EVENTS]


def idempotent_creates() -> IdempotentCreates:
    return current_app.extensions[IDEMPOTENCY]


def metrics_exporter() -> MetricsExporter:
    return current_app.extensions[METRICS]


def workers() -> Workers:
    return current_app.extensions[WORKERS]


def throughput() -> Throughput:
    return current_app.extensions[THROUGHPUT]


def uploads() -> Uploads:
    return current_app.extensions[UPLOADS]


def artifacts() -> Artifacts:
    return current_app.extensions[ARTIFACTS]
