"""The ``morag-remote-worker`` command against a real gunicorn: jobs done once each with the
handler's content, the two handler kinds, their output rules, and the refusals at start."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from support.gunicorn import wait_for
from support.workers import WORKER_BIN, WorkerProcess, all_terminal, handler_script, pid_alive, served

pytestmark = pytest.mark.slow


def test_twenty_jobs_with_concurrency_four_each_completed_once_with_its_content(tmp_path, workers):
    with served(tmp_path) as srv:
        template = handler_script(tmp_path, (
            "time.sleep(0.2)\n"
            "data = open(input_path).read()\n"
            "open(os.path.join(output_dir, 'content.txt'), 'w').write('converted ' + data)\n"
            "json.dump({'job': job_id}, open(os.path.join(output_dir, 'metadata.json'), 'w'))\n"))
        producer = srv.client()
        jobs = {producer.create(srv.source(f"s{i}.txt", f"source number {i}".encode()), "document",
                                f"ingest-{i}").job_id: i for i in range(20)}
        worker = WorkerProcess(srv.url, srv.keys["worker"], tmp_path / "w", "--exec", template,
                               "--concurrency", "4", content_types="document").start()
        workers.append(worker)
        wait_for(lambda: all_terminal(producer, list(jobs)), 120, "every job to finish")
        for job_id, i in jobs.items():
            job = producer.get(job_id)
            assert job.status == "completed", job
            assert job.content == f"converted source number {i}"
            assert job.result_data["metadata"] == {"job": job_id}
            assert job.retry_count == 0 and job.raw["attempt"] == 1
        claimed = [e["job_id"] for e in worker.named("job.claimed")]
        assert sorted(claimed) == sorted(jobs)  # each claimed exactly once
        assert len(worker.named("result.sent")) == 20
        running = [e for e in worker.events() if e.get("event") == "handler.started"]
        assert len(running) == 20


def run_worker(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(WORKER_BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("morag-remote-worker: ") and "Traceback" not in done.stderr
    for word in words:
        assert word in last, last


@pytest.mark.parametrize("args, words", [
    (["--url", "127.0.0.1:8000", "--exec", "true"], ["http://"]),
    (["--url", "http://127.0.0.1:9", "--exec", "true {inptu}"], ["{inptu}", "{input}"]),
    (["--url", "http://127.0.0.1:9", "--exec", "/no/such/program {input}"], ["cannot run", "/no/such/program"]),
    (["--url", "http://127.0.0.1:9", "--handler", "no_such_module_x:convert"], ["no_such_module_x"]),
    (["--url", "http://127.0.0.1:9"], ["--exec", "--handler"]),
    (["--url", "http://127.0.0.1:9", "--exec", "true", "--concurrency", "0"], ["--concurrency"]),
    (["--url", "http://127.0.0.1:9", "--exec", "true", "--resources", "gpu_memory_gb"], ["--resources"]),
    (["--url", "http://127.0.0.1:9", "--exec", "true", "--resources", "gpu_memory_gb=lots"], ["--resources"]),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, args, words):
    one_line_error(run_worker("--key", "k", "--content-types", "audio", "--state-dir", str(tmp_path), *args), *words)


def test_settings_come_from_flags_then_environment_then_file(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text('url = "http://file.example"\ncontent_types = ["video"]\nconcurrency = 3\n'
                      'exec = "true"\n[max_runtime]\naudio = 3600\n')
    done = run_worker("--config", str(config), "--concurrency", "5", "--print-config",
                      env={"MORAG_REMOTE_WORKER_KEY": "mrk_secret_value", "MORAG_REMOTE_WORKER_URL": "http://env.example"})
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["url"] == "http://env.example" and shown["concurrency"] == 5 and shown["content_types"] == ["video"]
    assert shown["max_runtime"] == {"audio": 3600.0}
    assert "mrk_secret_value" not in done.stdout and shown["key"].startswith("***")
    assert shown["worker_id"].count("-") >= 1


def test_capabilities_come_from_flags_and_the_file(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text('url = "http://file.example"\nexec = "true"\ncontent_types = "audio"\n'
                      '[resources]\ncpus = 8\n')
    done = run_worker("--config", str(config), "--key", "k", "--capability-labels", "gpu, cuda12,gpu",
                      "--resources", "gpu_memory_gb=24", "--resources", "nvme=1", "--print-config")
    assert done.returncode == 0, done.stderr
    shown = json.loads(done.stdout)
    assert shown["capability_labels"] == ["gpu", "cuda12"]
    assert shown["resources"] == {"gpu_memory_gb": 24.0, "nvme": 1.0}  # the flags win over the file


def test_a_worker_takes_a_job_that_requires_what_it_offers_and_one_offering_less_does_not(tmp_path, workers):
    with served(tmp_path) as srv:
        producer = srv.client()
        job_id = producer.create(srv.source("talk.wav", b"speech"), "audio", "ingest-1",
                                 requires={"labels": ["gpu"], "min": {"gpu_memory_gb": 16}}).job_id
        small = WorkerProcess(srv.url, srv.keys["worker"], tmp_path / "small", "--exec", "true",
                              "--worker-id", "small-gpu", "--capability-labels", "gpu",
                              "--resources", "gpu_memory_gb=8", "--poll-wait", "1").start()
        workers.append(small)
        small.wait_event("worker.started")

        def seen(worker_id: str) -> bool:
            listed = producer.transport.request("GET", "/api/v1/remote-jobs/workers").json()["workers"]
            return any(w["worker_id"] == worker_id for w in listed)

        wait_for(lambda: seen("small-gpu"), 30, "the small worker to poll")
        time.sleep(2.5)  # two more of its one-second long polls
        assert producer.status(job_id).status == "pending" and not small.named("job.claimed")
        big = WorkerProcess(srv.url, srv.keys["worker"], tmp_path / "big", "--exec", "true",
                            "--worker-id", "big-gpu", "--capability-labels", "gpu,cuda12",
                            "--resources", "gpu_memory_gb=24").start()
        workers.append(big)
        wait_for(lambda: producer.status(job_id).is_terminal, 60, "the job to finish")
        assert producer.get(job_id).status == "completed"
        assert [e["job_id"] for e in big.named("job.claimed")] == [job_id]


def test_a_refused_key_or_content_type_stops_before_any_claim(tmp_path):
    with served(tmp_path) as srv:
        producer = srv.client()
        job_id = producer.create(srv.source("a.mp3", b"x"), "audio", "ingest-1").job_id
        common = ["--url", srv.url, "--exec", "true", "--state-dir", str(tmp_path / "state")]
        one_line_error(run_worker(*common, "--key", "mrk_not_a_key", "--content-types", "audio"), "refused the key")
        one_line_error(run_worker(*common, "--key", srv.keys["producer"], "--content-types", "audio"), "403")
        one_line_error(run_worker(*common, "--key", srv.keys["worker"], "--content-types", "audio,holograms"),
                       "holograms")
        assert producer.status(job_id).status == "pending"


@pytest.fixture
def one_job_worker(tmp_path, workers):
    """Run one audio job (max_retries 0) through a worker started with ``args``; the finished job."""
    def run(srv, *args: str, data: bytes = b"input", env: dict | None = None):
        producer = srv.client()
        job_id = producer.create(srv.source("in.bin", data), "audio", "ingest-1", max_retries=0).job_id
        worker = WorkerProcess(srv.url, srv.keys["worker"], tmp_path / "w", *args, env=env).start()
        workers.append(worker)
        wait_for(lambda: producer.status(job_id).is_terminal, 90, "the job to finish")
        return producer.get(job_id), worker
    return run


def test_exit_65_is_a_failure_without_retry_with_stderr_as_message(tmp_path, one_job_worker):
    with served(tmp_path) as srv:
        template = handler_script(tmp_path, "print('cannot decode this file', file=sys.stderr)\nsys.exit(65)\n")
        producer = srv.client()
        job_id = producer.create(srv.source("bad.bin", b"x"), "audio", "ingest-1").job_id  # 3 retries allowed
        worker = WorkerProcess(srv.url, srv.keys["worker"], tmp_path / "w", "--exec", template).start()
        try:
            wait_for(lambda: producer.status(job_id).is_terminal, 90, "the job to fail")
        finally:
            worker.stop()
        job = producer.get(job_id)
        assert job.status == "failed" and job.retry_count == 0
        assert "exited with 65" in job.error_message and "cannot decode this file" in job.error_message


def test_stdout_is_the_content_without_content_txt_and_progress_lines_are_not(tmp_path, one_job_worker):
    with served(tmp_path) as srv:
        template = handler_script(tmp_path, "print('progress 0.5 halfway', flush=True)\ntime.sleep(1.5)\n"
                                            "print('the transcript')\n")
        job, worker = one_job_worker(srv, "--exec", template)
        assert job.status == "completed" and job.content == "the transcript\n"


def test_content_that_is_not_utf8_fails_the_job_clearly(tmp_path, one_job_worker):
    with served(tmp_path) as srv:
        template = handler_script(tmp_path, "sys.stdout.buffer.write(b'caf\\xe9')\n")
        job, _ = one_job_worker(srv, "--exec", template)
        assert job.status == "failed" and "not UTF-8" in job.error_message


def test_gigabytes_on_stdout_stay_bounded_and_fail_the_job(tmp_path, one_job_worker):
    with served(tmp_path) as srv:
        template = handler_script(tmp_path, "chunk = b'x' * (1 << 20)\nfor _ in range(200):\n"
                                            "    sys.stdout.buffer.write(chunk)\n")
        job, worker = one_job_worker(srv, "--exec", template, "--max-output", str(1 << 20))
        assert job.status == "failed" and "--max-output" in job.error_message


def test_max_runtime_stops_a_handler_and_fails_the_job(tmp_path, one_job_worker):
    with served(tmp_path, env={"MORAG_REMOTE_LEASE_SECONDS": '{"default": 60}'}) as srv:
        template = handler_script(tmp_path, "time.sleep(600)\n")
        job, worker = one_job_worker(srv, "--exec", template, "--max-runtime", "audio=1", "--kill-grace", "1")
        assert job.status == "failed" and "--max-runtime" in job.error_message
        assert not pid_alive(worker.named("handler.started")[0]["pid"])


def test_a_python_handler_gets_a_job_and_returns_content_and_metadata(tmp_path, one_job_worker):
    (tmp_path / "myconv.py").write_text(
        "from morag_remote.worker.job import JobFailed\n"
        "def convert(job):\n"
        "    job.progress(0.5, 'reading')\n"
        "    if job.options.get('fail'):\n"
        "        raise JobFailed('unreadable input', retryable=False)\n"
        "    return open(job.path).read().upper(), {'content_type': job.content_type}\n")
    with served(tmp_path) as srv:
        job, _ = one_job_worker(srv, "--handler", "myconv:convert", data=b"hello",
                                env={"PYTHONPATH": str(tmp_path)})
        assert job.status == "completed" and job.content == "HELLO"
        assert job.result_data["metadata"] == {"content_type": "audio"}
        failing = srv.client().create(srv.source("f.bin", b"x"), "audio", "ingest-2",
                                      task_options={"fail": True}).job_id
        wait_for(lambda: srv.client().status(failing).is_terminal, 90, "the failing job")
        failed = srv.client().get(failing)
        assert failed.status == "failed" and "unreadable input" in failed.error_message and failed.retry_count == 0
