"""``flask db upgrade`` / ``db current``, and the operator commands on either backend."""
from __future__ import annotations

import json
import secrets
import threading
from datetime import timedelta

import psycopg
import pytest
from psycopg import sql

from morag_remote import create_app
from morag_remote.store.postgres import migrate
from morag_remote.store.postgres.db import parse_url, url_from_env


@pytest.fixture
def fresh_schema_url(pg_database):
    """A URL naming a schema that does not exist yet (dropped afterwards)."""
    schema = f"mrtest_fresh_{secrets.token_hex(4)}"
    yield f"{pg_database.base_url}{'&' if '?' in pg_database.base_url else '?'}schema={schema}"
    with psycopg.connect(pg_database.base_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def _runner(tmp_path, url=None, **extra):
    config = {"TESTING": True, "INSTANCE_PATH": str(tmp_path / "instance"), "LOG_JSON": True, **extra}
    if url:
        config["DATABASE_URL"] = url
    return create_app(config).test_cli_runner()


@pytest.mark.postgres
def test_db_upgrade_creates_the_schema_then_has_nothing_left_to_do(tmp_path, fresh_schema_url):
    runner = _runner(tmp_path, fresh_schema_url)
    latest = migrate.latest_version()
    assert runner.invoke(args=["db", "current"]).output.strip().startswith(f"0 (latest {latest}")
    first = runner.invoke(args=["db", "upgrade"])
    assert first.exit_code == 0, first.output
    assert "applied 0001_jobs" in first.output and f"schema version {latest}" in first.output
    second = runner.invoke(args=["db", "upgrade"])
    assert second.exit_code == 0 and "up to date" in second.output
    assert runner.invoke(args=["db", "current"]).output.strip() == str(latest)


@pytest.mark.postgres
def test_concurrent_upgraders_apply_each_migration_once(fresh_schema_url):
    conninfo, schema = parse_url(fresh_schema_url)
    applied, errors = [], []
    start = threading.Barrier(3)

    def upgrader() -> None:
        try:
            with psycopg.connect(conninfo, autocommit=True) as conn:
                start.wait(10)
                applied.extend(m.version for m in migrate.upgrade(conn, schema))
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=upgrader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(applied) == [m.version for m in migrate.available()]
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [m.version for m in migrate.available()]


@pytest.mark.postgres
def test_a_migration_merged_after_a_newer_one_was_applied_is_still_applied(fresh_schema_url):
    """A database upgraded before an older-numbered migration existed (two branches merged out of
    order) gets that migration at its next upgrade instead of skipping it for being below the newest."""
    conninfo, schema = parse_url(fresh_schema_url)
    older = next(m for m in migrate.available() if m.name == "idempotency")  # one table of its own
    with psycopg.connect(conninfo, autocommit=True) as conn:
        migrate.upgrade(conn, schema)
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
        with conn.transaction():  # as if 0003 had not been written when this database was upgraded
            conn.execute("DROP TABLE idempotency_keys")
            conn.execute("DELETE FROM schema_version WHERE version = %s", (older.version,))
        assert migrate.current_version(conn) == migrate.latest_version() > older.version
        assert [m.version for m in migrate.upgrade(conn, schema)] == [older.version]
        assert conn.execute("SELECT to_regclass('idempotency_keys') IS NOT NULL").fetchone()[0]


def test_db_commands_without_a_database_url_say_so(tmp_path):
    out = _runner(tmp_path).invoke(args=["db", "upgrade"])
    assert out.exit_code == 1
    assert "MORAG_REMOTE_DATABASE_URL is not set" in out.output


def test_db_upgrade_against_an_unreachable_server_is_one_line(tmp_path):
    out = _runner(tmp_path, "postgresql://postgres@127.0.0.1:1/test", DATABASE_TIMEOUT=1).invoke(args=["db", "upgrade"])
    assert out.exit_code == 1
    assert out.output.startswith("Error: cannot connect to the database") and "Traceback" not in out.output


def test_deliver_against_an_unreachable_server_is_one_line(tmp_path):
    out = _runner(tmp_path, "postgresql://postgres@127.0.0.1:1/test", DATABASE_TIMEOUT=1,
                  CALLBACK_URL="http://127.0.0.1:1/events").invoke(args=["remote-jobs", "deliver"])
    assert out.exit_code == 1
    assert out.output.startswith("Error: the job database") and "Traceback" not in out.output


@pytest.mark.postgres
@pytest.mark.parametrize("args", [["remote-jobs", "list"], ["remote-jobs", "stats"], ["remote-jobs", "cleanup-expired"],
                                  ["remote-jobs", "cleanup-old", "--days", "1"], ["keys", "list"]])
def test_commands_on_a_database_not_upgraded_are_one_line_naming_db_upgrade(tmp_path, fresh_schema_url, args):
    out = _runner(tmp_path, fresh_schema_url, DATABASE_TIMEOUT=1).invoke(args=args)
    assert out.exit_code == 1, out.output
    assert out.output.startswith("Error: ") and "db upgrade" in out.output
    assert len(out.output.strip().splitlines()) == 1, out.output


@pytest.mark.parametrize("args", [["remote-jobs", "list", "--worker-id", "\udcff"],
                                  ["remote-jobs", "list", "--ingestion-task-id", "\udcff"],
                                  ["remote-jobs", "list", "--after", "\udcff"],
                                  ["keys", "revoke", "\udcff"],
                                  ["keys", "create", "--role", "worker", "--name", "w", "--worker-id", "\udcff"]])
def test_an_argument_that_is_not_utf8_is_one_line_on_either_backend(app, backend, args):
    """A shell passes bytes that are not UTF-8 as surrogate escapes: the files answer or refuse,
    PostgreSQL (UTF-8 text only) refuses with one line; never a traceback."""
    out = app.test_cli_runner().invoke(args=args)
    assert out.exit_code in (0, 1, 3), out.output
    assert out.exception is None or isinstance(out.exception, SystemExit), out.exception
    if backend == "postgres":
        assert out.exit_code == 1 and out.output.startswith("Error: ") and "UTF-8" in out.output


def test_migrations_are_numbered_without_gaps():
    versions = [m.version for m in migrate.available()]
    assert versions == list(range(1, len(versions) + 1))


# -- operator commands: ``app`` runs on both backends ---------------------------------------------

def _create(service, instance_path, **kw):
    source = instance_path / "sources" / "a.mp3"
    source.write_bytes(b"a")
    return service.create(source_file_path=str(source), content_type=kw.pop("content_type", "audio"),
                          ingestion_task_id="t", **kw)


def test_cli_stats_and_list_read_the_configured_backend(app, service, instance_path):
    job = _create(service, instance_path)
    runner = app.test_cli_runner()
    stats = json.loads(runner.invoke(args=["remote-jobs", "stats", "--json"]).output)
    assert stats["counts"]["pending"] == {"audio": 1}
    assert runner.invoke(args=["remote-jobs", "list"]).output.startswith(job.id)


def test_cli_cleanup_expired_requeues_a_lapsed_lease(app, service, clock, instance_path):
    job = _create(service, instance_path)
    service.poll("w1", ["audio"])
    clock.advance(service.settings.lease_for("audio") + 1)
    out = app.test_cli_runner().invoke(args=["remote-jobs", "cleanup-expired", "--json"])
    assert json.loads(out.output) == {"expired": 1}
    assert service.get(job.id).status == "pending" and service.get(job.id).retry_count == 1


def test_cli_cleanup_old_deletes_finished_jobs(app, service, clock, instance_path):
    job = _create(service, instance_path)
    service.cancel(job.id)
    clock.advance(timedelta(days=3).total_seconds())
    out = app.test_cli_runner().invoke(args=["remote-jobs", "cleanup-old", "--days", "2", "--json"])
    assert json.loads(out.output) == {"deleted": 1}


def test_fsck_on_a_clean_store_says_so_on_either_backend(app):
    out = app.test_cli_runner().invoke(args=["remote-jobs", "fsck"])
    assert out.exit_code == 0 and "store is clean" in out.output


def test_url_from_env_says_why_without_the_url(monkeypatch):
    monkeypatch.delenv("MR_PROBE_URL", raising=False)
    assert url_from_env("MR_PROBE_URL") == (None, "MR_PROBE_URL is not set")
    monkeypatch.setenv("MR_PROBE_URL", "postgresql://probe:s3cret@127.0.0.1:1/none")
    url, why = url_from_env("MR_PROBE_URL", connect_timeout=2)
    assert url is None and why.startswith("no PostgreSQL at MR_PROBE_URL") and "s3cret" not in why
