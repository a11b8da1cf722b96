"""Signed completion events for the ingestion side (issue: continue the ingestion pipeline).

``init_events`` wires them into an app: an outbox beside the job store (:func:`build_outbox`), an
:class:`EventDelivery` registered as the service's terminal listener, and a hook that lets later
requests retry failed attempts once their response has been sent. The README's "Completion events"
section is the receiver's contract (body, headers, signature).
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import structlog
from flask import Flask, Response, current_app

from ..service import JobService
from ..store.base import JobRepository
from .delivery import DeliveryReport, EventDelivery, EventSettings
from .outbox import EventOutbox, FileOutbox

EVENTS = "morag_remote.events"
log = structlog.get_logger(__name__)


def build_outbox(store: JobRepository, config: Mapping[str, Any]) -> EventOutbox:
    """The outbox lives where the jobs do: in their database (every host sees every event), else in
    ``<data dir>/events/``. Nothing else knows which one it talks to."""
    from ..store.postgres import PostgresJobStore

    if isinstance(store, PostgresJobStore):
        from .pg_outbox import PostgresOutbox

        return PostgresOutbox(store.db)
    return FileOutbox(os.path.join(config["JOBS_DATA_DIR"], "events"))


def init_events(app: Flask, service: JobService) -> EventDelivery:
    settings = EventSettings.from_config(app.config)
    delivery = EventDelivery(build_outbox(service.store, app.config), service.store, settings,
                             clock=lambda: service.clock())
    service.listeners.append(delivery)
    app.extensions[EVENTS] = delivery

    @app.after_request
    def _retry_events_after_response(response: Response) -> Response:
        if delivery.pump_due():
            response.call_on_close(delivery.pump)
        return response

    if settings.callback_url and not settings.secret:
        log.warning("events.unsigned", detail="MORAG_REMOTE_CALLBACK_URL is set without "
                    "MORAG_REMOTE_CALLBACK_SECRET: events are sent without X-MoRAG-Signature")
    return delivery


def events() -> EventDelivery:
    return current_app.extensions[EVENTS]


__all__ = ["DeliveryReport", "EventDelivery", "EventSettings", "build_outbox", "events", "init_events"]
