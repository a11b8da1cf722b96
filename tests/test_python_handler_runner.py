"""``morag_remote.worker.pyhandler``, the process a ``--handler`` callable runs in, called in
process: what a handler may return, and how each way of failing becomes an exit code."""
from __future__ import annotations

import json
import signal
import sys
import types

import pytest

from morag_remote.worker import pyhandler
from morag_remote.worker.handlers import EX_DATAERR
from morag_remote.worker.job import JobFailed

MODULE = "morag_remote_test_handlers"


@pytest.fixture(autouse=True)
def handlers():
    module = types.ModuleType(MODULE)
    module.text = lambda job: f"{job.content_type} {job.options}"
    module.pair = lambda job: ("content", {"lang": "en"})
    module.mapping = lambda job: {"content": "c", "metadata": None}
    module.number = lambda job: 42
    module.bytes_content = lambda job: (b"raw", None)
    module.not_callable = 5

    def fails(job, retryable):
        raise JobFailed("cannot convert this", retryable=retryable)

    module.fails_for_good = lambda job: fails(job, False)
    module.fails_for_now = lambda job: fails(job, True)
    sys.modules[MODULE] = module
    previous = signal.getsignal(signal.SIGTERM)  # main() sets the handler's SIGTERM: put ours back
    yield module
    signal.signal(signal.SIGTERM, previous)
    del sys.modules[MODULE]


def _run(tmp_path, name, monkeypatch):
    monkeypatch.setenv("MORAG_REMOTE_TASK_OPTIONS", json.dumps({"language": "en"}))
    out = tmp_path / name
    out.mkdir()
    code = pyhandler.main([f"{MODULE}:{name}", str(tmp_path / "in.bin"), str(out), "job-1", "audio"])
    return code, out


@pytest.mark.parametrize("name, content, metadata", [
    ("text", "audio {'language': 'en'}", None), ("pair", "content", {"lang": "en"}), ("mapping", "c", None)])
def test_what_a_handler_returns_is_written_as_a_command_would(tmp_path, monkeypatch, name, content, metadata):
    code, out = _run(tmp_path, name, monkeypatch)
    assert code == 0 and (out / "content.txt").read_text() == content
    assert ((out / "metadata.json").exists() and json.loads((out / "metadata.json").read_text()) == metadata) \
        or (metadata is None and not (out / "metadata.json").exists())


@pytest.mark.parametrize("name, expected", [
    ("number", 1), ("bytes_content", 1), ("fails_for_now", 1), ("fails_for_good", EX_DATAERR)])
def test_each_way_of_failing_has_its_exit_code(tmp_path, monkeypatch, name, expected):
    code, out = _run(tmp_path, name, monkeypatch)
    assert code == expected and not (out / "content.txt").exists()


def test_check_imports_the_handler_and_says_why_it_cannot(capsys):
    assert pyhandler.main(["--check", f"{MODULE}:text"]) == 0
    assert pyhandler.main(["--check", f"{MODULE}:not_callable"]) == 1
    assert pyhandler.main(["--check", "no_such_module_here:f"]) == 1
    assert "cannot load it" in capsys.readouterr().err
