"""Open the storage backend the configuration names: PostgreSQL when ``DATABASE_URL`` is set, else
the JSON files in the instance folder. The only module that names both backends; the app, the
service, the CLI and the domain modules see a :class:`~.base.Backend` and never ask which it is."""
from __future__ import annotations

from typing import Any, Mapping

from .base import Backend


def open_backend(config: Mapping[str, Any], instance_path: str) -> Backend:
    if config.get("DATABASE_URL"):
        from . import postgres  # imported only when used: a file-store host needs no psycopg

        return postgres.open_backend(config, instance_path)
    from . import files

    return files.open_backend(config, instance_path)
