"""``GET /metrics``: Prometheus exposition of the queue (see ``morag_remote.metrics``).

Any key may scrape it; with ``MORAG_REMOTE_METRICS_PUBLIC=true`` no key is needed (for a scraper on
a private network that cannot send a bearer token).
"""
from __future__ import annotations

from typing import Any, Mapping

from flask import Blueprint, Response, current_app, g, request

from ..auth import ANY, authenticate_request
from ..metrics import is_public, metrics_exporter
from .http import documented

bp = Blueprint("metrics", __name__)


def _metrics_public(config: Mapping[str, Any]) -> bool:
    return is_public(config["METRICS_PUBLIC"])


@bp.get("/metrics")
@documented("Prometheus metrics of the queue", tag="service",
            content={"text/plain": {"schema": {"type": "string"}},
                     "application/openmetrics-text": {"schema": {"type": "string"}}},
            description="The Prometheus text format, or OpenMetrics when the scraper's `Accept` asks for "
                        "it. Served without a key when `MORAG_REMOTE_METRICS_PUBLIC` is true.")
def metrics() -> Response:
    if not _metrics_public(current_app.config):
        g.principal = authenticate_request()  # every role may read metrics
    body, content_type = metrics_exporter().render(request.headers.get("Accept"))
    response = current_app.response_class(body, status=200, content_type=content_type)
    response.cache_control.no_store = True
    return response


metrics.required_roles = ANY  # unless METRICS_PUBLIC; read by the OpenAPI builder like @requires
metrics.public_if = _metrics_public
