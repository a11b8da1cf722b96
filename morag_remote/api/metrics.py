"""``GET /metrics``: Prometheus exposition of the queue (see ``morag_remote.metrics``).

Any key may scrape it; with ``MORAG_REMOTE_METRICS_PUBLIC=true`` no key is needed (for a scraper on
a private network that cannot send a bearer token).
"""
from __future__ import annotations

from flask import Blueprint, Response, current_app, g, request

from ..auth import ANY, authenticate_request
from ..context import metrics_exporter
from ..metrics import is_public

bp = Blueprint("metrics", __name__)


@bp.get("/metrics")
def metrics() -> Response:
    if not is_public(current_app.config["METRICS_PUBLIC"]):
        g.principal = authenticate_request()  # every role may read metrics
    body, content_type = metrics_exporter().render(request.headers.get("Accept"))
    response = current_app.response_class(body, status=200, content_type=content_type)
    response.cache_control.no_store = True
    return response


metrics.required_roles = ANY  # unless METRICS_PUBLIC; read by the OpenAPI builder like @requires
