"""What only the PostgreSQL backend has: transactions, row locks, the claim index, LISTEN/NOTIFY,
the schema check, a pool per process, and what happens when the server is not there."""
from __future__ import annotations

import os
import secrets
import threading
from datetime import timedelta

import pytest
from psycopg.types.json import Jsonb

from morag_remote import create_app
from morag_remote.exceptions import StoreUnavailable
from morag_remote.store.postgres.db import Database, database, parse_url
from morag_remote.store.postgres.jobs import PostgresJobStore
from test_store_contract import NOW, claim_as, job

pytestmark = pytest.mark.postgres


@pytest.fixture
def store(pg_url) -> PostgresJobStore:
    return PostgresJobStore(database(pg_url))


@pytest.fixture
def other_host(pg_url):
    """A store with its own pool, as on another API host."""
    db = Database(pg_url)
    yield PostgresJobStore(db)
    db.close()


def test_claim_rolls_back_the_whole_batch_when_a_mutator_raises(store):
    a, b = store.create(job()), store.create(job())
    calls = []

    def fail_second(current):
        calls.append(current.id)
        if len(calls) == 2:
            raise RuntimeError("refused")
        return claim_as("w1")(current)

    with pytest.raises(RuntimeError):
        store.claim(["audio"], 2, NOW, fail_second)
    assert store.get(a.id).status == store.get(b.id).status == "pending"


def test_a_claim_does_not_wait_for_another_claim_in_progress(store):
    first, second = store.create(job()), store.create(job())
    inside, release = threading.Event(), threading.Event()
    held = []

    def slow(current):
        inside.set()
        assert release.wait(30)
        return claim_as("slow")(current)

    thread = threading.Thread(target=lambda: held.extend(store.claim(["audio"], 1, NOW, slow)))
    thread.start()
    try:
        assert inside.wait(10)
        quick = store.claim(["audio"], 2, NOW, claim_as("quick"))  # returns while the first is held
    finally:
        release.set()
        thread.join(30)
    assert [j.id for j in held] == [first.id]
    assert [j.id for j in quick] == [second.id]


def test_claim_walks_the_claim_index(store):
    for i in range(200):
        store.create(job("video" if i % 2 else "audio"))
    with store.db.transaction() as conn:
        conn.execute("ANALYZE remote_jobs")
        conn.execute("SET LOCAL enable_seqscan = off")  # tiny table: judge the plan, not the size
        from morag_remote.store.postgres.jobs import _CLAIM

        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN " + _CLAIM, {"types": ["audio", "video"], "room": [1, 1], "now": NOW, "limit": 1,
                                  "capable": True, "labels": ["cuda12"],
                                  "resources": Jsonb({"gpu_memory_gb": 24})}).fetchall())
    assert "Index Scan using remote_jobs_claim" in plan  # per type and requirement set, in claim order
    assert "LockRows" in plan


def _wakes_on_a_create_elsewhere(store, other_host) -> list[bool]:
    """What a long-poll wait on ``store`` returned when ``other_host`` created a job meanwhile."""
    ready, woke = threading.Event(), []

    def waiter() -> None:
        store.availability(["audio"], NOW)
        ready.set()
        woke.append(store.wait_for_change(60))

    thread = threading.Thread(target=waiter)
    thread.start()
    assert ready.wait(10)
    other_host.create(job())
    thread.join(65)
    return woke


def test_a_job_created_on_another_host_wakes_a_waiter_here(other_host, store):
    assert store.db.ensure_listening(10)
    # the other host's local wake-up cannot reach this Database: only NOTIFY can
    assert _wakes_on_a_create_elsewhere(store, other_host) == [True]


def test_a_claim_sends_no_wake_up(other_host, store):
    store.create(job())
    assert store.db.ensure_listening(10)
    assert any(store.wait_for_change(0.05) is False for _ in range(20))
    other_host.claim(["audio"], 1, NOW, claim_as("w1"))
    assert store.wait_for_change(0.3) is False


def test_a_database_without_the_schema_answers_unavailable_naming_db_upgrade(pg_database):
    db = Database(pg_database.base_url.split("?")[0] + "?schema=mr_not_migrated")
    try:
        with pytest.raises(StoreUnavailable, match="db upgrade"):
            PostgresJobStore(db).get("x")
    finally:
        db.close()


def test_an_unreachable_server_is_store_unavailable_and_health_503(tmp_path):
    url = "postgresql://postgres@127.0.0.1:1/test"
    db = Database(url, connect_timeout=1)
    try:
        with pytest.raises(StoreUnavailable):
            PostgresJobStore(db).get("x")
    finally:
        db.close()
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path), "LOG_JSON": True,
                      "DATABASE_URL": url, "DATABASE_TIMEOUT": 1})
    response = app.test_client().get("/health")
    assert response.status_code == 503
    assert response.json["status"] == 503 and response.mimetype == "application/problem+json"


def test_a_forked_child_uses_its_own_pool_and_leaves_the_parents_alone(store):
    j = store.create(job())
    store.get(j.id)  # the parent's pool is open
    pid = os.fork()
    if pid == 0:
        try:
            ok = store.get(j.id).id == j.id
            store.update(j.id, claim_as("child"))
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get(j.id).worker_id == "child"  # the parent's connections still work
    for _ in range(3):
        store.update(j.id, lambda cur: cur)


def test_lapsed_leases_are_found_through_the_index_of_leases(store):
    a = store.create(job())
    store.update(a.id, claim_as("w1", lease=5))
    assert store.lapsed(NOW + timedelta(seconds=5), 5) == [a.id]


def test_schema_parameter_becomes_the_search_path():
    conninfo, schema = parse_url("postgresql://u@h:5432/db?schema=jobs_a&sslmode=disable")
    assert schema == "jobs_a"
    assert "options=-csearch_path%3Djobs_a" in conninfo and "sslmode=disable" in conninfo
    assert parse_url("postgres://u@h/db") == ("postgres://u@h/db", None)


@pytest.mark.parametrize("url", ["mysql://u@h/db", "postgresql://u@h/db?schema=a;drop"])
def test_bad_database_urls_are_refused(url):
    with pytest.raises(ValueError):
        parse_url(url)


def test_a_read_only_database_is_unavailable_for_health_and_writes(pg_url):
    db = Database(pg_url + "&options=-cdefault_transaction_read_only%3Don")
    try:
        read_only = PostgresJobStore(db)
        with pytest.raises(StoreUnavailable, match="read-only"):
            read_only.check_writable()
        with pytest.raises(StoreUnavailable, match="read-only"):
            read_only.create(job())
    finally:
        db.close()


def _backend_pid(db: Database) -> int:
    with db.transaction() as conn:
        return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def _terminate(pg_database, pid: int) -> None:
    with pg_database.connect() as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_connection_the_server_dropped_costs_one_unavailable_then_the_pool_recovers(pg_url, pg_database):
    db = Database(pg_url, pool_size=1)
    try:
        store = PostgresJobStore(db)
        j = store.create(job())
        _terminate(pg_database, _backend_pid(db))
        with pytest.raises(StoreUnavailable):
            store.get(j.id)
        assert store.get(j.id).id == j.id
    finally:
        db.close()


def _listener_pids(pg_database, name: str) -> list[int]:
    with pg_database.connect() as conn:
        return [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                                           "AND query LIKE 'LISTEN%%'", (name,)).fetchall()]


def test_the_listener_comes_back_after_losing_its_connection(pg_url, pg_database, other_host):
    name = f"mr-listener-test-{os.getpid()}-{secrets.token_hex(3)}"  # unique: other runs share the server
    db = Database(f"{pg_url}&application_name={name}")
    try:
        store = PostgresJobStore(db)
        assert db.ensure_listening(10)
        (old,) = _listener_pids(pg_database, name)
        _terminate(pg_database, old)
        for _ in range(200):  # bounded: the listener reconnects after 0.1 s
            new = _listener_pids(pg_database, name)
            if new and new != [old]:
                break
            db.wait(0.05)
        assert new and new != [old]
        assert _wakes_on_a_create_elsewhere(store, other_host) == [True]
    finally:
        db.close()


def test_a_job_without_created_at_is_refused(store):
    j = job()
    j.created_at = None
    with pytest.raises(ValueError):
        store.create(j)


def test_a_claim_for_no_content_type_claims_nothing(store):
    store.create(job())
    assert store.claim([], 5, NOW, claim_as("w1")) == []


def test_upgrade_without_a_schema_uses_the_connections_search_path(pg_database):
    import psycopg
    from psycopg import sql

    from morag_remote.store.postgres import migrate

    schema = f"{pg_database.schema}_plain"
    with psycopg.connect(pg_database.base_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
            applied = migrate.upgrade(conn)
            assert [m.version for m in applied] == [m.version for m in migrate.available()]
            assert migrate.current_version(conn) == migrate.latest_version()
        finally:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))
