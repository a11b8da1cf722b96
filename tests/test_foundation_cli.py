"""The flask CLI as the foundation ships it: the keys group the README walks through, and the
remote-jobs commands on the same service the API uses. (The operations issue covers every
command in depth.)"""
from __future__ import annotations

import json
import os
import stat

import pytest

from support.actions import auth
from morag_remote.context import KEYS


@pytest.fixture
def cli(app):
    return app.test_cli_runner()


def test_keys_create_prints_the_key_alone_on_the_last_line_and_it_works(cli, client):
    result = cli.invoke(args=["keys", "create", "--role", "producer", "--name", "ingest"])
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip().splitlines()[-1]
    assert secret.startswith("mrk_") and len(secret) > 40
    assert client.get("/api/v1/remote-jobs/", headers=auth(secret)).status_code == 200


def test_keys_create_bound_to_a_worker_id(cli, app):
    result = cli.invoke(args=["keys", "create", "--role", "worker", "--name", "gpu-1", "--worker-id", "gpu-1"])
    assert result.exit_code == 0
    assert [k.worker_id for k in app.extensions[KEYS].list()] == ["gpu-1"]


@pytest.mark.parametrize("args", [
    ["--role", "producer", "--name", "bad name!"],
    ["--role", "producer", "--name", "p", "--worker-id", "w"],
    ["--role", "root", "--name", "x"],
])
def test_keys_create_refuses_bad_input_in_one_line(cli, args):
    result = cli.invoke(args=["keys", "create", *args])
    assert result.exit_code != 0
    assert "Traceback" not in result.output


def test_keys_create_refuses_a_duplicate_name(cli):
    cli.invoke(args=["keys", "create", "--role", "admin", "--name", "ops"])
    result = cli.invoke(args=["keys", "create", "--role", "admin", "--name", "ops"])
    assert result.exit_code == 1 and "exists" in result.output


def test_keys_list_never_shows_a_key_and_revoke_removes_it(cli, client):
    secret = cli.invoke(args=["keys", "create", "--role", "producer", "--name", "p"]).stdout.strip().splitlines()[-1]
    listed = cli.invoke(args=["keys", "list", "--json"])
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["role"]) for r in rows] == [("p", "producer")]
    assert secret not in listed.output and "key_hash" not in rows[0]
    assert "p " in cli.invoke(args=["keys", "list"]).output
    assert cli.invoke(args=["keys", "revoke", "p"]).exit_code == 0
    assert client.get("/api/v1/remote-jobs/", headers=auth(secret)).status_code == 401
    assert cli.invoke(args=["keys", "revoke", "p"]).exit_code == 1
    assert cli.invoke(args=["keys", "list"]).output.strip() == "no keys"


def test_bootstrap_admin_writes_a_working_key_readable_by_the_owner_only(cli, app, client):
    result = cli.invoke(args=["keys", "bootstrap-admin"])
    assert result.exit_code == 0
    path = os.path.join(app.instance_path, "admin-key.txt")
    assert path in result.output
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    secret = open(path).read().strip()
    assert secret not in result.output
    assert client.get("/api/v1/remote-jobs/stats", headers=auth(secret)).status_code == 200


def test_bootstrap_admin_does_nothing_once_a_key_exists(cli, app, keys):
    result = cli.invoke(args=["keys", "bootstrap-admin"])
    assert result.exit_code == 0 and result.output == ""
    assert not os.path.exists(os.path.join(app.instance_path, "admin-key.txt"))


def test_remote_jobs_cleanup_expired_handles_lapsed_leases(cli, producer, worker, clock):
    producer.create_id("audio")
    worker.claim("audio")
    clock.advance(3600)
    assert json.loads(cli.invoke(args=["remote-jobs", "cleanup-expired", "--json"]).output) == {"expired": 1}
    assert cli.invoke(args=["remote-jobs", "cleanup-expired"]).output.strip() == "0 job(s) handled"


def test_remote_jobs_cleanup_old_deletes_finished_jobs_older_than_days(cli, producer, clock):
    old = producer.create_id()
    producer.cancel(old)
    clock.advance(3 * 86400)
    young = producer.create_id()
    producer.cancel(young)
    assert json.loads(cli.invoke(args=["remote-jobs", "cleanup-old", "--days", "2", "--json"]).output) == \
        {"deleted": 1}
    assert producer.get(old).status_code == 404 and producer.get(young).status_code == 200
    assert cli.invoke(args=["remote-jobs", "cleanup-old", "--days", "2"]).output.strip() == "0 job(s) deleted"


@pytest.mark.files_only
def test_remote_jobs_fsck_exit_codes(cli, producer, app):
    producer.create_id()
    clean = cli.invoke(args=["remote-jobs", "fsck"])
    assert clean.exit_code == 0 and "clean" in clean.output
    data_dir = app.config["JOBS_DATA_DIR"]
    with open(os.path.join(data_dir, "pending", ".tmp-left.json.1.1"), "w") as fh:
        fh.write("x")
    found = cli.invoke(args=["remote-jobs", "fsck", "--json"])
    assert found.exit_code == 1 and json.loads(found.output)[0]["kind"] == "temp"
    repaired = cli.invoke(args=["remote-jobs", "fsck", "--repair"])
    assert repaired.exit_code == 0 and "[repaired]" in repaired.output
    assert cli.invoke(args=["remote-jobs", "fsck"]).exit_code == 0
