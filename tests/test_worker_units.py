"""The worker's and client's small rules, in process: settings, the state folder, header parsing,
backoff, heartbeat intervals, and a download whose server ignores Range or changes the file."""
from __future__ import annotations

import base64
import email.utils
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import structlog

from morag_remote.client import ClaimedJob, ClaimedJobs, Client, ConfigError, InvalidRequest, RetryPolicy
from morag_remote.worker.handlers import HandlerError, HandlerProcess, Outcome
from support.loopback import answer
from morag_remote.client.download import attachment_name, expected_sha256
from morag_remote.client.http import retry_after_seconds
from morag_remote.worker.config import load
from morag_remote.worker.handlers import ExecHandler, PythonHandler
from morag_remote.worker import runner
from morag_remote.worker.runner import JobRun, Worker, heartbeat_interval
from morag_remote.worker.state import StateDir

BASE = ["--url", "http://q.example", "--key", "k", "--content-types", "audio", "--exec", "true"]


def test_settings_parse_lists_pairs_and_refuse_bad_values(tmp_path):
    config, _ = load([*BASE, "--max-runtime", "audio=10", "--max-runtime", "video=20,5", "--labels", "gpu=a100"], {})
    assert config.max_runtime == {"audio": 10.0, "video": 20.0, "default": 5.0}
    assert config.runtime_limit("image") == 5.0 and config.labels == {"gpu": "a100"}
    with pytest.raises(ConfigError, match="--grace"):
        load([*BASE, "--grace", "-1"], {})
    with pytest.raises(ConfigError, match="MORAG_REMOTE_WORKER_CONCURRENCY"):
        load(BASE, {"MORAG_REMOTE_WORKER_CONCURRENCY": "many"})
    with pytest.raises(ConfigError, match="--content-types"):
        load(["--url", "http://q", "--key", "k", "--exec", "true"], {})
    with pytest.raises(ConfigError, match="key"):
        load(["--url", "http://q", "--content-types", "a", "--exec", "true"], {})
    with pytest.raises(ConfigError, match="--log-level"):
        load([*BASE, "--log-level", "loud"], {})


def test_a_config_file_must_be_toml_with_known_names_and_a_key_file_is_read(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("url = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(["--config", str(bad)], {})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('urll = "x"\n')
    with pytest.raises(ConfigError, match="urll"):
        load(["--config", str(unknown)], {})
    with pytest.raises(ConfigError, match="cannot read"):
        load(["--config", str(tmp_path / "missing.toml")], {})
    key = tmp_path / "key"
    key.write_text("mrk_from_file\n")
    config, _ = load(["--url", "http://q", "--content-types", "a", "--exec", "true", "--key-file", str(key)], {})
    assert config.key == "mrk_from_file"
    with pytest.raises(ConfigError, match="key file"):
        load(["--url", "http://q", "--content-types", "a", "--exec", "true", "--key-file", str(tmp_path / "no")], {})


def test_exec_templates_keep_words_and_refuse_broken_braces():
    handler = ExecHandler("convert --in {input} --literal {{x}} --type={content_type}")
    assert handler.command("/a b", "/o", "j", "audio") == ["convert", "--in", "/a b", "--literal", "{x}", "--type=audio"]
    with pytest.raises(ConfigError, match="braces"):
        ExecHandler("convert {input")
    with pytest.raises(ConfigError, match="split"):
        ExecHandler("convert 'unclosed")
    with pytest.raises(ConfigError, match="empty"):
        ExecHandler("   ")
    with pytest.raises(ConfigError, match="module:function"):
        PythonHandler("no_colon")


def test_the_state_folder_is_locked_and_skips_a_damaged_result(tmp_path):
    first = StateDir(str(tmp_path / "s")).open()
    with pytest.raises(ConfigError, match="in use"):
        StateDir(str(tmp_path / "s")).open()
    saved = first.save("job/1", "lease 1", {"success": True})
    (tmp_path / "s" / "results" / "broken.json").write_text("{")
    pending = list(first.pending())
    assert [(p.job_id, p.lease_id) for p in pending] == [("job/1", "lease 1")]
    assert (tmp_path / "s" / "results" / "broken.json.bad").exists()
    first.done(saved)
    first.done(saved)  # twice is fine
    assert list(first.pending()) == []
    first.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="cannot be used"):
        StateDir(str(tmp_path / "file")).open()


def test_header_parsing():
    assert attachment_name('attachment; filename="../../etc/passwd"') == "passwd"
    assert attachment_name("attachment; filename=a.mp3; filename*=UTF-8''caf%C3%A9.mp3") == "café.mp3"
    assert attachment_name("attachment; filename=...") is None and attachment_name(None) is None
    digest = hashlib.sha256(b"x").digest()
    assert expected_sha256(f"sha-256=:{base64.b64encode(digest).decode()}:") == digest
    assert expected_sha256("sha-256=:!!:") is None and expected_sha256("md5=:AAAA:") is None
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    later = email.utils.format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 20 < retry_after_seconds(later) <= 30


def test_backoff_is_capped_jittered_and_honours_retry_after():
    policy = RetryPolicy(attempts=3, base=1.0, cap=4.0, max_retry_after=10.0)
    assert [policy.delay(n, rng=lambda: 1.0) for n in (1, 2, 3, 9)] == [1.0, 2.0, 4.0, 4.0]
    assert policy.delay(1, rng=lambda: 0.0) == 0.5
    assert policy.delay(1, retry_after=30, rng=lambda: 0.0) == 10.0
    assert policy.gives_up(3) and not policy.gives_up(2) and not RetryPolicy(attempts=None).gives_up(10**6)


def test_heartbeats_come_at_a_third_of_the_lease_left():
    soon = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 9 < heartbeat_interval(soon) <= 10
    assert heartbeat_interval(datetime.now(timezone.utc) - timedelta(seconds=5)) == runner.MIN_LEASE / 3
    assert heartbeat_interval(None, default=7) == 7


class _Changing(http.server.BaseHTTPRequestHandler):
    """Cuts the first answer short; answers a Range request with the whole (changed) file."""

    versions = [b"a" * 5000, b"b" * 3000]
    calls = 0

    def do_GET(self) -> None:
        type(self).calls += 1
        body = self.versions[0] if self.calls == 1 else self.versions[1]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Last-Modified", email.utils.formatdate(time.time() - self.calls, usegmt=True))
        self.end_headers()
        self.wfile.write(body[:1000] if self.calls == 1 else body)
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


def test_a_file_that_changed_between_tries_comes_whole_not_spliced(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Changing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = Client(f"http://127.0.0.1:{server.server_port}", "k", retry=RetryPolicy(attempts=3, base=0.01))
        got = client.download("/f", str(tmp_path / "f"))
        assert (tmp_path / "f").read_bytes() == _Changing.versions[1] and got.size == 3000
    finally:
        server.shutdown()
        server.server_close()


# -- the worker's loop in process (its clients' calls replaced) ---------------------------------------


def make_worker(tmp_path, *args: str, url: str = "http://q.example") -> Worker:
    config, _ = load([*BASE, "--url", url, "--state-dir", str(tmp_path / "state"), *args], {})
    return Worker(config, ExecHandler("true"), StateDir(config.state_dir).open())


def claimed(job_id: str = "job-1", lease_id: str = "lease-1", lease: float = 30.0) -> ClaimedJob:
    timeout_at = (datetime.now(timezone.utc) + timedelta(seconds=lease)).isoformat()
    return ClaimedJob.from_json({"job_id": job_id, "source_file_url": f"/api/v1/remote-jobs/{job_id}/download",
                                 "content_type": "audio", "lease_id": lease_id, "timeout_at": timeout_at})


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(runner, "POLL_BACKOFF", RetryPolicy(attempts=None, base=0.001, cap=0.01))


def test_backoff_survives_any_number_of_retries():
    assert RetryPolicy(base=0.5, cap=15.0).delay(10_000, rng=lambda: 1.0) == 15.0
    assert runner.POLL_BACKOFF.delay(2000) <= runner.POLL_BACKOFF.cap


def test_an_unexpected_error_in_a_poll_is_logged_and_the_loop_goes_on(tmp_path, fast_backoff):
    worker = make_worker(tmp_path)
    answers: list[Any] = [OverflowError("int too large"), ValueError("not JSON"), ClaimedJobs()]

    def poll(*args, **kwargs):
        answer = answers.pop(0)
        if not answers:
            worker.draining.set()
        if isinstance(answer, Exception):
            raise answer
        return answer

    worker.poll_client.poll = poll
    with structlog.testing.capture_logs() as logged:
        worker._serve()
    assert answers == [] and worker.fatal is None
    crashed = [e for e in logged if e["event"] == "poll.crashed"]
    assert [e["error"] for e in crashed] == ["OverflowError: int too large", "ValueError: not JSON"]


@pytest.fixture
def fast_results(monkeypatch):
    monkeypatch.setattr("morag_remote.client.api.RESULT_RETRY", RetryPolicy(attempts=None, base=0.001, cap=0.01))


def result_server(loopback, statuses: list[int]):
    """Answers each result PUT with the next of ``statuses`` (then 200), heartbeats with 200."""
    def respond(handler, method, body):
        if handler.path.endswith("/result"):
            status = statuses.pop(0) if statuses else 200
            answer(handler, status, {"status": "completed"} if status == 200 else {"detail": f"said {status}"})
        else:
            answer(handler, 200, {"job_id": "job-1", "status": "processing"})
    return loopback(respond)


def results_sent(server) -> list[dict]:
    return [body for method, path, body in server.requests if path.endswith("/result")]


def test_a_result_answered_500_is_sent_again_until_accepted(tmp_path, loopback, fast_results):
    server = result_server(loopback, [500, 502, 500])
    worker = make_worker(tmp_path, url=server.url)
    JobRun(worker, claimed())._submit(Outcome(True, content="text"))
    assert [b["success"] for b in results_sent(server)] == [True] * 4
    assert not list(worker.state.pending())


def test_a_result_too_large_for_the_server_becomes_a_failure_that_says_so(tmp_path, loopback, fast_results):
    server = result_server(loopback, [413])
    worker = make_worker(tmp_path, url=server.url)
    JobRun(worker, claimed())._submit(Outcome(True, content="x" * 1000))
    first, second = results_sent(server)
    assert first["success"] and not second["success"] and second["retryable"] is False
    assert "413" in second["error_message"] and second["lease_id"] == "lease-1"
    assert not list(worker.state.pending())


def test_results_are_sent_as_utf8_not_escaped(tmp_path, loopback, fast_results):
    server = result_server(loopback, [])
    worker = make_worker(tmp_path, url=server.url)
    JobRun(worker, claimed())._submit(Outcome(True, content="ü" * 1000))
    assert results_sent(server)[0]["content"] == "ü" * 1000
    assert len(server.raw[0]) < 2200  # escaped as \u00fc it would be 6000 bytes


def test_a_result_that_cannot_be_saved_is_still_sent(tmp_path, loopback, fast_results):
    server = result_server(loopback, [])
    worker = make_worker(tmp_path, url=server.url)

    def full(*args):
        raise OSError(28, "No space left on device")

    worker.state.save = full
    with structlog.testing.capture_logs() as logged:
        JobRun(worker, claimed())._submit(Outcome(True, content="text"))
    assert results_sent(server)[0]["content"] == "text"
    assert [e for e in logged if e["event"] == "result.not_saved"]


def test_a_handler_killed_by_a_real_time_signal_is_a_failure_not_a_crash(tmp_path):
    proc = HandlerProcess(["true"], str(tmp_path), {}, 1024, lambda f, m: None)
    number = int(signal.SIGRTMIN) + 2  # Python names SIGRTMIN and SIGRTMAX only
    outcome = proc.outcome(-number, str(tmp_path))
    assert not outcome.success and outcome.retryable and f"signal {number}" in outcome.error_message
    assert "SIGKILL" in proc.outcome(-9, str(tmp_path)).error_message


def test_a_run_that_crashes_hands_its_job_back(tmp_path, loopback):
    server = loopback(lambda h, m, b: answer(h, 200, {"job_id": "job-1", "status": "pending"}))
    worker = make_worker(tmp_path, url=server.url)
    run = JobRun(worker, claimed())
    (tmp_path / "a-file").write_text("")
    run.folder = str(tmp_path / "a-file" / "job")  # makedirs fails: NotADirectoryError, as ENOSPC would
    with structlog.testing.capture_logs() as logged:
        run.run()
    assert [e["event"] for e in logged if e["event"].startswith("job.")] == ["job.claimed", "job.crashed",
                                                                             "job.released"]
    assert [(m, p) for m, p, b in server.requests] == [("POST", "/api/v1/remote-jobs/job-1/release")]
    assert server.requests[0][2] == {"lease_id": "lease-1"}


def test_a_drain_during_a_download_stops_it_and_hands_the_job_back(tmp_path, loopback):
    from test_client_transport import trickle
    server = loopback(trickle)
    worker = make_worker(tmp_path, url=server.url)
    run = JobRun(worker, claimed())
    thread = threading.Thread(target=run.run)
    thread.start()
    for _ in range(100):
        if server.requests:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    run.hand_back(at_once=False)
    thread.join(5)
    assert not thread.is_alive()
    assert [(m, p.rsplit("/", 1)[1]) for m, p, b in server.requests] == [("GET", "download"), ("POST", "release")]


_STARTS_A_HANDLER = """
import sys, threading, time
from morag_remote.worker.handlers import HandlerProcess
def start():
    proc = HandlerProcess(["sleep", "60"], ".", {}, 1024, lambda f, m: None)
    proc.start()
    print(proc.proc.pid, flush=True)
    proc.wait(120)
threading.Thread(target=start).start()
time.sleep(120)
"""


def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    from support.workers import pid_alive
    deadline = time.monotonic() + seconds
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_handler_dies_with_a_worker_killed_by_sigkill(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", _STARTS_A_HANDLER], stdout=subprocess.PIPE, cwd=tmp_path)
    try:
        handler = int(parent.stdout.readline())
        parent.kill()
        parent.wait(10)
        assert wait_gone(handler)
    finally:
        parent.kill()


def test_opening_the_state_folder_kills_a_killed_workers_leftovers_and_empties_work(tmp_path):
    root = tmp_path / "state"
    (root / "work" / "job-1-abc" / "input").mkdir(parents=True)
    left = subprocess.Popen(["sleep", "60"], env={**os.environ, "MORAG_REMOTE_HANDLER_OF": str(root)},
                            start_new_session=True)
    other = subprocess.Popen(["sleep", "60"], env={**os.environ, "MORAG_REMOTE_HANDLER_OF": str(root) + "-x"})
    try:
        state = StateDir(str(root)).open()
        left.wait(5)
        assert left.returncode == -signal.SIGKILL and other.poll() is None
        assert not list((root / "work").iterdir())
        state.close()
    finally:
        for proc in (left, other):
            proc.kill()
            proc.wait()


def test_a_finished_run_does_not_remove_a_newer_run_of_the_same_job(tmp_path):
    worker = make_worker(tmp_path)
    old, new = JobRun(worker, claimed(lease_id="lease-1")), JobRun(worker, claimed(lease_id="lease-2"))
    worker.track(old)
    worker.track(new)  # the lease was lost and this worker was handed the job again
    assert len(worker.runs) == 2
    worker.finished(old)
    assert list(worker.runs.values()) == [new]
    worker.finished(old)
    assert list(worker.runs.values()) == [new]


def refusing(worker: Worker, field: str, then: int = 1):
    """A poll that answers 422 naming ``field`` ``then`` times, then [] and the drain; the calls' kwargs."""
    calls: list[dict] = []

    def poll(*args, **kwargs):
        calls.append(kwargs)
        if len(calls) <= then:
            raise InvalidRequest("POST", "/api/v1/remote-jobs/poll", 422,
                                 {"detail": "invalid", "errors": {field: ["Must be less than or equal to 5."]}})
        worker.draining.set()
        return ClaimedJobs()
    worker.poll_client.poll = poll
    return calls


def test_a_poll_refused_for_its_wait_or_max_jobs_asks_for_less_and_goes_on(tmp_path, fast_backoff):
    worker = make_worker(tmp_path, "--poll-wait", "20")
    calls = refusing(worker, "wait", then=2)
    worker._poll_loop()
    assert worker.fatal is None and [c["wait"] for c in calls] == [20, 10, 5]
    worker = make_worker(tmp_path / "2", "--concurrency", "8")
    calls = refusing(worker, "max_jobs")
    worker._poll_loop()
    assert worker.fatal is None and [c["max_jobs"] for c in calls] == [8, 4]


def test_a_poll_refused_for_something_else_is_fatal(tmp_path, fast_backoff):
    worker = make_worker(tmp_path)
    refusing(worker, "content_types")
    worker._poll_loop()
    assert "422" in worker.fatal


def test_short_polls_do_not_spin(tmp_path, fast_backoff):
    worker = make_worker(tmp_path, "--poll-wait", "0")
    calls = []

    def poll(*args, **kwargs):
        calls.append(kwargs)
        return ClaimedJobs()
    worker.poll_client.poll = poll
    threading.Timer(0.5, worker.draining.set).start()
    worker._poll_loop()
    assert 1 <= len(calls) <= 2


def test_a_timeout_of_0_is_refused():
    with pytest.raises(ConfigError, match="--timeout"):
        load([*BASE, "--timeout", "0"], {})


def test_a_key_or_a_handler_comes_whole_from_the_first_layer_that_sets_it(tmp_path):
    key = tmp_path / "key"
    key.write_text("mrk_from_flag_file\n")
    base = ["--url", "http://q", "--content-types", "a"]
    config, _ = load([*base, "--exec", "true", "--key-file", str(key)], {"MORAG_REMOTE_WORKER_KEY": "mrk_env"})
    assert config.key == "mrk_from_flag_file"
    config, _ = load([*base, "--exec", "true", "--key", "mrk_flag"], {"MORAG_REMOTE_WORKER_KEY_FILE": "/nonexistent"})
    assert config.key == "mrk_flag"
    toml = tmp_path / "c.toml"
    toml.write_text('exec = "true"\nkey = "mrk_toml"\n')
    config, _ = load([*base, "--handler", "m:f", "--config", str(toml)], {})
    assert (config.handler, config.exec, config.key) == ("m:f", None, "mrk_toml")
    config, _ = load([*base, "--config", str(toml)], {"MORAG_REMOTE_WORKER_HANDLER": "m:g"})
    assert (config.handler, config.exec) == ("m:g", None)
    toml.write_text('exec = "true"\nhandler = "m:f"\nkey = "k"\n')
    with pytest.raises(ConfigError, match="exactly one"):
        load([*base, "--config", str(toml)], {})


def test_heartbeats_follow_the_servers_clock_not_the_workers():
    server_now = datetime.now(timezone.utc) - timedelta(hours=1)  # the worker's clock is an hour ahead
    interval = heartbeat_interval(server_now + timedelta(seconds=30), server_now=server_now)
    assert 9 <= interval <= 10  # (30 s - 1 s for the Date header's resolution) / 3
    ahead = datetime.now(timezone.utc) + timedelta(hours=1)  # an hour behind
    assert 9 <= heartbeat_interval(ahead + timedelta(seconds=30), server_now=ahead) <= 10
    # a lease already over by the worker's clock does not make heartbeats spin
    assert heartbeat_interval(datetime.now(timezone.utc) - timedelta(seconds=5)) >= runner.MIN_LEASE / 3


def test_a_handlers_group_is_killed_before_the_handler_is_reaped(tmp_path, monkeypatch):
    """While the leader is an unreaped zombie its pid (and so its group id) cannot be reused."""
    proc = HandlerProcess(["sh", "-c", "sleep 30 & exit 0"], str(tmp_path), dict(os.environ), 1024,
                          lambda f, m: None)
    seen = []
    real_killpg = os.killpg

    def killpg(pgid, sig):
        try:
            with open(f"/proc/{pgid}/stat") as fh:
                seen.append(fh.read().rsplit(")", 1)[1].split()[0])
        except OSError:
            seen.append("reaped")
        real_killpg(pgid, sig)

    monkeypatch.setattr("morag_remote.worker.handlers.os.killpg", killpg)
    proc.start()
    assert proc.wait(10) == 0
    assert proc.finish() == 0
    assert seen == ["Z"]


def test_handlers_started_from_many_threads_at_once_all_start(tmp_path):
    """Nothing runs between fork and exec in the worker (a preexec_fn there deadlocked)."""
    codes: list[int] = []

    def starts() -> None:
        for _ in range(10):
            proc = HandlerProcess(["true"], str(tmp_path), dict(os.environ), 1024, lambda f, m: None)
            proc.start()
            codes.append(proc.wait(20))
            proc.finish()

    threads = [threading.Thread(target=starts) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [0] * 40


def test_a_handler_that_is_not_there_fails_to_start_with_its_name(tmp_path):
    proc = HandlerProcess(["./no-such-handler"], str(tmp_path), dict(os.environ), 1024, lambda f, m: None)
    with pytest.raises(HandlerError, match="no-such-handler"):
        proc.start()
