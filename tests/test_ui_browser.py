"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against a real gunicorn
(two processes) on a loopback port, on the JSON files and on PostgreSQL. Each test does what an
operator does (sign in, watch the counts move, filter, open a job, retry, bulk-cancel, sign out)
and saves a screenshot of each page to screenshots/ (ignored by git) for a reviewer.

Left out, with one line in the summary, when there is no browser (tests/support/browser.py)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from support.browser import CHROMIUM, screenshot
from support.gunicorn import gunicorn, make_keys, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow]
J = "/api/v1/remote-jobs"


class Api:
    """The API as its callers use it, next to the browser."""

    def __init__(self, base: str, keys: dict[str, str], sources: Path) -> None:
        self.base, self.keys, self.sources = base, keys, sources
        self.count = 0

    def call(self, method: str, path: str, role: str = "producer", **kw: Any) -> requests.Response:
        return requests.request(method, self.base + J + path, headers={"Authorization": f"Bearer {self.keys[role]}"},
                                timeout=30, **kw)

    def create(self, ingestion: str = "browser", content_type: str = "audio", **extra: Any) -> str:
        self.count += 1
        source = self.sources / f"in-{self.count}.bin"
        source.write_bytes(b"bytes")
        response = self.call("POST", "/", json={"source_file_path": str(source), "content_type": content_type,
                                                "ingestion_task_id": ingestion, **extra})
        assert response.status_code == 201, response.text
        return response.json()["job_id"]

    def fail(self, job_id: str, content_type: str) -> None:
        polled = self.call("GET", "/poll", "worker", params={"worker_id": "gpu-1", "content_types": content_type})
        assert polled.json()["job_id"] == job_id, polled.text
        assert self.call("PUT", f"/{job_id}/result", "worker",
                         json={"success": False, "error_message": "CUDA out of memory", "retryable": False}).ok

    def status(self, job_id: str) -> str:
        return self.call("GET", f"/{job_id}/status").json()["status"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def files_server(tmp_path_factory) -> Iterator[Api]:
    instance = tmp_path_factory.mktemp("ui-browser") / "instance"
    (instance / "sources").mkdir(parents=True)
    keys = make_keys(instance)
    with gunicorn(instance) as base:
        yield Api(base, keys, instance / "sources")


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(20_000)
    tab = context.new_page()
    yield tab
    context.close()


def sign_in(page, api: Api, role: str = "admin") -> None:
    page.goto(api.base + "/ui/")
    assert "/ui/sign-in" in page.url
    page.fill("#api_key", api.keys[role])
    page.click("#sign-in")
    page.wait_for_url(re.compile(r".*/ui/$"))


def test_sign_in_and_watch_the_counts_change_without_a_reload(page, files_server):
    api = files_server
    page.goto(api.base + "/ui/jobs")
    screenshot(page, "sign-in")
    page.fill("#api_key", api.keys["worker"])
    page.click("#sign-in")
    assert "Worker keys cannot sign in" in page.inner_text("#message")
    page.fill("#api_key", api.keys["admin"])
    page.click("#sign-in")
    page.wait_for_url(re.compile(r".*/ui/jobs$"))  # back where it was going
    page.goto(api.base + "/ui/")
    before = int(page.inner_text("#total-pending"))
    page.evaluate("window.__marker = 'same page'")
    api.create("watch", "video")
    wait_for(lambda: int(page.inner_text("#total-pending")) == before + 1, 20, "the pending count to move")
    assert page.evaluate("window.__marker") == "same page"  # refreshed in place, not reloaded
    page.click("#pause")
    assert page.inner_text("#pause") == "Resume"
    api.create("watch", "video")
    page.wait_for_timeout(7_000)
    assert int(page.inner_text("#total-pending")) == before + 1  # paused: nothing moves
    page.click("#pause")
    wait_for(lambda: int(page.inner_text("#total-pending")) == before + 2, 20, "the count after resuming")
    screenshot(page, "overview")


def test_filter_the_list_and_open_a_job(page, files_server):
    api = files_server
    mine = [api.create("filter-me", "document") for _ in range(2)]
    api.create("someone-else", "document")
    sign_in(page, api)
    page.click("text=Jobs")
    page.fill("#f-ingestion", "filter-me")
    page.click("#apply")
    page.wait_for_url(re.compile(r".*ingestion_task_id=filter-me.*"))
    rows = page.locator("#job-table tbody tr[data-job-id]")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.jobId)")) == sorted(mine)
    screenshot(page, "jobs")
    page.click(f"text={mine[0]}")
    page.wait_for_url(re.compile(rf".*/ui/jobs/{mine[0]}$"))
    assert page.inner_text("#job-status") == "pending"
    assert "filter-me" in page.inner_text("#fields")
    screenshot(page, "job")
    page.goto(api.base + "/ui/jobs/0190d6a0-0000-7000-8000-000000000000")
    assert "404" in page.inner_text("h1")
    screenshot(page, "not-found")


def test_retry_a_failed_job_and_see_it_pending(page, files_server):
    api = files_server
    job_id = api.create("retry-me", "image", max_retries=0)
    api.fail(job_id, "image")
    sign_in(page, api, "producer")
    page.goto(api.base + f"/ui/jobs/{job_id}")
    assert page.inner_text("#job-status") == "failed" and "CUDA out of memory" in page.inner_text("#attempt")
    assert page.locator("#action-delete").count() == 0  # a producer may not delete
    screenshot(page, "job-failed")
    page.click("#action-retry")
    page.wait_for_selector("#notice")
    assert page.inner_text("#job-status") == "pending" and api.status(job_id) == "pending"


def test_bulk_cancel_everything_a_filter_matches(page, files_server):
    api = files_server
    doomed = [api.create("bulk-cancel", "web") for _ in range(3)]
    kept = api.create("bulk-keep", "web")
    sign_in(page, api)
    page.goto(api.base + "/ui/jobs?ingestion_task_id=bulk-cancel&status=pending")
    page.click("#all-cancel")
    assert "This will cancel 3 jobs matching" in page.inner_text("#confirm-text")
    screenshot(page, "confirm")
    page.click("#confirm")
    assert "3 jobs cancelled." in page.inner_text("#notice")
    assert [api.status(j) for j in doomed] == ["cancelled"] * 3 and api.status(kept) == "pending"
    # and on a selection: tick one row, cancel it
    page.goto(api.base + "/ui/jobs?ingestion_task_id=bulk-keep")
    page.check(f"input.pick[value='{kept}']")
    page.click("#sel-cancel")
    assert "1 job cancelled." in page.inner_text("#notice") and api.status(kept) == "cancelled"


def test_the_workers_page_and_signing_out(page, files_server):
    api = files_server
    api.create("held", "youtube")
    polled = api.call("POST", "/poll", "worker", json={"worker_id": "gpu-7", "content_types": ["youtube"],
                                                       "worker": {"hostname": "rig-7", "labels": {"gpu": "a100"}}})
    assert polled.json()["job_id"]
    api.call("POST", f"/{polled.json()['job_id']}/heartbeat", "worker", json={"progress": 0.6, "message": "frame 600"})
    sign_in(page, api)
    page.click("text=Workers")
    row = page.locator("tr[data-worker-id='gpu-7']")
    assert "rig-7" in row.inner_text() and "gpu=a100" in row.inner_text() and "frame 600" in row.inner_text()
    screenshot(page, "workers")
    page.click("#sign-out")
    assert "You are signed out." in page.inner_text("#message")
    page.goto(api.base + "/ui/jobs")
    assert "/ui/sign-in" in page.url and "Sign in with an API key" in page.inner_text("#message")
    screenshot(page, "signed-out")


@pytest.mark.postgres
def test_the_dashboard_on_postgresql(page, pg_url, tmp_path):
    from morag_remote.store.postgres.db import database
    from morag_remote.store.postgres.keys import PostgresKeyStore

    store = PostgresKeyStore(database(pg_url))
    keys = {role: store.create(f"{role}-key", role)[1] for role in ("worker", "producer", "admin")}
    instance = tmp_path / "instance"
    (instance / "sources").mkdir(parents=True)
    with gunicorn(instance, env={"MORAG_REMOTE_DATABASE_URL": pg_url}) as base:
        api = Api(base, keys, instance / "sources")
        sign_in(page, api)
        before = int(page.inner_text("#total-pending"))
        job_id = api.create("on-postgres", "audio")
        wait_for(lambda: int(page.inner_text("#total-pending")) == before + 1, 20, "the pending count to move")
        screenshot(page, "overview-postgres")
        page.goto(base + "/ui/jobs?ingestion_task_id=on-postgres")
        page.click(f"text={job_id}")
        page.click("#action-cancel")
        page.wait_for_selector("#notice")
        assert page.inner_text("#job-status") == "cancelled" and api.status(job_id) == "cancelled"
