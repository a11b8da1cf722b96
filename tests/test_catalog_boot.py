"""A process building its catalog (a gunicorn worker's boot, or a rebuild after a gap) holds no lock
that writers need: stopped (SIGSTOP) in the middle of its build, it holds up no create and no claim
of any other process, and once it runs again it catches up with what changed meanwhile."""
from __future__ import annotations

import os
import signal

import pytest

from support.agents import Agent
from support.gunicorn import wait_for

pytestmark = pytest.mark.files_only

JOBS = 400
WRITE_BOUND = 0.5  # seconds a create or a claim may take on a busy 2-core machine


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.fixture
def agents(tmp_path):
    started: list[Agent] = []

    def start(**config) -> Agent:
        agent = Agent(tmp_path / "remote_jobs", tmp_path / "sources", **config)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.proc.is_alive():
            agent.proc.kill()
        agent.stop()


def test_a_process_stopped_in_the_middle_of_its_build_holds_up_no_write(agents):
    writer = agents(lock_timeout=2.0)  # a write blocked by the build would fail with StoreBusy
    backlog = [writer.call("create", "video") for _ in range(JOBS)]
    booting = agents()
    booting.call("stop_in_build", JOBS // 2)
    booting.send("counts")  # its first use of the store: the catalog is built now
    wait_for(lambda: _state(booting.proc.pid) == "T", 30, "the booting process to stop in its build")
    try:
        created, took = writer.call("timed", "create", "audio")
        assert took < WRITE_BOUND, took
        claimed, took = writer.call("timed", "poll", "w1", ["video"])
        assert took < WRITE_BOUND and claimed == [backlog[0]], (claimed, took)
        more, took = writer.call("timed", "create", "audio")
        assert took < WRITE_BOUND
    finally:
        os.kill(booting.proc.pid, signal.SIGCONT)
    counts = booting.reply()
    assert counts == writer.call("counts") == {"pending/video": JOBS - 1, "pending/audio": 2,
                                               "processing/video": 1}
    assert booting.call("pending") == writer.call("pending") == sorted(backlog[1:] + [created, more])
    assert booting.call("poll", "w2", ["audio"]) == [created]
    assert writer.call("poll", "w3", ["audio"]) == [more]
