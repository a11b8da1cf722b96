"""Choose the job repository from the configuration: the JSON files unless a database URL is set; the
API keys, the Idempotency-Key records and the completion-events outbox live in the same place as the
jobs."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping

from .base import JobRepository
from .files import FileJobStore

if TYPE_CHECKING:
    from ..events.outbox import EventOutbox
    from ..idempotency import IdempotencyRecords


def build_store(config: Mapping[str, Any]) -> JobRepository:
    url = config.get("DATABASE_URL")
    if url:
        from .pgdb import database
        from .postgres import PostgresJobStore

        return PostgresJobStore(database(url, int(config.get("DATABASE_POOL_SIZE") or 10),
                                         float(config.get("DATABASE_TIMEOUT") or 5.0)))
    return FileJobStore(config["JOBS_DATA_DIR"])


def build_key_store(store: JobRepository, instance_path: str):
    """API keys live beside the jobs: in the database when the jobs do, else in the instance folder."""
    from .postgres import PostgresJobStore

    if isinstance(store, PostgresJobStore):
        from .pg_keys import PostgresKeyStore

        return PostgresKeyStore(store.db)
    from ..auth import KeyStore

    return KeyStore(os.path.join(instance_path, "api_keys.json"))


def build_idempotency_records(store: JobRepository, data_dir: str) -> "IdempotencyRecords":
    """Idempotency-Key records beside the jobs: in the database when the jobs are, else under the data dir."""
    from .postgres import PostgresJobStore

    if isinstance(store, PostgresJobStore):
        from .pg_idempotency import PostgresIdempotencyRecords

        return PostgresIdempotencyRecords(store.db)
    from ..idempotency import FileIdempotencyRecords

    return FileIdempotencyRecords(os.path.join(data_dir, "idempotency"))


def build_outbox(store: JobRepository, data_dir: str) -> "EventOutbox":
    """The completion-events outbox beside the jobs: in the database when the jobs are (every host
    sees every event), else under the data dir. ``EventDelivery`` does not know which it talks to."""
    from .postgres import PostgresJobStore

    if isinstance(store, PostgresJobStore):
        from .pg_outbox import PostgresOutbox

        return PostgresOutbox(store.db)
    from ..events.outbox import FileOutbox

    return FileOutbox(os.path.join(data_dir, "events"))
