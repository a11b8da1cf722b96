"""An instance folder damaged on disk (a directory where a file belongs, a file where a folder
belongs) makes every ``flask`` command fail in one line naming the problem, never a traceback, and
leaves what is there as it was. Run as real ``flask`` processes: the app is built before the
command runs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def flask(instance: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_REMOTE_")}
    env.update(MORAG_REMOTE_INSTANCE_PATH=str(instance), MORAG_REMOTE_LOG_JSON="true")
    return subprocess.run([sys.executable, "-m", "flask", "--app", "morag_remote", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """stderr without the JSON log lines the app writes while it starts."""
    return [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]


@pytest.mark.parametrize("damage, args, fragment", [
    ("secret_key/", ("remote-jobs", "list"), "secret_key"),
    ("remote_jobs", ("remote-jobs", "list"), "remote_jobs"),
    ("remote_jobs/pending", ("remote-jobs", "stats"), "pending"),
    ("remote_jobs/.lock/", ("remote-jobs", "list"), ".lock"),
    ("api_keys.json/", ("keys", "list"), "api_keys.json"),
])
def test_a_damaged_instance_folder_is_one_line(tmp_path, damage, args, fragment):
    instance = tmp_path / "instance"
    assert flask(instance, "remote-jobs", "list").returncode == 0  # a good instance first
    target = instance / damage.rstrip("/")
    if target.is_dir():
        target.rename(tmp_path / "moved")
    elif target.exists():
        target.unlink()
    target.mkdir() if damage.endswith("/") else target.write_text("not what belongs here")
    result = flask(instance, *args)
    assert result.returncode == 1, result.stderr
    lines = error_lines(result)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_an_instance_path_that_is_a_file_is_one_line(tmp_path):
    instance = tmp_path / "instance"
    instance.write_text("a file")
    result = flask(instance, "remote-jobs", "list")
    assert result.returncode == 1
    assert error_lines(result) == [f"Error: the instance folder {instance} cannot be used: File exists: {instance}"]
    assert instance.read_text() == "a file"
