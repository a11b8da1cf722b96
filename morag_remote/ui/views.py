"""The dashboard's pages and actions. Each view reads or acts through the service, the worker
registry and the throughput series exactly as the API's views do (``service().cancel``, ``retry``,
``delete``: the same rules, fencing and log lines); who may act is read from the API view of the
same action (its ``@requires`` roles), so the dashboard adds no rule of its own."""
from __future__ import annotations

import functools
import os
from collections import Counter
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Any, Callable
from urllib.parse import urlsplit

import structlog
from flask import (Blueprint, Response, current_app, g, make_response, redirect, render_template, request,
                   send_from_directory, url_for)
from marshmallow import ValidationError

from .. import jsonrules, schemas
from ..api.http import hidden, schema
from ..context import events, service, throughput, workers
from ..exceptions import InvalidRequest, InvalidTransition, JobNotFound, ServiceError
from ..models import STATUSES, TRANSITIONS, Action, RemoteJob, Status, valid_job_id
from ..store.base import JobFilter
from . import signin
from .charts import chart
from .signin import NotSignedIn, UiUser

log = structlog.get_logger(__name__)

HERE = os.path.dirname(__file__)
STATIC = os.path.join(HERE, "static")
STATIC_TYPES = {"ui.css": "text/css", "ui.js": "text/javascript", "favicon.svg": "image/svg+xml"}
STATIC_RULE = f"/static/<any({', '.join(repr(n) for n in STATIC_TYPES)}):filename>"
STATIC_MAX_AGE = 3600
REFRESH_SECONDS = 5
BULK_LIMIT = 10_000        # jobs one bulk action acts on at most
RESULT_PREVIEW = 2_000     # characters of a result's content shown on the job page
FILTERS = ("status", "content_type", "ingestion_task_id", "worker_id")
LIST_FIELDS = (*FILTERS, "limit", "cursor")
# the API view whose @requires says who may do each thing
API_VIEWS = {"read": "remote_jobs.get_job", "list": "remote_jobs.list_jobs", "workers": "workers.list_workers",
             "cancel": "remote_jobs.cancel_job", "retry": "remote_jobs.retry_job", "delete": "remote_jobs.delete_job"}
ACTIONS = {"cancel": Action.CANCEL, "retry": Action.RETRY, "delete": None}
DONE = {"cancel": "cancelled", "retry": "put back in the queue", "delete": "deleted"}
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
          "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="templates")
page = hidden("a page of the operator's dashboard (/ui), not an operation of the API")


class UiForbidden(ServiceError):
    status_code = 403
    title = "Forbidden"


# -- plumbing -----------------------------------------------------------------------------------

def may(user: UiUser, what: str) -> bool:
    roles = getattr(current_app.view_functions[API_VIEWS[what]], "required_roles", ("admin",))
    return user.principal.can(roles)


def require(user: UiUser, what: str) -> None:
    if not may(user, what):
        raise UiForbidden(f"a {user.principal.role} key may not {what} jobs")


def signed_in(view: Callable[..., Any]) -> Callable[..., Any]:
    """The view runs for a signed-in producer or admin (``g.ui_user``); a POST must carry the
    CSRF token of the cookie. Otherwise NotSignedIn, before the view does anything."""

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        user = signin.current_user()
        if request.method == "POST":
            signin.check_csrf(user)
        g.ui_user = user
        return view(*args, **kwargs)

    return wrapped


@bp.before_request
def _nobody_yet() -> None:
    g.ui_user = None  # set by @signed_in; an app context reused across requests keeps no one


@bp.errorhandler(NotSignedIn)
def _to_sign_in(exc: NotSignedIn) -> Response:
    target = {"reason": exc.reason}
    if request.method == "GET" and exc.reason in ("required", "expired") and request.endpoint != "ui.overview_part":
        target["next"] = (request.script_root or "") + request.full_path.rstrip("?")
    response = redirect(url_for("ui.sign_in", **target))
    if exc.reason in ("expired", "forged", "revoked", "role"):
        signin.clear(response)
    log.info("ui.sign_in_required", reason=exc.reason, path=request.path)
    return response


@bp.errorhandler(ServiceError)
def _service_error(exc: ServiceError) -> Response:
    status = exc.status_code
    title = "Not found" if isinstance(exc, JobNotFound) else exc.title
    response = make_response(render_template("ui/error.html", status=status, title=title, detail=exc.detail), status)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.setdefault("Content-Security-Policy", POLICY)
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "ui.static_file":
        response.cache_control.no_store = True
    return response


@bp.context_processor
def _helpers() -> dict[str, Any]:
    return {"user": g.get("ui_user"), "csrf_field": signin.CSRF_FIELD, "ago": ago, "when": when,
            "duration": duration, "statuses": STATUSES, "may": may, "refresh_seconds": REFRESH_SECONDS}


def when(value: datetime | None) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:.0f} s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:.0f} min"
    return f"{seconds // 86400:.0f} d {seconds % 86400 // 3600:.0f} h"


def ago(value: datetime | None) -> str:
    if value is None:
        return "—"
    delta = (service().clock() - value).total_seconds()
    return f"{duration(delta)} ago" if delta >= 0 else f"in {duration(-delta)}"


def _safe_next(target: str | None) -> str | None:
    """Only a path of this dashboard (no other host, no scheme-relative URL)."""
    if not target or not isinstance(target, str):
        return None
    parts = urlsplit(target)
    base = (request.script_root or "") + "/ui"
    if parts.scheme or parts.netloc or target.startswith("//") or "\\" in target or not parts.path.startswith(base):
        return None
    return target


@bp.get(STATIC_RULE)
@page
def static_file(filename: str) -> Response:
    response = send_from_directory(STATIC, filename, mimetype=STATIC_TYPES[filename], max_age=STATIC_MAX_AGE)
    return response


# -- sign-in ------------------------------------------------------------------------------------

@bp.get("/sign-in")
@page
def sign_in() -> Response:
    return _sign_in_form(request.args.get("reason"), request.args.get("next"), 200)


def _sign_in_form(reason: str | None, next_url: str | None, status: int) -> Response:
    cookies: dict[str, str] = {}
    token = signin.signin_token(cookies)
    message = signin.REASONS.get(reason or "")
    response = make_response(render_template(
        "ui/sign_in.html", token=token, message=message, error=reason not in (None, "", "signed-out", "required"),
        next_url=_safe_next(next_url), auth_disabled=current_app.config["AUTH_DISABLED"]), status)
    signin.set_signin_cookies(response, cookies)
    return response


@bp.post("/sign-in")
@page
def sign_in_submit() -> Response:
    next_url = _safe_next(request.form.get("next"))
    if not signin.signin_form_valid():
        return _sign_in_form("csrf", next_url, 400)
    secret = request.form.get("api_key", "")
    if not secret.strip() and not current_app.config["AUTH_DISABLED"]:
        return _sign_in_form("unknown", next_url, 401)
    principal, value = signin.sign_in(secret)
    if principal is None:
        log.info("ui.sign_in_refused", reason=value)
        return _sign_in_form(value, next_url, 403 if value == "role" else 401)
    log.info("ui.signed_in", key_name=principal.name, role=principal.role)
    response = redirect(next_url or url_for("ui.overview"))
    signin.set_session(response, value)
    return response


@bp.post("/sign-out")
@page
@signed_in
def sign_out() -> Response:
    log.info("ui.signed_out", key_name=g.ui_user.principal.name)
    response = redirect(url_for("ui.sign_in", reason="signed-out"))
    signin.clear(response)
    return response


# -- overview -----------------------------------------------------------------------------------

def _overview_context() -> dict[str, Any]:
    summary = service().estimates.queue_summary()
    seen = {ct for per in summary["counts"].values() for ct in per}
    configured = list(service().settings.content_types)
    types = configured + sorted(seen - set(configured))
    counter = throughput()
    charts = [chart("Last hour (per minute)", counter.buckets(60, 1), 1),
              chart("Last 24 hours (per 15 minutes)", counter.buckets(24 * 60, 15), 15)]
    return {"summary": summary, "types": types, "charts": charts, "now": service().clock()}


@bp.get("/")
@page
@signed_in
def overview() -> str:
    return render_template("ui/overview.html", **_overview_context())


@bp.get("/overview.part")
@page
@signed_in
def overview_part() -> str:
    """The overview's changing part, fetched every few seconds by ui.js."""
    return render_template("ui/_overview_body.html", **_overview_context())


# -- jobs ---------------------------------------------------------------------------------------

class Query:
    """The jobs list's query: the API's list filters (loaded by its own schema) and the id search."""

    def __init__(self, source: Any) -> None:
        self.errors: list[str] = []
        raw = {name: source.get(name, "") for name in LIST_FIELDS}
        raw = {k: v for k, v in raw.items() if v != ""}
        self.search = source.get("q", "").strip()
        self.loaded: dict[str, Any] = {"limit": 50, "cursor": None, **{name: None for name in FILTERS}}
        try:
            jsonrules.refuse_nul({**raw, "q": self.search})
            self.loaded = schema(schemas.ListJobsQuery).load(raw)
        except ValidationError as exc:
            self.errors = [f"{field}: {' '.join(map(str, msgs if isinstance(msgs, list) else [msgs]))}"
                           for field, msgs in sorted(exc.messages.items())]
        except InvalidRequest as exc:
            self.errors = [exc.detail]
        if self.search and not valid_job_id(self.search):
            self.errors.append("search: a job id or the start of one is 1-64 letters, digits, '-' or '_'")

    @property
    def filters(self) -> JobFilter:
        return JobFilter(**{name: self.loaded[name] for name in FILTERS})

    def params(self, **changes: Any) -> dict[str, Any]:
        """The query string of this query (without the cursor unless given), for links and forms."""
        out = {name: self.loaded[name] for name in FILTERS if self.loaded.get(name)}
        if self.search:
            out["q"] = self.search
        if self.loaded["limit"] != 50:
            out["limit"] = self.loaded["limit"]
        out.update({k: v for k, v in changes.items() if v is not None})
        return out

    @property
    def filtered(self) -> bool:
        return bool(self.search or any(self.loaded.get(name) for name in FILTERS))

    def describe(self) -> str:
        parts = [f"{name.replace('_', ' ')} = {self.loaded[name]}" for name in FILTERS if self.loaded.get(name)]
        if self.search:
            parts.append(f"id starts with {self.search}")
        return ", ".join(parts) or "every job"

    def page(self, after: str | None, limit: int) -> tuple[list[RemoteJob], str | None]:
        """A page of matching jobs in id order; with a search, those whose id starts with it (ids
        sort as strings, so they follow one another: the first job without the prefix ends them)."""
        if not self.search:
            return service().list(self.filters, after, limit)
        found: list[RemoteJob] = []
        if after is None:
            try:
                exact = service().get(self.search)
            except JobNotFound:
                exact = None
            if exact is not None and self.filters.matches(exact.status, exact.content_type,
                                                          exact.ingestion_task_id, exact.worker_id):
                found.append(exact)
        jobs, next_cursor = service().list(self.filters, after or self.search, limit)
        kept = [job for job in jobs if job.id.startswith(self.search)]
        return found + kept, next_cursor if len(kept) == len(jobs) else None

    def matching_ids(self, cap: int = BULK_LIMIT) -> tuple[list[str], bool]:
        """Every matching id (at most ``cap``) and whether there were more."""
        ids: list[str] = []
        after: str | None = None
        while True:
            jobs, after = self.page(after, 500)
            ids.extend(job.id for job in jobs)
            if len(ids) > cap:
                return ids[:cap], True
            if after is None:
                return ids, False


def _notice() -> str | None:
    """The message of the last action, from the query string it was redirected with."""
    done = request.args.get("done")
    if done not in DONE:
        return None
    try:
        count, skipped = int(request.args.get("n", "0")), int(request.args.get("skipped", "0"))
    except ValueError:
        return None
    text = f"{count} job{'s' if count != 1 else ''} {DONE[done]}."
    if skipped > 0:
        text += f" {skipped} left as they were (not in a state that allows it, or gone)."
    return text


@bp.get("/jobs")
@page
@signed_in
def jobs() -> Response:
    require(g.ui_user, "list")
    query = Query(request.args)
    found: list[RemoteJob] = []
    next_cursor = None
    if not query.errors:
        found, next_cursor = query.page(query.loaded["cursor"], query.loaded["limit"])
    body = render_template("ui/jobs.html", query=query, jobs=found, next_cursor=next_cursor, notice=_notice(),
                           may_delete=may(g.ui_user, "delete"))
    return make_response(body, 400 if query.errors else 200)


def _act(action: str, job_id: str) -> bool:
    """One job through the service call the API makes; False when the job's state does not allow
    it or the job is gone (nothing changed)."""
    try:
        if action == "cancel":
            service().cancel(job_id)
        elif action == "retry":
            service().retry(job_id)
        else:
            service().delete(job_id)
    except (InvalidTransition, JobNotFound):
        return False
    return True


@bp.post("/jobs/bulk")
@page
@signed_in
def bulk() -> Response:
    action = request.form.get("action", "")
    if action not in ACTIONS:
        raise InvalidRequest("choose cancel, retry or delete")
    require(g.ui_user, action)
    query = Query(request.form)
    if query.errors:
        raise InvalidRequest("; ".join(query.errors))
    if (request.form.get("scope") or request.args.get("scope")) == "matching":
        ids, more = query.matching_ids()
        if request.form.get("confirmed") != "yes":
            return make_response(render_template("ui/confirm.html", query=query, action=action, count=len(ids),
                                                 more=more, limit=BULK_LIMIT))
    else:
        ids = [i for i in dict.fromkeys(request.form.getlist("job_id")) if i][:BULK_LIMIT]
    outcomes = Counter(_act(action, job_id) for job_id in ids)
    log.info("ui.bulk", action=action, done=outcomes[True], skipped=outcomes[False], key_name=g.ui_user.principal.name)
    return redirect(url_for("ui.jobs", **query.params(done=action, n=outcomes[True], skipped=outcomes[False])))


@bp.get("/jobs/<job_id>")
@page
@signed_in
def job_detail(job_id: str) -> str:
    require(g.ui_user, "read")
    job = service().get(job_id)
    result = job.result_data or {}
    content = result.get("content") if isinstance(result.get("content"), str) else None
    allowed = [name for name, act in ACTIONS.items()
               if may(g.ui_user, name) and (act is None or (Status(job.status), act) in TRANSITIONS)]
    return render_template(
        "ui/job.html", job=job, delivery=events().delivery_state(job), allowed=allowed,
        estimated=service().estimates.estimated_completion(job), content=content,
        preview=content[:RESULT_PREVIEW] if content is not None else None,
        truncated=content is not None and len(content) > RESULT_PREVIEW, notice=_notice(),
        error=request.args.get("refused") == "1", fields=_fields(job))


def _fields(job: RemoteJob) -> list[tuple[str, Any]]:
    shown = {"result_data", "result_digest", "lease_id", "extra"}
    return [(name, value) for name, value in vars(job).items() if name not in shown]


@bp.get("/jobs/<job_id>/json")
@page
@signed_in
def job_json(job_id: str) -> Response:
    """The whole job as the API's ``GET /api/v1/remote-jobs/<id>`` answers it, result included."""
    require(g.ui_user, "read")
    job = service().get(job_id)
    body = schema(schemas.JobDetail).dump(SimpleNamespace(**vars(job), event_delivery=events().delivery_state(job)))
    return current_app.response_class(current_app.json.dumps(body, indent=2), mimetype="application/json")


@bp.post("/jobs/<job_id>/<any(cancel, retry, delete):action>")
@page
@signed_in
def job_action(job_id: str, action: str) -> Response:
    require(g.ui_user, action)
    service().get(job_id)  # 404 page for a job that is not there
    done = _act(action, job_id)
    log.info("ui.action", action=action, job_id=job_id, done=done, key_name=g.ui_user.principal.name)
    if action == "delete" and done:
        return redirect(url_for("ui.jobs", done="delete", n=1))
    if not done:
        return redirect(url_for("ui.job_detail", job_id=job_id, refused="1"))
    return redirect(url_for("ui.job_detail", job_id=job_id, done=action, n=1))


# -- workers ------------------------------------------------------------------------------------

@bp.get("/workers")
@page
@signed_in
def workers_page() -> str:
    require(g.ui_user, "workers")
    return render_template("ui/workers.html", workers=workers().list())
