"""API keys: the ``keys`` CLI (create, list, revoke, bootstrap-admin as ``make run`` calls it), what
is stored, last-used write-back, revocation seen by every process, a broken key file failing closed,
the secure default (no key yet: 401 and one start-up line saying how to create one), and the key
store's rules, the same in ``<instance>/api_keys.json`` and in PostgreSQL (where a key made or
revoked through one host is known to every other at once). Who may call what: test_auth_roles.py."""
from __future__ import annotations

import json
import os
import stat

import pytest

from support.actions import auth
from support.cli import assert_one_line_error
from morag_remote import create_app
from morag_remote.auth import LAST_USED_RESOLUTION, KeyRequestInvalid, hash_key
from morag_remote.context import KEYS

STATS = "/api/v1/remote-jobs/stats"
JOBS = "/api/v1/remote-jobs/"


@pytest.fixture
def cli(app):
    return app.test_cli_runner()


def create_key(cli, *args: str) -> str:
    result = cli.invoke(args=["keys", "create", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()[-1]


def log_lines(buffer) -> list[dict]:
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]


# -- keys create / list / revoke -------------------------------------------------------------------------

def test_keys_create_prints_the_key_alone_on_the_last_line_and_it_works(cli, client):
    key = create_key(cli, "--role", "producer", "--name", "ingest")
    assert key.startswith("mrk_")
    assert len(key) > 40
    assert " " not in key
    assert client.get(STATS, headers=auth(key)).status_code == 200
    assert client.get(JOBS, headers=auth(key)).status_code == 200


def test_keys_create_bound_to_a_worker_id(cli, app):
    result = cli.invoke(args=["keys", "create", "--role", "worker", "--name", "gpu-1", "--worker-id", "gpu-1"])
    assert result.exit_code == 0
    secret = result.stdout.strip().splitlines()[-1]
    assert [k.worker_id for k in app.extensions[KEYS].list()] == ["gpu-1"]
    assert app.extensions[KEYS].authenticate(secret).worker_id == "gpu-1"


@pytest.mark.files_only
def test_only_a_hash_of_the_key_is_stored_in_a_private_file(cli, instance_path):
    key = create_key(cli, "--role", "worker", "--name", "gpu-1")
    path = instance_path / "api_keys.json"
    text = path.read_text()
    assert key not in text
    assert key[4:] not in text
    assert hash_key(key) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_two_keys_are_never_the_same(cli):
    assert create_key(cli, "--role", "worker", "--name", "a") != create_key(cli, "--role", "worker", "--name", "b")


@pytest.mark.parametrize("args, message", [
    (["--role", "worker", "--name", "bad name"], "name must be"),
    (["--role", "producer", "--name", "bad name!"], "name must be"),
    (["--role", "worker", "--name", "x" * 65], "name must be"),
    (["--role", "worker", "--name", "caf\u00e9"], "name must be"),
    (["--role", "producer", "--name", "p", "--worker-id", "w1"], "only worker keys"),
    (["--role", "worker", "--name", "w", "--worker-id", "w" * 129], "worker id has"),
])
def test_keys_create_refuses_bad_input_in_one_line(cli, args, message):
    result = cli.invoke(args=["keys", "create", *args])
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_keys_create_refuses_an_existing_name(cli):
    create_key(cli, "--role", "worker", "--name", "gpu-1")
    result = cli.invoke(args=["keys", "create", "--role", "admin", "--name", "gpu-1"])
    assert result.exit_code == 1
    assert "exists" in result.output
    assert_one_line_error(result, 1, "gpu-1")


def test_keys_create_refuses_an_unknown_role(cli):
    result = cli.invoke(args=["keys", "create", "--role", "root", "--name", "x"])
    assert result.exit_code == 2
    assert "root" in result.output
    assert_one_line_error(result, 2, "--role")


def test_keys_list_shows_names_roles_created_last_used_and_never_the_key(cli, client):
    worker_key = create_key(cli, "--role", "worker", "--name", "gpu-1", "--worker-id", "gpu-1")
    producer_key = create_key(cli, "--role", "producer", "--name", "ingest")
    assert client.get(STATS, headers=auth(worker_key)).status_code == 200
    listed = cli.invoke(args=["keys", "list", "--json"])
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert set(rows) == {"gpu-1", "ingest"}
    assert all("key_hash" not in row for row in rows.values())
    assert rows["gpu-1"]["role"] == "worker"
    assert rows["gpu-1"]["worker_id"] == "gpu-1"
    assert rows["gpu-1"]["created_at"].endswith("Z")
    assert rows["gpu-1"]["last_used_at"].endswith("Z")
    assert rows["ingest"]["last_used_at"] is None
    human = cli.invoke(args=["keys", "list"]).output
    assert "gpu-1" in human
    assert "last_used=never" in human
    for output in (listed.output, human):
        for key in (worker_key, producer_key):
            assert key not in output
            assert hash_key(key) not in output


@pytest.mark.files_only
def test_last_used_is_written_back_at_most_once_a_minute_per_key(app, client, cli, instance_path):
    store = app.extensions[KEYS]
    now = [1000.0]
    store.clock = lambda: now[0]
    key = create_key(cli, "--role", "worker", "--name", "gpu-1")
    path = instance_path / "api_keys.json"

    assert client.get(STATS, headers=auth(key)).status_code == 200
    first = os.stat(path).st_ino
    assert store.list()[0].last_used_at is not None
    now[0] += LAST_USED_RESOLUTION - 1
    assert client.get(STATS, headers=auth(key)).status_code == 200
    assert os.stat(path).st_ino == first  # no write within the minute
    now[0] += 2
    assert client.get(STATS, headers=auth(key)).status_code == 200
    assert os.stat(path).st_ino != first  # written again


def test_revoked_key_is_401_at_once_even_after_use(cli, client):
    key = create_key(cli, "--role", "admin", "--name", "ops")
    assert client.get(STATS, headers=auth(key)).status_code == 200
    result = cli.invoke(args=["keys", "revoke", "ops"])
    assert result.exit_code == 0
    assert "revoked ops" in result.output
    response = client.get(STATS, headers=auth(key))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get(JOBS, headers=auth(key)).status_code == 401
    assert_one_line_error(cli.invoke(args=["keys", "revoke", "ops"]), 1, "ops")  # revoked once only
    assert cli.invoke(args=["keys", "list"]).output.strip() == "no keys"


def test_a_key_made_by_another_process_is_accepted_without_a_restart(client, instance_path, backend_config):
    """The CLI runs in another process in production: a second app on the instance stands in for it."""
    other = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True, **backend_config})
    secret = other.extensions[KEYS].create("late", "producer")[1]
    assert client.get(JOBS, headers=auth(secret)).status_code == 200


@pytest.mark.files_only
def test_key_revoked_by_another_process_is_401_here(cli, client, instance_path):
    """The CLI runs in another process in production: a second app on the instance stands in for it."""
    key = create_key(cli, "--role", "admin", "--name", "ops")
    assert client.get(STATS, headers=auth(key)).status_code == 200
    other = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True})
    other.extensions[KEYS].revoke("ops")
    assert client.get(STATS, headers=auth(key)).status_code == 401


def test_last_used_that_cannot_be_written_does_not_fail_the_request(tmp_path, log_output):
    """A broken instance folder (here: the key file's lock is a directory) costs the write, not the call."""
    instance = tmp_path / "inst"
    key = create_app({"TESTING": True, "INSTANCE_PATH": str(instance), "LOG_JSON": True}).extensions[KEYS].create(
        "gpu-1", "worker")[1]
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance), "LOG_JSON": True})
    lock = instance / "api_keys.json.lock"
    lock.unlink()
    lock.mkdir()
    assert app.test_client().get(STATS, headers=auth(key)).status_code == 200
    assert "key.last_used_unsaved" in log_output.getvalue()
    assert key not in log_output.getvalue()


def test_keys_revoke_unknown_name_fails_in_one_line(cli):
    result = cli.invoke(args=["keys", "revoke", "nobody"])
    assert result.exit_code == 1
    assert "no key named 'nobody'" in result.output
    assert "Traceback" not in result.output


@pytest.mark.files_only
def test_unreadable_key_file_fails_closed(cli, client, keys, instance_path):
    (instance_path / "api_keys.json").write_text("{not json")
    response = client.get(STATS, headers=auth(keys["admin"]))
    assert response.status_code == 503
    assert response.mimetype == "application/problem+json"
    assert "api_keys.json" in response.json["detail"]
    listed = cli.invoke(args=["keys", "list"])
    assert listed.exit_code == 1
    assert "api_keys.json" in listed.output


def test_unreadable_key_file_is_logged_at_start(tmp_path, log_output):
    instance = tmp_path / "inst"
    instance.mkdir()
    (instance / "api_keys.json").write_text('{"keys": [{"name": "x"}]}')
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance), "LOG_JSON": True})
    assert "auth.keys_unreadable" in log_output.getvalue()
    assert app.test_client().get(STATS, headers=auth("mrk_any")).status_code == 503


# -- secure by default --------------------------------------------------------------------------------------

def test_with_no_key_the_api_answers_401_saying_how_to_create_one(client):
    response = client.get(STATS)
    assert response.status_code == 401
    response = client.get(STATS, headers=auth("mrk_guess"))
    assert response.status_code == 401
    assert "keys create" in response.json["detail"]


def test_start_up_log_says_in_one_line_how_to_create_a_key(tmp_path, log_output):
    create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / "fresh"), "LOG_JSON": True})
    lines = [line for line in log_output.getvalue().splitlines() if "auth.no_keys" in line]
    assert len(lines) == 1
    assert "flask --app morag_remote keys create --role admin" in json.loads(lines[0])["detail"]


def test_start_up_log_is_quiet_about_keys_once_one_exists(instance_path, log_output):
    create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True}).extensions[KEYS].create(
        "ops", "admin")
    create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True})
    assert [e["event"] for e in log_lines(log_output)].count("auth.no_keys") == 1


def test_bootstrap_admin_writes_a_private_key_file_and_says_where_in_one_line(log_output, app, cli, client,
                                                                              instance_path):
    result = cli.invoke(args=["keys", "bootstrap-admin"])
    assert result.exit_code == 0
    path = instance_path / "admin-key.txt"
    assert result.output.strip().splitlines() == [f"created an admin API key; it is in {path} (readable by you only)"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = path.read_text().strip()
    assert key not in result.output
    assert key not in log_output.getvalue()
    assert client.delete("/api/v1/remote-jobs/nope", headers=auth(key)).status_code == 404  # admin-only route
    assert client.get(STATS, headers=auth(key)).status_code == 200
    again = cli.invoke(args=["keys", "bootstrap-admin"])  # once a key exists: nothing more
    assert again.exit_code == 0
    assert path.read_text().strip() == key


def test_bootstrap_admin_replaces_a_stale_world_readable_file_with_a_private_one(app, cli, instance_path):
    path = instance_path / "admin-key.txt"
    path.write_text("old")
    path.chmod(0o644)
    assert cli.invoke(args=["keys", "bootstrap-admin"]).exit_code == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text().strip() != "old"


def test_bootstrap_admin_that_cannot_write_its_file_leaves_no_key_behind(app, cli, instance_path):
    (instance_path / "admin-key.txt").mkdir()
    result = cli.invoke(args=["keys", "bootstrap-admin"])
    assert result.exit_code == 1
    assert "could not write" in result.output
    assert "no key was created" in result.output
    assert app.extensions[KEYS].list() == []
    assert [p.name for p in instance_path.iterdir() if ".tmp-" in p.name] == []


def test_bootstrap_admin_does_nothing_once_a_key_exists(cli, keys, instance_path):
    result = cli.invoke(args=["keys", "bootstrap-admin"])
    assert result.exit_code == 0
    assert result.output == ""
    assert not (instance_path / "admin-key.txt").exists()


# -- the key store, on the JSON file and in PostgreSQL -------------------------------------------------

@pytest.fixture
def key_store(app):
    return app.extensions[KEYS]


def test_a_created_key_authenticates_and_only_its_hash_is_kept(key_store):
    key, secret = key_store.create("gpu-1", "worker", worker_id="gpu-1")
    found = key_store.authenticate(secret)
    assert (found.name, found.role, found.worker_id) == ("gpu-1", "worker", "gpu-1")
    assert key.key_hash == hash_key(secret)
    assert secret not in repr(key_store.list())


def test_an_unknown_key_does_not_authenticate(key_store):
    key_store.create("a", "admin")
    assert key_store.authenticate("mrk_not-a-key") is None


@pytest.mark.parametrize("name, role, worker_id, message", [
    ("bad name", "worker", None, "name must be"),
    ("x", "root", None, "role must be one of worker, producer, admin"),
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
