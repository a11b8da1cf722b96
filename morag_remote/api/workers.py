"""``GET /api/v1/remote-jobs/workers``: the workers heard from in the last day and the jobs each holds."""
from __future__ import annotations

from flask import Blueprint, Response

from .. import schemas
from ..auth import requires
from ..context import workers
from .http import respond, schema

bp = Blueprint("workers", __name__, url_prefix="/api/v1/remote-jobs")


@bp.get("/workers")
@requires("producer")
def list_workers() -> Response:
    return respond(schema(schemas.WorkersResponse), {"workers": workers().list()})
