"""The operators' controls per content type: ``/api/v1/remote-jobs/types/<content_type>/...``
(admin). A paused type is not claimed on any process or host (jobs already running go on, creates
are still accepted); a limit caps the jobs of the type processing at once across the fleet,
replacing the configured ``MAX_PROCESSING`` until set back to null. Both are stored (durable across
restarts) and shown in ``/stats``, ``/metrics`` and ``remote-jobs types``."""
from __future__ import annotations

from flask import Blueprint, Response

from .. import schemas
from ..auth import requires
from ..context import service
from .http import documented, json_body, respond

bp = Blueprint("types", __name__, url_prefix="/api/v1/remote-jobs/types")
TYPES = "types"
_UNKNOWN = " An unknown content type is 422 naming `content_type`."


@bp.post("/<content_type>/pause")
@documented("Pause a content type: no worker claims its jobs", tag=TYPES, response=schemas.TypeState, errors=(422,),
            description="On every process and host at once, and across restarts; jobs already "
                        "processing continue and creates are still accepted." + _UNKNOWN)
@requires("admin")
def pause(content_type: str) -> Response:
    svc = service()
    return respond(svc.type_state(svc.pause(content_type)))


@bp.post("/<content_type>/resume")
@documented("Resume a paused content type", tag=TYPES, response=schemas.TypeState, errors=(422,),
            description="Its pending jobs are claimable again (waiting long polls look at once)." + _UNKNOWN)
@requires("admin")
def resume(content_type: str) -> Response:
    svc = service()
    return respond(svc.type_state(svc.resume(content_type)))


@bp.post("/<content_type>/limit")
@documented("Set the fleet-wide limit of a content type's jobs processing at once", tag=TYPES,
            body=schemas.LimitRequest, response=schemas.TypeState,
            description="`max_processing` replaces the configured `MAX_PROCESSING` of the type until "
                        "set to null (back to the configuration); a claim never makes more jobs of the "
                        "type processing than that, counted exactly across processes and hosts. Jobs "
                        "already processing above a lowered limit continue." + _UNKNOWN)
@requires("admin")
def limit(content_type: str) -> Response:
    svc = service()
    return respond(svc.type_state(svc.set_limit(content_type, json_body()["max_processing"])))
