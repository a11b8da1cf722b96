"""``GET /api/v1/remote-jobs/workers``: the workers heard from in the last day and the jobs each holds."""
from __future__ import annotations

from flask import Blueprint, Response

from .. import schemas
from ..auth import requires
from ..context import workers
from .http import documented, respond

bp = Blueprint("workers", __name__, url_prefix="/api/v1/remote-jobs")


@bp.get("/workers")
@documented("The workers heard from in the last day, with the jobs each holds", tag="remote-jobs",
            response=schemas.WorkersResponse)
@requires("producer")
def list_workers() -> Response:
    return respond({"workers": workers().list()})
