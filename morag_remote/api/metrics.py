"""``GET /metrics``: Prometheus exposition of the queue (see ``morag_remote.metrics``).

Any key may scrape it; with ``MORAG_REMOTE_METRICS_PUBLIC=true`` no key is needed (for a scraper on
a private network that cannot send a bearer token).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

from flask import Blueprint, Response, current_app, request

from ..auth import ANY, requires
from ..context import metrics_exporter
from ..metrics import is_public
from .http import documented

bp = Blueprint("metrics", __name__)


def _metrics_public(config: Mapping[str, Any]) -> bool:
    return is_public(config["METRICS_PUBLIC"])


def requires_unless(public_if: Callable[[Mapping[str, Any]], bool], *roles: str) -> Callable:
    """``@requires(*roles)``, except while ``public_if(app.config)`` holds: then no key is asked for.

    The view keeps ``required_roles`` and gains ``public_if``; the OpenAPI builder reads both.
    """

    def decorator(view: Callable) -> Callable:
        guarded = requires(*roles)(view)

        @functools.wraps(guarded)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if public_if(current_app.config):
                return view(*args, **kwargs)
            return guarded(*args, **kwargs)

        wrapped.public_if = public_if
        return wrapped

    return decorator


@bp.get("/metrics")
@documented("Prometheus metrics of the queue", tag="service",
            content={"text/plain": {"schema": {"type": "string"}},
                     "application/openmetrics-text": {"schema": {"type": "string"}}},
            description="The Prometheus text format, or OpenMetrics when the scraper's `Accept` asks for "
                        "it. Served without a key when `MORAG_REMOTE_METRICS_PUBLIC` is true.")
@requires_unless(_metrics_public, *ANY)
def metrics() -> Response:
    body, content_type = metrics_exporter().render(request.headers.get("Accept"))
    response = current_app.response_class(body, status=200, content_type=content_type)
    response.cache_control.no_store = True
    return response
