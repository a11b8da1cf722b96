"""``GET /api/v1/remote-jobs/stats``: queue depth by status and content type, the age of the oldest
pending job, and the workers seen within the longest lease period."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Blueprint, Response

from .. import schemas
from ..auth import ANY, requires
from ..context import service
from ..models import STATUSES
from .http import respond

bp = Blueprint("stats", __name__, url_prefix="/api/v1/remote-jobs")


def stats_body() -> dict[str, Any]:
    svc = service()
    stats = svc.stats()
    now = svc.clock()
    counts: dict[str, dict[str, int]] = {status: {} for status in STATUSES}
    for (status, content_type), n in stats.counts.items():
        counts.setdefault(status, {})[content_type] = n
    oldest = stats.oldest_pending_created_at
    window = timedelta(seconds=max(svc.settings.lease_seconds.values(), default=3600))
    active = sorted(w for w, seen in stats.worker_last_seen.items() if seen and now - seen <= window)
    return {
        "counts": counts,
        "totals": {status: sum(per.values()) for status, per in counts.items()},
        "oldest_pending_age_seconds": round((now - oldest).total_seconds(), 3) if oldest else None,
        "active_workers": active,
    }


@bp.get("/stats")
@requires(*ANY)
def stats() -> Response:
    return respond(schemas.StatsResponse(), stats_body())
