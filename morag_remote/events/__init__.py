"""Signed completion events for the ingestion side (issue: continue the ingestion pipeline).

``init_events`` wires them into an app: an :class:`EventDelivery` over the backend's outbox,
registered as the service's terminal listener, and a hook that lets later requests retry failed
attempts once their response has been sent. The README's "Completion events" section is the
receiver's contract (body, headers, signature).
"""
from __future__ import annotations

import structlog
from flask import Flask, Response

from ..context import EVENTS
from ..service import JobService
from ..store.base import EventOutbox
from .delivery import DeliveryReport, EventDelivery, EventSettings

log = structlog.get_logger(__name__)


def init_events(app: Flask, service: JobService, outbox: EventOutbox) -> EventDelivery:
    settings = EventSettings.from_config(app.config)
    delivery = EventDelivery(outbox, service.store, settings, clock=lambda: service.clock())
    service.hooks.listeners.append(delivery)
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


__all__ = ["DeliveryReport", "EventDelivery", "EventSettings", "init_events"]
