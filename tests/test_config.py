"""Configuration: defaults < <instance>/config.py < MORAG_REMOTE_* environment (JSON parsed) <
test_config; MORAG_REMOTE_INSTANCE_PATH picks the instance folder for the app and the CLI alike."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from morag_remote import create_app
from morag_remote.config import DEFAULTS
from morag_remote.context import SERVICE

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path / "inst"


def _app(folder: Path, **overrides):
    return create_app({"INSTANCE_PATH": str(folder), "LOG_JSON": True, **overrides})


def _write_instance_config(folder: Path, text: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.py").write_text(text)


def test_defaults_apply_when_nothing_overrides_them(folder):
    app = _app(folder)
    for name in ("MAX_RETRIES", "RETRY_BACKOFF_SECONDS", "RETRY_BACKOFF_MAX_SECONDS", "LEASE_SECONDS",
                 "CONTENT_TYPES", "POLL_MAX_WAIT_SECONDS", "MAX_CONTENT_LENGTH", "AUTH_DISABLED",
                 "METRICS_PUBLIC", "CALLBACK_ALLOWED_PREFIXES"):
        assert app.config[name] == DEFAULTS[name], name
    assert app.config["MAX_CONTENT_LENGTH"] == 67108864
    assert app.config["JOBS_DATA_DIR"] == str(folder / "remote_jobs")
    assert app.config["SOURCE_ROOTS"] == [str(folder / "sources")]
    assert app.config["PENDING_TTL_SECONDS"] is None


def test_the_factory_creates_the_instance_folder_and_the_store_layout(folder):
    _app(folder)
    for status in ("pending", "processing", "completed", "failed", "timeout", "cancelled"):
        assert (folder / "remote_jobs" / status).is_dir()


def test_instance_config_file_overrides_defaults(folder):
    _write_instance_config(folder, "MAX_RETRIES = 5\nCONTENT_TYPES = ['audio']\n")
    app = _app(folder)
    assert app.config["MAX_RETRIES"] == 5
    assert app.extensions[SERVICE].settings.content_types == ("audio",)


def test_environment_overrides_the_instance_config_file(folder, monkeypatch):
    _write_instance_config(folder, "MAX_RETRIES = 5\n")
    monkeypatch.setenv("MORAG_REMOTE_MAX_RETRIES", "7")
    assert _app(folder).config["MAX_RETRIES"] == 7


def test_environment_values_are_parsed_as_json(folder, monkeypatch):
    monkeypatch.setenv("MORAG_REMOTE_LEASE_SECONDS", '{"audio": 60, "default": 120}')
    monkeypatch.setenv("MORAG_REMOTE_CONTENT_TYPES", '["audio", "scan"]')
    monkeypatch.setenv("MORAG_REMOTE_AUTH_DISABLED", "false")
    monkeypatch.setenv("MORAG_REMOTE_CALLBACK_URL", "http://127.0.0.1:9/hook")  # not JSON: kept as text
    app = _app(folder)
    settings = app.extensions[SERVICE].settings
    assert settings.lease_for("audio") == 60 and settings.lease_for("scan") == 120
    assert settings.content_types == ("audio", "scan")
    assert app.config["AUTH_DISABLED"] is False
    assert app.config["CALLBACK_URL"] == "http://127.0.0.1:9/hook"


def test_test_config_overrides_the_environment(folder, monkeypatch):
    _write_instance_config(folder, "MAX_RETRIES = 5\n")
    monkeypatch.setenv("MORAG_REMOTE_MAX_RETRIES", "7")
    assert _app(folder, MAX_RETRIES=9).config["MAX_RETRIES"] == 9


def test_instance_path_comes_from_the_environment(tmp_path, monkeypatch):
    target = tmp_path / "from-env"
    monkeypatch.setenv("MORAG_REMOTE_INSTANCE_PATH", str(target))
    app = create_app({"LOG_JSON": True})
    assert app.instance_path == str(target)
    assert (target / "remote_jobs" / "pending").is_dir()
    assert app.config["JOBS_DATA_DIR"] == str(target / "remote_jobs")


def test_instance_config_file_is_read_from_the_environment_instance_path(tmp_path, monkeypatch):
    target = tmp_path / "from-env"
    _write_instance_config(target, "RETRY_BACKOFF_SECONDS = 3\n")
    monkeypatch.setenv("MORAG_REMOTE_INSTANCE_PATH", str(target))
    assert create_app({"LOG_JSON": True}).config["RETRY_BACKOFF_SECONDS"] == 3


def test_jobs_data_dir_and_source_roots_from_the_environment(folder, tmp_path, monkeypatch):
    data = tmp_path / "elsewhere" / "jobs"
    monkeypatch.setenv("MORAG_REMOTE_JOBS_DATA_DIR", str(data))
    monkeypatch.setenv("MORAG_REMOTE_SOURCE_ROOTS", json.dumps([str(tmp_path / "a"), str(tmp_path / "b")]))
    app = _app(folder)
    assert (data / "pending").is_dir()
    # finished uploads (the blob store's sources) are served as sources too
    assert app.extensions[SERVICE].settings.source_roots == (str(tmp_path / "a"), str(tmp_path / "b"),
                                                             str(folder / "blobs" / "sources"))


def test_a_single_source_root_without_json_brackets_is_a_list_of_one(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MORAG_REMOTE_SOURCE_ROOTS", str(tmp_path / "media"))
    assert _app(folder).config["SOURCE_ROOTS"] == [str(tmp_path / "media")]


def test_pending_ttl_from_the_environment_reaches_the_service(folder, monkeypatch):
    monkeypatch.setenv("MORAG_REMOTE_PENDING_TTL_SECONDS", "600")
    assert _app(folder).extensions[SERVICE].settings.pending_ttl_seconds == 600


def test_the_secret_key_is_made_once_per_instance_folder(folder):
    first = _app(folder).config["SECRET_KEY"]
    assert first and _app(folder).config["SECRET_KEY"] == first
    assert oct((folder / "secret_key").stat().st_mode & 0o777) == "0o600"


def _flask(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flask", "--app", "morag_remote", *args], cwd=REPO,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_the_cli_uses_the_instance_path_from_the_environment(tmp_path):
    target = tmp_path / "cli-instance"
    created = _flask("keys", "create", "--role", "producer", "--name", "p1",
                     env={"MORAG_REMOTE_INSTANCE_PATH": str(target)})
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip().splitlines()[-1].startswith("mrk_")
    stored = json.loads((target / "api_keys.json").read_text())
    assert [k["name"] for k in stored["keys"]] == ["p1"]
    listed = _flask("keys", "list", "--json", env={"MORAG_REMOTE_INSTANCE_PATH": str(target)})
    assert [k["name"] for k in json.loads(listed.stdout)] == ["p1"]


def test_a_nested_environment_override_changes_only_its_own_app(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("MORAG_REMOTE_LEASE_SECONDS__audio", "60")
    assert _app(folder).extensions[SERVICE].settings.lease_for("audio") == 60
    monkeypatch.delenv("MORAG_REMOTE_LEASE_SECONDS__audio")
    assert _app(tmp_path / "other").extensions[SERVICE].settings.lease_for("audio") == 1800
    assert DEFAULTS["LEASE_SECONDS"]["audio"] == 1800
