"""Accessors for the objects the factory attaches to the app (``app.extensions``)."""
from __future__ import annotations

from flask import current_app

from .service import JobService
from .tokens import DownloadTokens

SERVICE = "morag_remote.service"
TOKENS = "morag_remote.tokens"
KEYS = "morag_remote.keys"


def service() -> JobService:
    return current_app.extensions[SERVICE]


def tokens() -> DownloadTokens:
    return current_app.extensions[TOKENS]
