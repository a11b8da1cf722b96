"""morag-remote: the remote job queue that hands MoRAG's heavy conversions to GPU workers.

``create_app`` (in :mod:`morag_remote.app`) is the only place that builds an app; ``from morag_remote
import create_app`` and ``flask --app morag_remote`` reach it through a lazy module attribute, so that
importing the package itself imports nothing else: a worker machine runs :mod:`morag_remote.client`
and :mod:`morag_remote.worker` without Flask, marshmallow or psycopg being loaded.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"  # setup.cfg reads it (attr:), the OpenAPI document shows it

_FROM_APP = ("create_app", "InstanceUnusable")
__all__ = ["__version__", *_FROM_APP]


def __getattr__(name: str) -> Any:
    if name in _FROM_APP:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
