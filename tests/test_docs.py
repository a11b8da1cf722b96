"""``GET /docs``: a Swagger UI page that works with no internet (assets from an installed package)."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from morag_remote.api.docs import swagger_ui_dist

EXPECTED_TYPES = {".css": "text/css", ".js": "text/javascript", ".png": "image/png", ".json": "application/json"}


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        self.urls += [values[a] for a in ("src", "href") if values.get(a)]
        if tag == "script":
            self._in_script = "src" not in values

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False


@pytest.fixture
def page(client):
    return client.get("/docs")


def _links(page) -> _Links:
    parser = _Links()
    parser.feed(page.get_data(as_text=True))
    return parser


def test_docs_page_is_html(page):
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    assert 'id="swagger-ui"' in page.get_data(as_text=True)


def test_docs_page_needs_no_key(client, keys):
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_docs_page_references_only_its_own_origin(page):
    urls = _links(page).urls
    assert urls, "the page loads nothing"
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), f"{url} is not on this server"
    assert not re.search(r"https?://", page.get_data(as_text=True))


def test_docs_page_policy_keeps_the_browser_on_this_origin(page):
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self';" in policy and "connect-src 'self';" in policy
    assert _links(page).inline_scripts == 0  # script-src 'self' would block an inline one


def test_every_asset_of_the_page_is_served_with_its_type(client, page):
    for url in _links(page).urls:
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.mimetype == EXPECTED_TYPES[Path(url).suffix], url
        assert response.data, url


def test_assets_are_the_installed_swagger_ui(client):
    served = client.get("/docs/swagger-ui-bundle.js").data
    assert served == (Path(swagger_ui_dist()) / "swagger-ui-bundle.js").read_bytes()
    assert b"SwaggerUIBundle" in served


def test_initializer_loads_this_document_and_no_online_validator(client, page):
    script = client.get("/docs/swagger-initializer.js").get_data(as_text=True)
    assert "validatorUrl: null" in script
    assert not re.search(r"https?://", script)
    assert 'data-spec-url="/openapi.json"' in page.get_data(as_text=True)


def test_unknown_asset_is_a_problem_json_404(client):
    response = client.get("/docs/../secret_key")
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    response = client.get("/docs/index.html")
    assert response.status_code == 404
