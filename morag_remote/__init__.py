"""morag-remote: the remote job queue that hands MoRAG's heavy conversions to GPU workers.

``create_app`` (in :mod:`.factory`) builds the server. It is imported on first use, so that the client
library and the worker (``morag_remote.client``, ``morag_remote.worker``), which need no Flask,
can be imported on a worker machine without the server's dependencies.
"""
from __future__ import annotations

from typing import Any

from .version import __version__


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .factory import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", "create_app"]
