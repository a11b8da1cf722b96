"""API keys behave the same in ``<instance>/api_keys.json`` and in PostgreSQL; with PostgreSQL a key
made or revoked through one host is known to every other at once."""
from __future__ import annotations

import pytest

from morag_remote.auth import KeyRequestInvalid, hash_key
from morag_remote.context import KEYS


@pytest.fixture
def key_store(app):
    return app.extensions[KEYS]


def test_a_created_key_authenticates_and_only_its_hash_is_kept(key_store):
    key, secret = key_store.create("gpu-1", "worker", worker_id="gpu-1")
    found = key_store.authenticate(secret)
    assert (found.name, found.role, found.worker_id) == ("gpu-1", "worker", "gpu-1")
    assert key.key_hash == hash_key(secret) and secret not in repr(key_store.list())


def test_an_unknown_key_does_not_authenticate(key_store):
    key_store.create("a", "admin")
    assert key_store.authenticate("mrk_not-a-key") is None


@pytest.mark.parametrize("name, role, worker_id, message", [
    ("bad name", "worker", None, "name must be"),
    ("x", "root", None, "role must be"),
    ("x", "producer", "w1", "only worker keys"),
])
def test_invalid_key_requests_are_refused(key_store, name, role, worker_id, message):
    with pytest.raises(KeyRequestInvalid, match=message):
        key_store.create(name, role, worker_id)
    assert not key_store.has_keys()


def test_a_name_is_unique_until_revoked(key_store):
    _, old = key_store.create("ci", "producer")
    with pytest.raises(KeyRequestInvalid, match="exists"):
        key_store.create("ci", "producer")
    key_store.revoke("ci")
    assert key_store.authenticate(old) is None
    key_store.create("ci", "producer")
    with pytest.raises(KeyRequestInvalid, match="no key named"):
        key_store.revoke("nobody")


def test_list_is_sorted_by_name_and_records_last_use(key_store):
    _, secret = key_store.create("zeta", "worker")
    key_store.create("alpha", "admin")
    assert [k.name for k in key_store.list()] == ["alpha", "zeta"]
    assert key_store.list()[1].last_used_at is None
    key_store.authenticate(secret)
    assert key_store.list()[1].last_used_at is not None


@pytest.mark.postgres
def test_a_key_revoked_on_one_host_is_refused_by_another(pg_url, tmp_path):
    from morag_remote.store.postgres.keys import PostgresKeyStore
    from morag_remote.store.postgres.db import Database

    host_a, host_b = Database(pg_url), Database(pg_url)
    try:
        keys_a, keys_b = PostgresKeyStore(host_a), PostgresKeyStore(host_b)
        _, secret = keys_a.create("w", "worker")
        assert keys_b.authenticate(secret) is not None
        keys_a.revoke("w")
        assert keys_b.authenticate(secret) is None
    finally:
        host_a.close()
        host_b.close()


@pytest.mark.postgres
@pytest.mark.parametrize("name, worker_id, message", [
    ("caf\u00e9", None, "name must be"),
    ("w", "w" * 129, "worker id has"),
])
def test_the_database_key_store_keeps_the_file_stores_newer_rules(pg_url, name, worker_id, message):
    from morag_remote.store.postgres.keys import PostgresKeyStore
    from morag_remote.store.postgres.db import database

    with pytest.raises(KeyRequestInvalid, match=message):
        PostgresKeyStore(database(pg_url)).create(name, "worker", worker_id)
