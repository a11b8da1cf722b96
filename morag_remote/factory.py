"""The application factory: ``create_app`` is the only place that builds an app (``wsgi.py`` calls it
for gunicorn, ``flask --app morag_remote`` for the CLI)."""
from __future__ import annotations

import copy
from dataclasses import replace
import os
from typing import Any, Mapping

import click
import structlog
from flask import Flask

from .auth import KeyFileUnreadable, auth_disabled
from .config import DEFAULTS, ENV_PREFIX, Settings, instance_path_from_env, resolve_paths
from .artifacts import ArtifactSettings, Artifacts
from .blobs import FileBlobStore
from .context import ARTIFACTS, BACKEND, BLOBS, IDEMPOTENCY, KEYS, SERVICE, THROUGHPUT, TOKENS, UPLOADS, WORKERS
from .errors import register_error_handlers
from .events import init_events
from .exceptions import StoreUnavailable
from .idempotency import IdempotentCreates
from .log import configure_logging, init_request_logging
from .secrets_file import load_or_create_secret
from .service import JobService
from .sessions import NoSessions
from .store.factory import open_backend
from .throughput import Throughput
from .tokens import DownloadTokens
from .uploads import Uploads, UploadSettings
from .workers import Workers

log = structlog.get_logger("morag_remote")  # the name it had in the package's __init__


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Config (defaults, ``instance/config.py``, environment, ``test_config``) -> logging -> the
    backend and the service, events, idempotency and the worker registry built on it -> metrics -> blueprints, error
    handlers, request logging -> CLI."""
    instance_path = (test_config or {}).get("INSTANCE_PATH") or instance_path_from_env()
    app = Flask("morag_remote", instance_relative_config=True, static_folder=None,
                instance_path=os.path.abspath(instance_path) if instance_path else None)
    app.session_interface = NoSessions()  # no cookie sessions: every request carries its key
    app.config.from_mapping(copy.deepcopy(DEFAULTS))  # nested env overrides (X__y) edit in place
    app.config.from_pyfile("config.py", silent=True)
    app.config.from_prefixed_env(ENV_PREFIX)
    if test_config:
        app.config.from_mapping(test_config)
    app.config["AUTH_DISABLED"] = auth_disabled(app.config["AUTH_DISABLED"])

    json_logs = app.config["LOG_JSON"] if app.config["LOG_JSON"] is not None else not app.debug
    configure_logging(json_lines=bool(json_logs))
    try:
        _open_instance(app)
    except OSError as exc:  # a file where a folder belongs, or the other way round; no permission
        raise InstanceUnusable(f"the instance folder {app.instance_path} cannot be used: {exc.strerror}"
                               + (f": {exc.filename}" if exc.filename else "")) from None

    from . import api, cli, ui
    from .metrics import init_metrics  # here, not at the top: see gunicorn.conf.py

    init_metrics(app)
    api.register_blueprints(app)
    ui.init_ui(app)
    register_error_handlers(app)
    init_request_logging(app)
    cli.register_commands(app)
    _warn_about_auth(app)
    return app


class InstanceUnusable(click.ClickException):
    """The instance folder is damaged. A ClickException, so that every ``flask`` command says so
    in one line (exit 1); gunicorn shows the same message when a worker cannot boot."""


def _open_instance(app: Flask) -> None:
    """The instance folder's secret, then the backend and what is built on it."""
    os.makedirs(app.instance_path, exist_ok=True)
    resolve_paths(app.config, app.instance_path)
    if not app.config.get("SECRET_KEY"):
        app.config["SECRET_KEY"] = load_or_create_secret(os.path.join(app.instance_path, "secret_key"))
    backend = app.extensions[BACKEND] = open_backend(app.config, app.instance_path)
    # the bytes outside the records: one BLOB_DIR, whichever backend holds the records; finished
    # uploads are sources too (content-addressed, managed by the blob store)
    blobs = app.extensions[BLOBS] = FileBlobStore(app.config["BLOB_DIR"])
    settings = Settings.from_config(app.config)
    settings = replace(settings, source_roots=(*settings.source_roots, blobs.sources_dir))
    service = app.extensions[SERVICE] = JobService(backend.jobs, settings)
    app.extensions[TOKENS] = DownloadTokens(app.config["SECRET_KEY"])
    app.extensions[KEYS] = backend.keys
    init_events(app, service, backend.outbox)
    app.extensions[IDEMPOTENCY] = IdempotentCreates(backend.idempotency, service,
                                                    float(app.config["IDEMPOTENCY_TTL_SECONDS"]))
    app.extensions[WORKERS] = Workers(backend.workers, backend.jobs, clock=lambda: service.clock())
    # the dashboard's per-minute series: counted by an observer, like the metrics
    counted = app.extensions[THROUGHPUT] = Throughput(backend.throughput, clock=lambda: service.clock())
    service.hooks.observers.append(counted)
    uploads = app.extensions[UPLOADS] = Uploads(blobs, UploadSettings.from_config(app.config),
                                                clock=lambda: service.clock())
    service.upload_sources = uploads.source_of
    artifacts = app.extensions[ARTIFACTS] = Artifacts(blobs, service, ArtifactSettings.from_config(app.config))
    service.hooks.observers.append(artifacts)  # discards the artifacts of attempts that ended without them


def _warn_about_auth(app: Flask) -> None:
    """One line at every start when the API is open to anyone, or closed to everyone."""
    if app.config["AUTH_DISABLED"]:
        log.warning("auth.disabled", detail="MORAG_REMOTE_AUTH_DISABLED is set: every request is admin "
                    "without a key; local development only")
        return
    try:
        has_keys = app.extensions[KEYS].has_keys()
    except KeyFileUnreadable as exc:
        log.error("auth.keys_unreadable", detail=exc.detail)
        return
    except StoreUnavailable as exc:  # e.g. `flask db upgrade` on a database without the schema yet
        log.warning("auth.keys_unknown", detail=exc.detail)
        return
    if not has_keys:
        log.warning("auth.no_keys", detail="no API key exists yet: every API call answers 401; create one with "
                    "'flask --app morag_remote keys create --role admin --name admin' (make run does it for you)")
