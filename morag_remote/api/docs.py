"""``GET /openapi.json`` (the document built by ``openapi.py``) and ``GET /docs``, a Swagger UI page
that works with no internet: its scripts and styles are the ones the ``flask-swagger-ui`` package
installs (only its ``dist/`` files are used, not its blueprint), served from here, never a CDN.

The page is locked to this origin by its Content-Security-Policy, and Swagger UI's online validator
badge (which would call an outside host) is turned off. No key is needed for any of these.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

from flask import Blueprint, Response, current_app, json, render_template_string, send_from_directory, url_for

from ..context import DOCUMENT
from ..openapi import build_document
from .http import documented, hidden

bp = Blueprint("docs", __name__)

ASSET_TYPES = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
ASSET_RULE = f"/docs/<any({', '.join(repr(name) for name in ASSET_TYPES)}):filename>"
ASSET_MAX_AGE = 24 * 3600
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>morag-remote API</title>
  <link rel="stylesheet" href="{{ url_for('docs.asset', filename='swagger-ui.css') }}">
  <link rel="icon" type="image/png" sizes="32x32" href="{{ url_for('docs.asset', filename='favicon-32x32.png') }}">
  <link rel="icon" type="image/png" sizes="16x16" href="{{ url_for('docs.asset', filename='favicon-16x16.png') }}">
</head>
<body>
  <noscript>This page needs JavaScript; the API's description is <a href="{{ spec_url }}">{{ spec_url }}</a>.</noscript>
  <div id="swagger-ui" data-spec-url="{{ spec_url }}"></div>
  <script src="{{ url_for('docs.asset', filename='swagger-ui-bundle.js') }}"></script>
  <script src="{{ url_for('docs.initializer') }}"></script>
</body>
</html>
"""

# A file of its own rather than an inline script, so the page's policy can forbid inline scripts.
INITIALIZER = """window.addEventListener("load", function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.specUrl,
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
});
"""


@lru_cache(maxsize=1)
def swagger_ui_dist() -> str:
    """The ``dist`` folder of the installed flask-swagger-ui package (found without importing it)."""
    spec = importlib.util.find_spec("flask_swagger_ui")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - a broken install
        raise RuntimeError("flask-swagger-ui is not installed: pip install -r requirements.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], "dist")


def document() -> dict:
    """The app's OpenAPI document, built once (the URL map does not change after the factory)."""
    doc = current_app.extensions.get(DOCUMENT)
    if doc is None:
        doc = current_app.extensions[DOCUMENT] = build_document(current_app)
    return doc


@bp.get("/openapi.json")
@documented("This OpenAPI document", tag="service",
            content={"application/json": {"schema": {"type": "object", "required": ["openapi", "info", "paths"]}}})
def openapi_json() -> Response:
    return current_app.response_class(json.dumps(document()), mimetype="application/json")


@bp.get("/docs")
@documented("The API reference page (Swagger UI, served offline)", tag="service",
            content={"text/html": {"schema": {"type": "string"}}})
def page() -> Response:
    html = render_template_string(PAGE, spec_url=url_for("docs.openapi_json"))
    response = current_app.response_class(html, mimetype="text/html")
    response.headers["Content-Security-Policy"] = PAGE_POLICY
    return response


@bp.get("/docs/swagger-initializer.js")
@hidden("a file of the reference page, not an operation of the API")
def initializer() -> Response:
    return current_app.response_class(INITIALIZER, mimetype="text/javascript")


@bp.get(ASSET_RULE)
@hidden("a file of the reference page, not an operation of the API")
def asset(filename: str) -> Response:
    return send_from_directory(swagger_ui_dist(), filename, mimetype=ASSET_TYPES[filename],
                               max_age=ASSET_MAX_AGE)
