"""The worker keeps the server's promises across long jobs, crashes, signals, cancels and a server
restart: each a real gunicorn (leases of 2 s for audio, see ``support.workers.FAST_ENV``) and real
worker subprocesses. Every wait is a bounded polling loop that ends as soon as it can."""
from __future__ import annotations

import signal
import threading

import pytest

from support.gunicorn import wait_for
from support.workers import WorkerProcess, handler_script, pid_alive, served

pytestmark = pytest.mark.slow


def start_worker(workers, srv, folder, *args, **kwargs) -> WorkerProcess:
    worker = WorkerProcess(srv.url, srv.keys["worker"], folder, *args, **kwargs).start()
    workers.append(worker)
    return worker


def sleeper(folder, seconds: float, content: str = "done") -> str:
    """An --exec template whose handler sleeps, then writes ``content``."""
    folder.mkdir(parents=True, exist_ok=True)
    return handler_script(folder, f"time.sleep({seconds})\n"
                                  f"open(os.path.join(output_dir, 'content.txt'), 'w').write({content!r})\n")


def gated(folder, gate, content: str) -> str:
    """An --exec template whose handler waits for the file ``gate``, then writes ``content``."""
    folder.mkdir(parents=True, exist_ok=True)
    return handler_script(folder, f"for _ in range(6000):\n    if os.path.exists({str(gate)!r}):\n        break\n"
                                  f"    time.sleep(0.1)\n"
                                  f"open(os.path.join(output_dir, 'content.txt'), 'w').write({content!r})\n")


class Poller:
    """A second worker that long-polls throughout and records every job it is handed."""

    def __init__(self, srv, worker_id: str = "second") -> None:
        self.client = srv.client("worker")
        self.worker_id = worker_id
        self.claimed: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for _ in range(10_000):
            if self.stop.is_set():
                return
            for job in self.client.poll(self.worker_id, ["audio"], wait=1):
                self.claimed.append(job.job_id)

    def __enter__(self) -> "Poller":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(30)


def test_heartbeats_keep_a_job_three_times_longer_than_its_lease(tmp_path, workers):
    # a 3 s lease: heartbeats every second, so that a loaded machine that delays one by a second
    # does not let the second poller (which reaps lapsed leases) take the job
    lease = 3
    env = {"MORAG_REMOTE_LEASE_SECONDS": f'{{"audio": {lease}, "default": 30}}'}
    with served(tmp_path, env=env) as srv:
        producer = srv.client()
        job_id = producer.create(srv.source("long.mp3", b"audio"), "audio", "ingest-1").job_id
        worker = start_worker(workers, srv, tmp_path / "w1", "--exec",
                              sleeper(tmp_path / "h", 3.0 * lease, "long done"))
        worker.wait_event("handler.started", job_id=job_id)
        with Poller(srv) as second:
            wait_for(lambda: producer.status(job_id).is_terminal, 90, "the long job to finish")
        job = producer.get(job_id)
        assert job.status == "completed" and job.content == "long done"
        assert job.retry_count == 0 and job.raw["attempt"] == 1
        assert job_id not in second.claimed
        worker.wait_event("result.sent", job_id=job_id)  # logged once the answer is read: just after
        assert len(worker.named("result.sent", job_id=job_id)) == 1


def test_kill_9_mid_job_is_requeued_after_the_lease_and_done_by_another_worker(tmp_path, workers):
    with served(tmp_path) as srv:
        producer = srv.client()
        job_id = producer.create(srv.source("a.mp3", b"audio"), "audio", "ingest-1").job_id
        first = start_worker(workers, srv, tmp_path / "w1", "--exec", sleeper(tmp_path / "h1", 60, "first"))
        started = first.wait_event("handler.started", job_id=job_id)
        first.proc.kill()
        first.wait(30)
        # its handler dies with it (PR_SET_PDEATHSIG), rather than run on unowned
        wait_for(lambda: not pid_alive(started["pid"]), 10, "the handler to die with its worker")
        second = start_worker(workers, srv, tmp_path / "w2", "--exec", sleeper(tmp_path / "h2", 0.1, "second"))
        wait_for(lambda: producer.status(job_id).is_terminal, 90, "the job to be done again")
        job = producer.get(job_id)
        assert job.status == "completed" and job.content == "second"
        assert job.retry_count == 1 and job.raw["attempt"] == 2
        second.wait_event("result.sent", job_id=job_id)
        assert len(second.named("result.sent", job_id=job_id)) == 1
        assert not first.named("result.sent")


def test_sigterm_with_a_short_grace_hands_the_job_back_at_once(tmp_path, workers):
    lease = 120  # the job must come back long before this lease could lapse
    env = {"MORAG_REMOTE_LEASE_SECONDS": f'{{"audio": {lease}, "default": {lease}}}'}
    with served(tmp_path, env=env) as srv:
        producer = srv.client()
        job_id = producer.create(srv.source("a.mp3", b"audio"), "audio", "ingest-1").job_id
        first = start_worker(workers, srv, tmp_path / "w1", "--exec", sleeper(tmp_path / "h1", 600),
                             "--grace", "0.5", "--kill-grace", "1")
        started = first.wait_event("handler.started", job_id=job_id)
        first.send(signal.SIGTERM)
        assert first.wait(60) == 0
        assert not pid_alive(started["pid"])
        assert producer.status(job_id).status == "pending"
        claimed = wait_for(lambda: srv.client("worker").poll("second", ["audio"], wait=2), lease / 2,
                           "a second worker to be handed the job")
        assert claimed[0].job_id == job_id
        assert claimed[0].retry_count == 0  # released: no attempt counted
        assert first.named("job.released", job_id=job_id)
        assert not first.named("release.unsupported")
        assert producer.get(job_id).raw["releases"] == 1


def test_sigterm_with_a_long_grace_lets_the_job_finish_and_exits_0(tmp_path, workers):
    with served(tmp_path) as srv:
        producer = srv.client()
        job_id = producer.create(srv.source("a.mp3", b"audio"), "audio", "ingest-1").job_id
        worker = start_worker(workers, srv, tmp_path / "w1", "--exec", sleeper(tmp_path / "h", 2.0, "finished"),
                              "--grace", "60")
        worker.wait_event("handler.started", job_id=job_id)
        worker.send(signal.SIGTERM)
        assert worker.wait(90) == 0
        job = producer.get(job_id)
        assert job.status == "completed" and job.content == "finished"
        names = [e["event"] for e in worker.events()]
        assert names.index("result.sent") < names.index("worker.stopped")


def test_cancel_while_running_stops_the_handler_and_sends_nothing(tmp_path, workers):
    with served(tmp_path) as srv:
        producer = srv.client()
        job_id = producer.create(srv.source("a.mp3", b"audio"), "audio", "ingest-1").job_id
        worker = start_worker(workers, srv, tmp_path / "w1", "--exec", sleeper(tmp_path / "h", 600),
                              "--kill-grace", "2")
        started = worker.wait_event("handler.started", job_id=job_id)
        producer.cancel(job_id)
        # heartbeats come every third of the 2 s lease: the handler is gone within two of them
        # (plus a generous allowance for a loaded machine)
        wait_for(lambda: not pid_alive(started["pid"]), 2 * 2 / 3 + 20, "the handler to be stopped")
        worker.wait_event("handler.stopped", job_id=job_id, reason="lost")
        assert not worker.named("result.sent") and not worker.named("result.refused")
        assert producer.get(job_id).status == "cancelled"
        assert worker.proc.poll() is None  # the worker carries on


def test_server_down_for_5_s_mid_job_the_worker_retries_and_completes(tmp_path, workers):
    # the outage (5 s, plus gunicorn's start) is shorter than the 12 s lease, so the job is still
    # this worker's when the server is back; the first heartbeat (at about 4 s) falls in it, and
    # the handler (8 s) ends after it
    env = {"MORAG_REMOTE_LEASE_SECONDS": '{"audio": 12, "default": 30}'}
    with served(tmp_path, env=env) as srv:
        producer = srv.client()
        job_id = producer.create(srv.source("a.mp3", b"audio"), "audio", "ingest-1").job_id
        worker = start_worker(workers, srv, tmp_path / "w1", "--exec", sleeper(tmp_path / "h", 8.0, "survived"))
        worker.wait_event("handler.started", job_id=job_id)
        port = srv.url.rsplit(":", 1)[1]
        srv.server.stop()
        threading.Event().wait(5)
        srv.server.env["PORT"] = port  # the same address again
        srv.server.start()
        wait_for(lambda: producer.status(job_id).is_terminal, 120, "the job to complete after the restart")
        job = producer.get(job_id)
        assert job.status == "completed" and job.content == "survived" and job.retry_count == 0
        assert worker.named("heartbeat.failed", job_id=job_id)
        worker.wait_event("result.sent", job_id=job_id)  # logged once the answer is read: just after
        assert len(worker.named("result.sent", job_id=job_id)) == 1


def test_a_restarted_worker_sends_the_result_its_predecessor_could_not(tmp_path, workers):
    with served(tmp_path, env={"MORAG_REMOTE_LEASE_SECONDS": '{"default": 120}'}) as srv:
        producer = srv.client()
        job_id = producer.create(srv.source("a.mp3", b"audio"), "audio", "ingest-1").job_id
        folder, gate = tmp_path / "w", tmp_path / "gate"
        first = start_worker(workers, srv, folder, "--exec", gated(tmp_path / "h", gate, "kept on disk"),
                             "--worker-id", "gpu-a")
        first.wait_event("handler.started", job_id=job_id)
        port = srv.url.rsplit(":", 1)[1]
        srv.server.stop()
        gate.touch()
        first.wait_event("handler.finished", job_id=job_id)
        first.send(signal.SIGTERM)
        first.wait_event("worker.draining")
        first.send(signal.SIGTERM)  # a second signal: stop at once
        assert first.wait(60) == 75, first.stderr()  # EX_TEMPFAIL: a result is left for the next start
        assert list((folder / "state" / "results").glob("*.json"))
        srv.server.env["PORT"] = port
        srv.server.start()
        second = start_worker(workers, srv, folder, "--exec", sleeper(tmp_path / "h", 1.0, "not this"))
        second.wait_event("result.sent", job_id=job_id)
        job = producer.get(job_id)
        assert job.status == "completed" and job.content == "kept on disk"
        assert not list((folder / "state" / "results").glob("*.json"))
