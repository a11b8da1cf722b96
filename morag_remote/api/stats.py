"""``GET /api/v1/remote-jobs/stats``: queue depth by status and content type, the age of the oldest
pending job, and the workers seen within the longest lease period."""
from __future__ import annotations

from flask import Blueprint, Response

from .. import schemas
from ..auth import ANY, requires
from ..context import service
from .http import documented, respond

bp = Blueprint("stats", __name__, url_prefix="/api/v1/remote-jobs")


@bp.get("/stats")
@documented("Queue depth, oldest pending job, active workers", tag="remote-jobs",
            response=schemas.StatsResponse)
@requires(*ANY)
def stats() -> Response:
    return respond(service().estimates.queue_summary())
