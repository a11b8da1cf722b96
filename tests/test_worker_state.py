"""The worker's state folder on its own: results written whole and read back, a damaged one set
aside, what a killed predecessor left in ``work/`` cleared at start; and the client as a context."""
from __future__ import annotations

import os

from morag_remote.client import Client
from morag_remote.worker.state import StateDir


def test_a_saved_result_is_read_back_until_it_is_done(tmp_path):
    state = StateDir(str(tmp_path / "s")).open()
    try:
        saved = state.save("job-1", "lease/1", {"success": True, "content": "héllo"})
        (pending,) = list(state.pending())
        assert (pending.job_id, pending.lease_id, pending.body) == ("job-1", "lease/1", saved.body)
        state.done(pending)
        state.done(pending)  # gone already: nothing raised
        assert list(state.pending()) == []
    finally:
        state.close()


def test_a_damaged_result_file_is_set_aside(tmp_path):
    state = StateDir(str(tmp_path / "s")).open()
    try:
        with open(os.path.join(state.results, "job.x.json"), "w") as fh:
            fh.write("{not json")
        assert list(state.pending()) == []
        assert os.listdir(state.results) == ["job.x.json.bad"]
    finally:
        state.close()


def test_what_a_killed_worker_left_in_work_is_cleared_at_start(tmp_path):
    work = tmp_path / "s" / "work"
    (work / "job-a").mkdir(parents=True)
    (work / "job-a" / "input.mp3").write_bytes(b"partial")
    (work / "stray.part").write_bytes(b"x")
    state = StateDir(str(tmp_path / "s")).open()
    try:
        assert os.listdir(state.work) == []
    finally:
        state.close()
        state.close()  # twice: nothing raised


def test_a_client_closes_as_a_context_and_says_where_it_points():
    with Client("http://127.0.0.1:9", "mrk_key") as client:
        assert repr(client) == "Client('http://127.0.0.1:9')"
        client.forget_connection()
