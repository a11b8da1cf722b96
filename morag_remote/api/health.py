"""``GET /health``: 200 while the store takes writes; 503 (problem+json, like every error) when it
does not. No key needed."""
from __future__ import annotations

from flask import Blueprint, Response

from .. import schemas
from ..context import service
from .http import documented, respond

bp = Blueprint("health", __name__)


@bp.get("/health")
@documented("Liveness and store health", tag="service", response=schemas.HealthResponse, errors=(503,),
            description="200 while the job store takes writes; 503 when it does not.")
def health() -> Response:
    service().store.check_writable()  # StoreUnavailable: rendered as a 503 problem by errors.py
    return respond({"status": "ok", "store": "writable", "detail": "ready"})
