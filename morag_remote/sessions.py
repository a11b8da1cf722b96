"""No cookie sessions: the API authenticates every request by its key and keeps no per-client state.

Flask opens its signed-cookie session on every request whatever the view does (it builds an
itsdangerous serializer and looks for the cookie), and checks it again on the way out; with
:class:`NoSessions` it hands out its read-only null session instead, and nothing is signed, read or
set. ``SECRET_KEY`` still signs the download tokens (``tokens.py``).
"""
from __future__ import annotations

from flask import Flask, Request
from flask.sessions import SessionInterface, SessionMixin


class NoSessions(SessionInterface):
    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        return None  # Flask then uses make_null_session: any write to it raises

    def save_session(self, app: Flask, session: SessionMixin, response) -> None:
        """Never called for the null session; nothing to save."""
