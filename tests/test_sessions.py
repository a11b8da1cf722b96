"""The API keeps no cookie session: every request is authenticated by its key alone."""
from __future__ import annotations

import flask
import pytest


def test_a_request_neither_reads_nor_sets_a_session_cookie(app, client, producer):
    client.set_cookie("session", "not-a-signed-session")
    response = producer.create()
    assert response.status_code == 201
    assert "Set-Cookie" not in response.headers
    assert "Cookie" not in response.headers.get("Vary", "")


def test_the_session_is_the_read_only_null_session(app):
    with app.test_request_context("/"):
        assert isinstance(flask.session, app.session_interface.null_session_class)
        with pytest.raises(RuntimeError):
            flask.session["user"] = "someone"
