"""The metrics files' default folder: in shared memory, one per instance folder and user, private
(0700), never a folder someone else made; emptied at start, and the server's own files removed at
exit."""
from __future__ import annotations

import os
import runpy
import shutil
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from support.gunicorn import ROOT
from morag_remote import metrics_location

CONF = str(ROOT / "gunicorn.conf.py")


@pytest.fixture
def instance(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "placeholder")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    monkeypatch.setenv("MORAG_REMOTE_REQUEST_LOG", "placeholder")
    monkeypatch.setenv("MORAG_REMOTE_INSTANCE_PATH", str(tmp_path / "instance"))
    yield tmp_path / "instance"
    shutil.rmtree(metrics_location.default_dir(str(tmp_path / "instance")), ignore_errors=True)


class Log:
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, msg, *args) -> None:
        self.warnings.append(msg % args)


def _server(workers=()) -> SimpleNamespace:
    return SimpleNamespace(log=Log(), WORKERS={pid: None for pid in workers})


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm on this system")
def test_the_default_folder_is_in_shared_memory_per_instance_and_user(tmp_path):
    one, other = metrics_location.default_dir(str(tmp_path / "a")), metrics_location.default_dir(str(tmp_path / "b"))
    assert one.startswith(f"/dev/shm/morag-remote-{os.getuid()}-") and other != one
    assert metrics_location.default_dir(str(tmp_path / "a")) == one


def test_without_dev_shm_the_runtime_dir_then_the_instance_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_location, "MEMORY_BASES", (str(tmp_path / "no-such-dir"),))
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert Path(metrics_location.default_dir(str(tmp_path / "i"))).parent == runtime
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert metrics_location.default_dir(str(tmp_path / "i")) == str(tmp_path / "i" / "prometheus")


def test_a_private_folder_is_made_0700_and_accepted_again(tmp_path):
    path = tmp_path / "m"
    assert metrics_location.make_private_dir(str(path)) is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert metrics_location.make_private_dir(str(path)) is None


def test_a_folder_not_ours_alone_is_refused(tmp_path):
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert "not a directory" in metrics_location.make_private_dir(str(link))
    (tmp_path / "file").write_text("")
    assert "not a directory" in metrics_location.make_private_dir(str(tmp_path / "file"))
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    assert "open to other users (mode 755)" in metrics_location.make_private_dir(str(shared))
    if os.getuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 65534, 65534)
        assert "belongs to uid 65534" in metrics_location.make_private_dir(str(foreign))


def test_on_starting_falls_back_to_the_instance_folder_when_the_default_is_taken(instance):
    conf = runpy.run_path(CONF)
    taken = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    if taken.parent == instance:
        pytest.skip("no shared memory folder on this system")
    taken.mkdir()
    taken.chmod(0o777)  # as another user could have left it in /dev/shm
    server = _server()
    conf["on_starting"](server)
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(instance / "prometheus")
    assert (instance / "prometheus").is_dir()
    [warning] = server.log.warnings
    assert warning.startswith(f"metrics files in {instance / 'prometheus'} instead: ") and "open to other" in warning


def test_on_exit_removes_its_own_workers_files_and_the_empty_folder(instance):
    conf = runpy.run_path(CONF)
    conf["on_starting"](_server())
    prom = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    for name in ("counter_11.db", "histogram_11.db", "counter_12.db", "counter_99.db"):
        (prom / name).write_bytes(b"")
    conf["child_exit"](None, SimpleNamespace(pid=11))
    conf["on_exit"](_server(workers=[12]))  # 12 still listed, 99 another master's (a binary upgrade)
    assert sorted(p.name for p in prom.iterdir()) == ["counter_99.db"]
    (prom / "counter_99.db").unlink()
    conf["on_exit"](_server())
    assert not prom.exists() or prom.parent == instance
