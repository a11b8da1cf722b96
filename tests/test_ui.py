"""The dashboard (``/ui``) through Flask's test client, on both backends: sign-in and its cookie,
every way back to the sign-in form (nothing changed), the pages and what they show, bulk actions
with their confirmation, the 404 page. Who may call each route is in tests/test_auth_roles.py (UI_TABLE);
a real browser drives the pages in tests/test_ui_browser.py."""
from __future__ import annotations

import re

import pytest

from morag_remote.context import KEYS
from morag_remote.ui.signin import COOKIE, REASONS
from support.ui import TOKEN, sign_in



def csrf(client, path: str = "/ui/jobs") -> str:
    return TOKEN.search(client.get(path).get_data(as_text=True)).group(1)


def text(response) -> str:
    return response.get_data(as_text=True)


@pytest.fixture
def admin_ui(client, keys):
    assert sign_in(client, keys["admin"]).status_code == 302
    return client


def _set_cookie(response, name: str = COOKIE) -> str:
    return next(h for h in response.headers.getlist("Set-Cookie") if h.startswith(name + "="))


def test_sign_in_sets_a_signed_httponly_strict_cookie_for_ui_only(client, keys):
    response = sign_in(client, keys["producer"])
    assert response.status_code == 302 and response.headers["Location"] == "/ui/"
    cookie = _set_cookie(response)
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert "Max-Age=28800" in cookie and "Secure" not in cookie
    assert keys["producer"] not in cookie  # the key's hash is signed, never the key
    assert client.get("/ui/").status_code == 200


def test_the_cookie_is_secure_over_https(client, keys):
    page = client.get("/ui/sign-in", base_url="https://localhost")
    token = TOKEN.search(text(page)).group(1)
    response = client.post("/ui/sign-in", base_url="https://localhost", data={"csrf_token": token, "api_key": keys["admin"]})
    assert "; Secure" in _set_cookie(response)


@pytest.mark.parametrize("role", ["worker", "worker_bound"])
def test_a_worker_key_is_refused_with_a_clear_message(client, keys, role):
    response = sign_in(client, keys[role])
    assert response.status_code == 403
    assert REASONS["role"] in text(response)
    assert not [h for h in response.headers.getlist("Set-Cookie") if h.startswith(COOKIE + "=")]


def test_an_unknown_key_and_an_empty_one_are_refused(client, keys):
    assert sign_in(client, "mrk_" + "x" * 43).status_code == 401
    response = sign_in(client, "  ")
    assert response.status_code == 401 and REASONS["unknown"] in text(response)
    assert client.get("/ui/").status_code == 302


def test_the_sign_in_form_needs_its_own_token(client, keys):
    response = client.post("/ui/sign-in", data={"api_key": keys["admin"]})
    assert response.status_code == 400 and not response.headers.get("Location")
    client.get("/ui/sign-in")
    assert client.post("/ui/sign-in", data={"api_key": keys["admin"], "csrf_token": "guess"}).status_code == 400


def test_sign_in_returns_to_the_page_asked_for_but_never_elsewhere(client, keys):
    response = client.get("/ui/jobs?status=failed")
    assert response.headers["Location"] == "/ui/sign-in?reason=required&next=/ui/jobs?status%3Dfailed"
    assert sign_in(client, keys["admin"], next="/ui/jobs?status=failed").headers["Location"] == "/ui/jobs?status=failed"
    for elsewhere in ("//evil.example/ui/", "https://evil.example/ui/", "/api/v1/remote-jobs", "/ui\\..\\x"):
        assert sign_in(client, keys["admin"], next=elsewhere).headers["Location"] == "/ui/"


@pytest.mark.parametrize("cookie, reason", [("garbage", "forged"), (None, "required")])
def test_no_cookie_or_a_forged_one_goes_back_to_sign_in(client, cookie, reason):
    if cookie:
        client.set_cookie(COOKIE, cookie, path="/ui")
    response = client.get("/ui/workers")
    assert response.status_code == 302 and f"reason={reason}" in response.headers["Location"]
    assert REASONS[reason] in text(client.get(response.headers["Location"]))


def test_an_expired_sign_in_and_a_revoked_key_go_back_to_sign_in(app, client, keys):
    store = app.extensions[KEYS]
    _, secret = store.create("short-lived", "admin")
    sign_in(client, secret)
    app.config["UI_SESSION_SECONDS"] = -1
    response = client.get("/ui/")
    assert "reason=expired" in response.headers["Location"] and "Max-Age=0" in _set_cookie(response)
    app.config["UI_SESSION_SECONDS"] = 3600
    sign_in(client, secret)
    assert client.get("/ui/").status_code == 200
    store.revoke("short-lived")
    assert "reason=revoked" in client.get("/ui/").headers["Location"]


def test_a_post_without_the_csrf_token_changes_nothing(admin_ui, producer, service):
    job_id = producer.create_id()
    for form in ({}, {"csrf_token": "wrong"}):
        response = admin_ui.post(f"/ui/jobs/{job_id}/cancel", data=form)
        assert "reason=csrf" in response.headers["Location"]
        response = admin_ui.post("/ui/jobs/bulk", data={**form, "action": "cancel", "job_id": job_id})
        assert "reason=csrf" in response.headers["Location"]
    assert service.get(job_id).status == "pending"


def test_sign_out_ends_the_session(admin_ui):
    response = admin_ui.post("/ui/sign-out", data={"csrf_token": csrf(admin_ui)})
    assert "reason=signed-out" in response.headers["Location"] and "Max-Age=0" in _set_cookie(response)
    assert "reason=required" in admin_ui.get("/ui/").headers["Location"]


def test_auth_disabled_signs_in_as_admin_without_a_key(instance_path, backend_config):
    from morag_remote import create_app

    app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True,
                      "AUTH_DISABLED": True, **backend_config})
    client = app.test_client()
    assert sign_in(client, "").status_code == 302
    assert "auth-disabled" in text(client.get("/ui/"))


# -- pages --------------------------------------------------------------------------------------

def test_the_overview_counts_jobs_by_status_and_type_and_draws_the_charts(app, admin_ui, producer, worker, own_minutes):
    before = text(admin_ui.get("/ui/overview.part"))
    assert 'id="total-pending">0<' in before
    job_id = producer.create_id("video")
    producer.create_id("audio")
    assert worker.claim("video")["job_id"] == job_id
    worker.result(job_id)
    body = text(admin_ui.get("/ui/"))
    assert 'id="total-pending">1<' in body and 'id="total-completed">1<' in body
    assert 'data-status="completed" data-type="video"><a' in body
    assert body.count("<svg") == 2 and "claims 1" in body and "completions 1" in body
    assert 'data-refresh="/ui/overview.part"' in body and 'id="pause"' in body
    assert 'id="active-workers">1<' in body


def test_the_jobs_list_filters_searches_and_pages(admin_ui, producer, service):
    ids = [producer.create_id(ingestion_task_id="A") for _ in range(3)] + [producer.create_id(ingestion_task_id="B")]
    service.cancel(ids[0])
    page = text(admin_ui.get("/ui/jobs?ingestion_task_id=A&status=pending"))
    assert ids[1] in page and ids[2] in page and ids[0] not in page and ids[3] not in page
    first = text(admin_ui.get("/ui/jobs?limit=2"))
    assert ids[0] in first and ids[1] in first and ids[2] not in first
    next_link = re.search(r'id="next-page"', first) and re.search(r'href="([^"]+)" id="next-page"', first).group(1)
    second = text(admin_ui.get(next_link.replace("&amp;", "&")))
    assert ids[2] in second and ids[3] in second and ids[0] not in second
    exact = text(admin_ui.get(f"/ui/jobs?q={ids[3]}"))
    assert ids[3] in exact and ids[2] not in exact
    prefix = ids[3][:-4]
    assert ids[3] in text(admin_ui.get(f"/ui/jobs?q={prefix}"))
    assert "No job matches" in text(admin_ui.get("/ui/jobs?q=zzzz"))


@pytest.mark.parametrize("query", ["status=bogus", "limit=0", "limit=x", "cursor=" + "c" * 65, "q=a/b", "q=%00"])
def test_a_bad_filter_is_said_on_the_page(admin_ui, query):
    response = admin_ui.get(f"/ui/jobs?{query}")
    assert response.status_code == 400 and 'class="notice error"' in text(response)


def test_producers_see_no_delete_buttons_and_admins_do(client, keys, producer):
    job_id = producer.create_id()
    sign_in(client, keys["producer"])
    assert "Delete" not in text(client.get("/ui/jobs")) and 'id="action-delete"' not in text(client.get(f"/ui/jobs/{job_id}"))
    response = client.post(f"/ui/jobs/{job_id}/delete", data={"csrf_token": csrf(client)})
    assert response.status_code == 403 and "may not delete" in text(response)
    sign_in(client, keys["admin"])
    assert 'id="sel-delete"' in text(client.get("/ui/jobs")) and 'id="action-delete"' in text(client.get(f"/ui/jobs/{job_id}"))


def test_bulk_actions_on_a_selection(admin_ui, producer, service):
    ids = [producer.create_id() for _ in range(3)]
    service.cancel(ids[2])
    response = admin_ui.post("/ui/jobs/bulk", data={"csrf_token": csrf(admin_ui), "action": "cancel", "job_id": ids})
    assert [service.get(i).status for i in ids] == ["cancelled"] * 3
    notice = text(admin_ui.get(response.headers["Location"]))
    assert "2 jobs cancelled. 1 left as they were" in notice
    admin_ui.post("/ui/jobs/bulk", data={"csrf_token": csrf(admin_ui), "action": "retry", "job_id": ids[:2]})
    assert [service.get(i).status for i in ids] == ["pending", "pending", "cancelled"]
    admin_ui.post("/ui/jobs/bulk", data={"csrf_token": csrf(admin_ui), "action": "delete", "job_id": ids[1:]})
    assert [j.id for j in service.list(__import__("morag_remote.store.base", fromlist=["JobFilter"]).JobFilter(), None, 10)[0]] == ids[:1]


def test_bulk_on_everything_matching_asks_first_and_says_how_many(admin_ui, producer, service):
    mine = [producer.create_id(ingestion_task_id="bulk") for _ in range(3)]
    other = producer.create_id(ingestion_task_id="keep")
    token = csrf(admin_ui)
    form = {"csrf_token": token, "action": "cancel", "ingestion_task_id": "bulk", "status": "pending"}
    ask = admin_ui.post("/ui/jobs/bulk?scope=matching", data=form)
    assert ask.status_code == 200 and "This will cancel <strong>3</strong> jobs matching" in text(ask)
    assert all(service.get(i).status == "pending" for i in mine)  # asking changed nothing
    done = admin_ui.post("/ui/jobs/bulk", data={**form, "scope": "matching", "confirmed": "yes"})
    assert "3 jobs cancelled" in text(admin_ui.get(done.headers["Location"]))
    assert [service.get(i).status for i in mine] == ["cancelled"] * 3 and service.get(other).status == "pending"


def test_the_job_page_shows_every_field_progress_attempt_result_and_json(app, admin_ui, producer, worker, service):
    job_id = producer.create_id()
    worker.claim()
    worker.heartbeat(job_id, progress=0.4, message="page 4 of 10")
    page = text(admin_ui.get(f"/ui/jobs/{job_id}"))
    assert 'value="0.4"' in page and "page 4 of 10" in page and "w1" in page
    for name in ("ingestion_task_id", "source_file_path", "max_retries", "available_at", "releases"):
        assert f"<th>{name}</th>" in page
    assert 'id="action-cancel"' in page and 'id="action-retry"' not in page
    long = "x" * 5000
    worker.result(job_id, content=long)
    page = text(admin_ui.get(f"/ui/jobs/{job_id}"))
    assert "Showing the first 2000 of 5000 characters." in page and 'id="action-retry"' not in page
    whole = admin_ui.get(f"/ui/jobs/{job_id}/json")
    assert whole.mimetype == "application/json" and whole.json["result_data"]["content"] == long
    assert whole.json["id"] == job_id


def test_a_failed_job_can_be_retried_from_its_page(admin_ui, producer, worker, service):
    job_id = producer.create_id(max_retries=0)
    worker.claim()
    worker.result(job_id, success=False, error_message="GPU fell over")
    page = text(admin_ui.get(f"/ui/jobs/{job_id}"))
    assert "GPU fell over" in page and 'id="action-retry"' in page
    response = admin_ui.post(f"/ui/jobs/{job_id}/retry", data={"csrf_token": csrf(admin_ui)})
    assert service.get(job_id).status == "pending"
    assert "1 job put back in the queue." in text(admin_ui.get(response.headers["Location"]))
    refused = admin_ui.post(f"/ui/jobs/{job_id}/retry", data={"csrf_token": csrf(admin_ui)})
    assert "refused=1" in refused.headers["Location"]


def test_an_unknown_job_is_a_404_page_in_the_dashboard_style(admin_ui):
    for path in ("/ui/jobs/0190d6a0-0000-7000-8000-000000000000", "/ui/jobs/not-a-job/json", "/ui/jobs/" + "x" * 200):
        response = admin_ui.get(path)
        assert response.status_code == 404 and response.mimetype == "text/html"
        assert "404 · Not found" in text(response) and 'href="/ui/jobs"' in text(response)
    response = admin_ui.post("/ui/jobs/0190d6a0-0000-7000-8000-000000000000/cancel", data={"csrf_token": csrf(admin_ui)})
    assert response.status_code == 404


def test_the_workers_page_lists_what_the_registry_knows(admin_ui, client, keys):
    worker_meta = {"hostname": "gpu-7", "version": "1.2", "labels": {"gpu": "a100"}}
    client.post("/api/v1/remote-jobs/poll", json={"worker_id": "w-gpu", "content_types": ["audio"], "worker": worker_meta},
                headers={"Authorization": f"Bearer {keys['worker']}"})
    page = text(admin_ui.get("/ui/workers"))
    assert "w-gpu" in page and "gpu-7" in page and "gpu=a100" in page


def test_pages_are_locked_down(admin_ui):
    response = admin_ui.get("/ui/")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["X-Frame-Options"] == "DENY" and "no-store" in response.headers["Cache-Control"]
    assert "<script>" not in text(response) and "http://" not in text(response).replace("http://www.w3.org", "")
    static = admin_ui.get("/ui/static/ui.js")
    assert static.status_code == 200 and static.mimetype == "text/javascript"


def test_under_a_prefix_links_redirects_and_the_cookie_carry_it(client, keys):
    prefix = {"SCRIPT_NAME": "/queue"}
    response = client.get("/ui/jobs", environ_overrides=prefix)
    assert response.headers["Location"].startswith("/queue/ui/sign-in?reason=required&next=/queue/ui/jobs")
    page = client.get("/ui/sign-in", environ_overrides=prefix)
    assert 'href="/queue/ui/static/ui.css"' in text(page) and "Path=/queue/ui" in _set_cookie(page, "morag_remote_ui_signin")
    token = TOKEN.search(text(page)).group(1)
    client.set_cookie("morag_remote_ui_signin", _set_cookie(page, "morag_remote_ui_signin").split(";")[0].split("=", 1)[1],
                      path="/ui")
    signed = client.post("/ui/sign-in", environ_overrides=prefix,
                         data={"csrf_token": token, "api_key": keys["admin"], "next": "/queue/ui/workers"})
    assert signed.headers["Location"] == "/queue/ui/workers" and "Path=/queue/ui" in _set_cookie(signed)
