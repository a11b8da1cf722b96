"""Who may call what: the auth matrix (every route the app serves x every kind of caller, each cell's
status asserted), how the Authorization header is read, a view without ``@requires`` admitting no
one anonymously, and ``MORAG_REMOTE_AUTH_DISABLED`` (read strictly, warned about at every start).

The routes come from ``app.url_map``, so an endpoint added later is covered automatically: it fails
``test_every_served_route_is_in_the_role_table`` until ROLE_TABLE says who may call it (and how to
call it well enough to succeed). Each allowed cell must succeed (2xx), which proves the request was
a real one and not turned away for another reason.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from support.actions import auth
from morag_remote import create_app
from morag_remote.api.docs import ASSET_RULE
from morag_remote.auth import current_principal
from morag_remote.context import BLOBS, KEYS, SERVICE, TOKENS, UPLOADS
from morag_remote.service import Caller

J = "/api/v1/remote-jobs"
UI = "/ui"
PUBLIC = "public"
ANY_KEY = "any key"
CALLERS = ("no key", "unknown key", "revoked key", "worker", "producer", "admin")


@dataclass(frozen=True)
class Route:
    """Who may call a route, and what a successful call needs."""

    access: str                   # PUBLIC, ANY_KEY, or the one role (admin may do everything)
    job: str | None = None        # state of the job named by <job_id>: pending, claimed, cancelled
    body: Callable[["Cell"], Any] | None = None
    query: dict[str, Any] = field(default_factory=dict)
    token: bool = False           # a download URL from the poll response (token of the claim)
    path: str | None = None       # the URL to request, for a rule with other variables than <job_id>
    headers: dict[str, str] = field(default_factory=dict)
    data: bytes | None = None     # a raw body (uploads, artifacts)
    upload: str | None = None     # state of the upload named by <upload_id>: fresh


def _create_body(cell: "Cell") -> dict[str, Any]:
    return {"source_file_path": str(cell.source), "content_type": "audio", "ingestion_task_id": "matrix"}


POLL = {"worker_id": "w1", "content_types": "document"}

# The contract's role table. Others' endpoints that may not exist yet are listed so they are
# checked the day they are merged; a route that exists but is missing here fails the test below.
ROLE_TABLE: dict[tuple[str, str], Route] = {
    ("GET", "/health"): Route(PUBLIC),
    ("GET", "/openapi.json"): Route(PUBLIC),
    ("GET", "/docs"): Route(PUBLIC),
    ("GET", "/docs/swagger-initializer.js"): Route(PUBLIC),
    ("GET", ASSET_RULE): Route(PUBLIC, path="/docs/swagger-ui.css"),
    ("GET", "/metrics"): Route(ANY_KEY),
    ("POST", J): Route("producer", body=_create_body),
    ("POST", J + "/"): Route("producer", body=_create_body),
    ("GET", J): Route("producer"),
    ("GET", J + "/"): Route("producer"),
    ("GET", J + "/poll"): Route("worker", query=POLL),
    ("POST", J + "/poll"): Route("worker", body=lambda cell: POLL),
    ("GET", J + "/stats"): Route(ANY_KEY),
    ("GET", J + "/<job_id>/status"): Route(ANY_KEY, job="pending"),
    ("GET", J + "/<job_id>"): Route("producer", job="pending"),
    ("POST", J + "/<job_id>/cancel"): Route("producer", job="pending"),
    ("POST", J + "/<job_id>/retry"): Route("producer", job="cancelled"),
    ("DELETE", J + "/<job_id>"): Route("admin", job="pending"),
    ("GET", J + "/<job_id>/download"): Route("worker", job="claimed", token=True),
    ("POST", J + "/<job_id>/heartbeat"): Route("worker", job="claimed", body=lambda cell: {"progress": 0.5}),
    ("PUT", J + "/<job_id>/result"): Route("worker", job="claimed",
                                          body=lambda cell: {"success": True, "content": "text"}),
    ("POST", J + "/<job_id>/release"): Route("worker", job="claimed", body=lambda cell: {}),
    ("GET", J + "/workers"): Route("producer"),
    ("POST", J + "/uploads"): Route("producer", headers={"Upload-Length": "10"}),
    ("POST", J + "/uploads/"): Route("producer", headers={"Upload-Length": "10"}),
    ("GET", J + "/uploads/<upload_id>"): Route("producer", upload="fresh"),
    ("PATCH", J + "/uploads/<upload_id>"): Route("producer", upload="fresh", data=b"0123456789",
                                                 headers={"Upload-Offset": "0",
                                                          "Content-Type": "application/offset+octet-stream"}),
    ("DELETE", J + "/uploads/<upload_id>"): Route("producer", upload="fresh"),
    ("PUT", J + "/<job_id>/artifacts/<path:name>"): Route("worker", job="claimed", data=b"subtitles"),
    ("GET", J + "/<job_id>/artifacts/<path:name>"): Route("producer", job="with_artifact"),
    ("POST", J + "/types/<content_type>/pause"): Route("admin", path=J + "/types/video/pause"),
    ("POST", J + "/types/<content_type>/resume"): Route("admin", path=J + "/types/video/resume"),
    ("POST", J + "/types/<content_type>/limit"): Route("admin", path=J + "/types/video/limit",
                                                        body=lambda cell: {"max_processing": 4}),
}


def served_routes(app) -> list[tuple[str, str]]:
    out = []
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            out.append((method, rule.rule))
    return sorted(out, key=lambda mr: (mr[1], mr[0]))


def expected(caller: str, access: str) -> str:
    if access == PUBLIC:
        return "allowed"
    if caller in ("no key", "unknown key", "revoked key"):
        return "401"
    if access == ANY_KEY or caller == "admin" or caller == access:
        return "allowed"
    return "403"


class Cell:
    """Sets up the state one request needs (a fresh job per cell) and makes the request."""

    def __init__(self, app, client, instance_path) -> None:
        self.app, self.client = app, client
        self.service = app.extensions[SERVICE]
        self.source = instance_path / "sources" / "matrix.bin"
        self.source.write_bytes(b"matrix source bytes")
        self.claims = 0

    def job(self, state: str) -> tuple[str, str | None]:
        # claimed first, the newest before any older one: leftovers (a released job is pending
        # again) never get in the way
        self.claims += state in ("claimed", "with_artifact")
        priority = 1000 + self.claims if state in ("claimed", "with_artifact") else 0
        job = self.service.create(source_file_path=str(self.source), content_type="audio",
                                  ingestion_task_id="matrix", priority=priority)
        if state == "claimed":
            claimed = self.service.poll("w1", ["audio"], 1)
            assert [j.id for j in claimed] == [job.id]
            return job.id, claimed[0].lease_id
        if state == "cancelled":
            self.service.cancel(job.id)
        if state == "with_artifact":
            (claimed,) = self.service.poll("w1", ["audio"], 1)
            blobs = self.app.extensions[BLOBS]
            stored = blobs.stage_artifact(job.id, claimed.lease_id, "talk.srt", [b"subtitles"], 100)
            self.service.submit_result(job.id, Caller(lease_id=claimed.lease_id), success=True, content="x",
                                       artifacts=[{**vars(stored), "attempt": claimed.lease_id}],
                                       artifacts_attempt=claimed.lease_id)
        return job.id, None

    def upload(self) -> str:
        return self.app.extensions[UPLOADS].create("10", None, "matrix").id

    def call(self, method: str, rule: str, route: Route, headers: dict[str, str]):
        path, query = route.path or rule, dict(route.query)
        if route.job:
            job_id, lease_id = self.job(route.job)
            path = rule.replace("<job_id>", job_id).replace("<path:name>", "talk.srt")
            if route.token:
                query["token"] = self.app.extensions[TOKENS].issue(job_id, lease_id)
        if route.upload:
            path = rule.replace("<upload_id>", self.upload())
        kwargs: dict[str, Any] = {"headers": {**headers, **route.headers}, "query_string": query}
        if route.body is not None:
            kwargs["json"] = route.body(self)
        if route.data is not None:
            kwargs["data"] = route.data
        return self.client.open(path, method=method, **kwargs)


def outcome(response) -> str:
    status = response.status_code
    if status == 401:
        challenge = response.headers.get("WWW-Authenticate", "")
        problem = response.mimetype == "application/problem+json"
        return "401" if challenge.startswith("Bearer") and problem else f"401 {challenge!r} {response.mimetype}"
    if status == 403:
        return "403" if response.mimetype == "application/problem+json" else f"403 {response.mimetype}"
    if 200 <= status < 300:
        return "allowed"
    return f"unexpected {status}: {response.get_data(as_text=True)[:200]}"


@pytest.fixture
def caller_headers(app, client, keys) -> dict[str, dict[str, str]]:
    store = app.extensions[KEYS]
    _, revoked = store.create("soon-revoked", "admin")
    # used once first, so this process has it cached as valid before the revocation
    assert client.get(f"{J}/stats", headers=auth(revoked)).status_code == 200
    store.revoke("soon-revoked")
    return {
        "no key": {},
        "unknown key": auth("mrk_" + secrets.token_urlsafe(32)),
        "revoked key": auth(revoked),
        "worker": auth(keys["worker"]),
        "producer": auth(keys["producer"]),
        "admin": auth(keys["admin"]),
    }


def api_routes(app) -> list[tuple[str, str]]:
    """The served routes but the dashboard's (signed in by a cookie: UI_TABLE below)."""
    return [(m, r) for m, r in served_routes(app) if not r.startswith(UI + "/")]


def test_every_served_route_is_in_the_role_table(app):
    missing = [f"{method} {rule}" for method, rule in api_routes(app) if (method, rule) not in ROLE_TABLE]
    assert missing == [], "add these routes to ROLE_TABLE with the role the contract gives them"
    ui_missing = [f"{method} {rule}" for method, rule in served_routes(app)
                  if rule.startswith(UI + "/") and (method, rule) not in UI_TABLE]
    assert ui_missing == [], "add these dashboard routes to UI_TABLE with who may use them"


def test_the_matrix_covers_the_foundation_routes(app):
    served = set(served_routes(app))
    assert {("POST", J + "/"), ("GET", J + "/<job_id>/download"), ("PUT", J + "/<job_id>/result"),
            ("DELETE", J + "/<job_id>"), ("GET", J + "/stats"), ("GET", "/health")} <= served


@pytest.mark.parametrize("caller", CALLERS)
def test_auth_matrix_row(caller, app, client, instance_path, caller_headers):
    cell = Cell(app, client, instance_path)
    routes = api_routes(app)
    want = {f"{m} {r}": expected(caller, ROLE_TABLE[(m, r)].access) for m, r in routes}
    got = {f"{m} {r}": outcome(cell.call(m, r, ROLE_TABLE[(m, r)], caller_headers[caller])) for m, r in routes}
    assert got == want


@pytest.mark.parametrize("header", [
    None,  # no Authorization header at all
    "Basic dXNlcjpwYXNz",
    "Basic abc",
    "Bearer",
    "Bearer    ",
    "Token mrk_whatever",
    "mrk_no_scheme_at_all",
    "Bearer mrk_" + "x" * 5000,
    "Bearer \u00e9\u00e8",
    "Bearer mrk_not-a-real-key",
])
def test_malformed_authorization_header_is_401_with_bearer_challenge(client, keys, header):
    response = client.get(f"{J}/stats", headers={} if header is None else {"Authorization": header})
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json["status"] == 401


def test_bearer_scheme_is_case_insensitive(client, keys):
    response = client.get(f"{J}/stats", headers={"Authorization": f"bearer {keys['worker']}"})
    assert response.status_code == 200


def test_unknown_route_is_404_without_asking_for_a_key(client):
    response = client.get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"


# -- a view without @requires, and MORAG_REMOTE_AUTH_DISABLED -----------------------------------------

def log_lines(buffer) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("value", ["true", "True", "1", "yes", "on"])
def test_auth_disabled_lets_requests_in_and_warns_at_every_start(value, monkeypatch, instance_path, log_output):
    monkeypatch.setenv("MORAG_REMOTE_AUTH_DISABLED", value)
    for _ in range(2):
        app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True})
        assert app.test_client().get(f"{J}/stats").status_code == 200
        # every request is admin: an admin-only route answers (404: there is no such job)
        assert app.test_client().delete(f"{J}/0190d6a0-0000-7000-8000-000000000000").status_code == 404
    warnings = [e for e in log_lines(log_output) if e["event"] == "auth.disabled"]
    assert len(warnings) == 2
    assert all(e["level"] == "warning" for e in warnings)


@pytest.mark.parametrize("value", ["false", "False", "0", "no", "off", ""])
def test_auth_disabled_set_to_a_false_value_keeps_auth_on(value, monkeypatch, instance_path):
    monkeypatch.setenv("MORAG_REMOTE_AUTH_DISABLED", value)
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True})
    assert app.test_client().get(f"{J}/stats").status_code == 401


@pytest.mark.parametrize("value", ["maybe", "2", "[]", "tru"])
def test_auth_disabled_with_an_unclear_value_refuses_to_start(value, monkeypatch, instance_path):
    monkeypatch.setenv("MORAG_REMOTE_AUTH_DISABLED", value)
    with pytest.raises(ValueError, match="MORAG_REMOTE_AUTH_DISABLED must be true or false"):
        create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True})


def test_a_view_without_requires_does_not_get_an_anonymous_admin(app, client, keys):
    app.add_url_rule("/who-for-test", view_func=lambda: {"role": current_principal().role})
    assert client.get("/who-for-test").status_code == 401
    assert client.get("/who-for-test", headers=auth(keys["worker"])).json == {"role": "worker"}


# -- the dashboard (/ui): a signed cookie instead of a Bearer header ---------------------------------
# Each route x each kind of caller. "signed in" routes need a producer or admin cookie (an action on
# a job needs the role of the API route that does the same); every POST also needs the cookie's CSRF
# token. A refused caller is sent to the sign-in form and nothing changes.

SIGNED_IN = "signed in"
UI_ACTION = UI + "/jobs/<job_id>/<any(cancel, retry, delete):action>"


@dataclass(frozen=True)
class UiRoute:
    access: str                      # PUBLIC, SIGNED_IN (producer or admin), or "admin"
    job: str | None = None           # a job in this state named in the path (or the form of a bulk action)
    path: str | None = None
    action: str | None = None        # the job action (its state afterwards tells whether it ran)


UI_TABLE: dict[tuple[str, str], tuple[UiRoute, ...]] = {
    ("GET", UI + "/sign-in"): (UiRoute(PUBLIC),),
    ("POST", UI + "/sign-in"): (UiRoute(PUBLIC),),  # the sign-in itself: tests/test_ui.py
    ("GET", UI + "/static/<any('ui.css', 'ui.js', 'favicon.svg'):filename>"): (UiRoute(PUBLIC, path=UI + "/static/ui.css"),),
    ("POST", UI + "/sign-out"): (UiRoute(SIGNED_IN),),
    ("GET", UI + "/"): (UiRoute(SIGNED_IN),),
    ("GET", UI + "/overview.part"): (UiRoute(SIGNED_IN),),
    ("GET", UI + "/jobs"): (UiRoute(SIGNED_IN),),
    ("GET", UI + "/workers"): (UiRoute(SIGNED_IN),),
    ("GET", UI + "/jobs/<job_id>"): (UiRoute(SIGNED_IN, job="pending"),),
    ("GET", UI + "/jobs/<job_id>/json"): (UiRoute(SIGNED_IN, job="pending"),),
    ("POST", UI + "/jobs/bulk"): (UiRoute(SIGNED_IN, job="pending", action="cancel"),),
    ("POST", UI_ACTION): (UiRoute(SIGNED_IN, job="pending", action="cancel"),
                          UiRoute(SIGNED_IN, job="cancelled", action="retry"),
                          UiRoute("admin", job="pending", action="delete")),
}
UI_CALLERS = ("no cookie", "forged cookie", "expired cookie", "revoked key", "worker", "producer", "admin",
              "producer without CSRF", "admin without CSRF")
_AFTER = {"cancel": "cancelled", "retry": "pending", "delete": "deleted"}


def _ui_cookie(app, key_name: str, age: float = 0.0) -> str:
    """A session cookie as the dashboard signs it, for the key named, signed ``age`` seconds ago."""
    import time

    from itsdangerous import TimestampSigner, URLSafeTimedSerializer

    class Dated(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time() - age)

    key = next(k for k in app.extensions[KEYS].list() if k.name == key_name)
    serializer = URLSafeTimedSerializer(app.config["SECRET_KEY"], salt="ui-session", signer=Dated)
    return serializer.dumps({"k": key.key_hash, "n": key.name, "c": "tok"})


def _ui_caller(app, caller: str) -> tuple[str | None, str | None]:
    """(cookie, CSRF token) of a kind of caller."""
    store = app.extensions[KEYS]
    if caller == "no cookie":
        return None, None
    if caller == "forged cookie":
        return _ui_cookie(app, "admin-key")[:-4] + "AAAA", "tok"
    if caller == "expired cookie":
        return _ui_cookie(app, "admin-key", age=app.config["UI_SESSION_SECONDS"] + 60), "tok"
    if caller == "revoked key":
        store.create("ui-revoked", "admin")
        cookie = _ui_cookie(app, "ui-revoked")
        store.revoke("ui-revoked")
        return cookie, "tok"
    role, _, csrf = caller.partition(" without ")
    return _ui_cookie(app, f"{role}-key"), None if csrf else "tok"


def ui_expected(caller: str, route: UiRoute, method: str) -> str:
    if route.access == PUBLIC:
        return "allowed"
    if caller not in ("producer", "admin") and not (method == "GET" and caller.endswith("without CSRF")):
        return "sign-in"
    if route.access == "admin" and not caller.startswith("admin"):
        return "403"
    return "allowed"


def ui_outcome(response) -> str:
    status = response.status_code
    location = response.headers.get("Location", "")
    if status == 302 and "/ui/sign-in?reason=" in location and "reason=signed-out" not in location:
        return "sign-in"
    if status == 403 and response.mimetype == "text/html":
        return "403"
    if 200 <= status < 300 or status == 302:
        return "allowed"
    return f"unexpected {status}: {response.get_data(as_text=True)[:200]}"


@pytest.mark.parametrize("caller", UI_CALLERS)
def test_ui_auth_matrix_row(caller, app, client, instance_path, keys):
    cell = Cell(app, client, instance_path)
    cookie, csrf = _ui_caller(app, caller)
    want, got = {}, {}
    for (method, rule), routes in UI_TABLE.items():
        for route in routes:
            name = f"{method} {rule} {route.action or ''}".strip()
            job_id = cell.job(route.job)[0] if route.job else None
            path = route.path or rule
            if job_id:
                path = path.replace("<job_id>", job_id)
            path = path.replace("<any(cancel, retry, delete):action>", route.action or "")
            form: dict[str, Any] = {}
            if method == "POST" and rule != UI + "/sign-in":
                form = {"action": route.action, "job_id": job_id} if rule.endswith("/bulk") else {}
                if csrf:
                    form["csrf_token"] = csrf
            client.delete_cookie("morag_remote_ui", path="/ui")
            if cookie:
                client.set_cookie("morag_remote_ui", cookie, path="/ui")
            if rule == UI + "/sign-in" and method == "POST":  # the form's own token, and a key
                page = client.get(path).get_data(as_text=True)
                form = {"csrf_token": re.search(r'name="csrf_token" value="([^"]+)"', page).group(1),
                        "api_key": keys["admin"]}
            response = client.open(path, method=method, data=form or None)
            want[name] = ui_expected(caller, route, method)
            got[name] = ui_outcome(response)
            if route.action:  # the job is changed exactly when the call was allowed
                try:
                    state = cell.service.get(job_id).status
                except Exception:
                    state = "deleted"
                assert state == (_AFTER[route.action] if want[name] == "allowed" else route.job), name
    assert got == want
