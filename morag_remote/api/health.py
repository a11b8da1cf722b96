"""``GET /health``: 200 while the store takes writes, 503 when it does not. No key needed."""
from __future__ import annotations

from flask import Blueprint, Response

from .. import schemas
from ..context import service
from ..exceptions import StoreUnavailable
from .http import respond

bp = Blueprint("health", __name__)


@bp.get("/health")
def health() -> Response:
    try:
        service().store.check_writable()
    except StoreUnavailable as exc:
        return respond(schemas.HealthResponse(), {"status": "unavailable", "store": "unwritable",
                                                  "detail": exc.detail}, 503)
    return respond(schemas.HealthResponse(), {"status": "ok", "store": "writable", "detail": "ready"})
