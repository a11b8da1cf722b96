"""The operator's dashboard at ``/ui``: server-rendered pages (Jinja templates and static files in
this package, nothing fetched from elsewhere) over the same service calls as the API.

``signin.py`` is the signed cookie and the CSRF tokens; ``views.py`` the pages and actions;
``charts.py`` draws the throughput charts as inline SVG. No page is an API operation: every view
is ``@hidden`` from the OpenAPI document.
"""
from __future__ import annotations

from flask import Flask


def init_ui(app: Flask) -> None:
    from . import views

    app.register_blueprint(views.bp)
