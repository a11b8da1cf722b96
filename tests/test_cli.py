"""The operator CLI (``flask remote-jobs ...``) through Flask's CliRunner: every command, its output
for people and for scripts (--json), its exit code, and a one-line error (never a traceback) for
bad input. (The ``keys`` group: test_api_keys.py.)"""
from __future__ import annotations

import json
import os

import pytest

from morag_remote.fileio import TEMP_PREFIX
from support.cli import assert_one_line_error

AUDIO_LEASE = 1800


def run(runner, *args: str):
    return runner.invoke(args=list(args))


def run_json(runner, *args: str):
    result = run(runner, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def claimed(producer, worker, n: int = 1, content_type: str = "audio", **extra) -> list[str]:
    ids = [producer.create_id(content_type, **extra) for _ in range(n)]
    for _ in ids:
        worker.claim(content_type)
    return ids


def job_of(service, job_id: str):
    return service.get(job_id)


# -- the group ---------------------------------------------------------------------------------

def test_help_lists_every_command_and_the_exit_codes(runner):
    result = run(runner, "remote-jobs", "--help")
    assert result.exit_code == 0
    for name in ("cleanup-expired", "cleanup-old", "list", "show", "stats", "cancel", "retry", "fsck"):
        assert name in result.output
    assert "3 no such job" in result.output


def test_unknown_command_is_a_one_line_usage_error(runner):
    assert_one_line_error(run(runner, "remote-jobs", "bogus"), 2, "No such command 'bogus'")


# -- cleanup-expired ---------------------------------------------------------------------------

def test_cleanup_expired_requeues_lapsed_leases_and_prints_the_count(runner, producer, worker, service, clock):
    ids = claimed(producer, worker, 2)
    clock.advance(AUDIO_LEASE + 1)
    result = run(runner, "remote-jobs", "cleanup-expired")
    assert result.exit_code == 0
    assert result.stdout.strip() == "2 job(s) handled"
    for job_id in ids:
        job = job_of(service, job_id)
        assert (job.status, job.retry_count, job.worker_id) == ("pending", 1, None)


def test_cleanup_expired_leaves_live_leases_alone(runner, producer, worker, service, clock):
    [job_id] = claimed(producer, worker)
    clock.advance(AUDIO_LEASE - 1)
    assert run_json(runner, "remote-jobs", "cleanup-expired") == {"expired": 0}
    assert job_of(service, job_id).status == "processing"


def test_cleanup_expired_twice_handles_each_lapse_once(runner, producer, worker, service, clock):
    [job_id] = claimed(producer, worker)
    clock.advance(AUDIO_LEASE + 1)
    assert run_json(runner, "remote-jobs", "cleanup-expired") == {"expired": 1}
    assert run_json(runner, "remote-jobs", "cleanup-expired") == {"expired": 0}
    assert run(runner, "remote-jobs", "cleanup-expired").stdout.strip() == "0 job(s) handled"
    assert job_of(service, job_id).retry_count == 1


def test_cleanup_expired_times_out_a_job_with_no_retry_left(runner, producer, worker, service, clock):
    [job_id] = claimed(producer, worker, max_retries=0)
    clock.advance(AUDIO_LEASE + 1)
    assert run_json(runner, "remote-jobs", "cleanup-expired") == {"expired": 1}
    assert job_of(service, job_id).status == "timeout"


@pytest.mark.parametrize("app_config", [{"PENDING_TTL_SECONDS": 600}])
def test_cleanup_expired_expires_pending_jobs_past_their_ttl(runner, producer, service, clock):
    old = producer.create_id()
    clock.advance(300)
    young = producer.create_id()
    clock.advance(301)
    assert run_json(runner, "remote-jobs", "cleanup-expired") == {"expired": 1}
    assert job_of(service, old).status == "timeout"
    assert job_of(service, young).status == "pending"


def test_cleanup_expired_rejects_an_unknown_option(runner):
    assert_one_line_error(run(runner, "remote-jobs", "cleanup-expired", "--all"), 2, "--all")


# -- cleanup-old -------------------------------------------------------------------------------

def test_cleanup_old_deletes_finished_jobs_older_than_the_days_given(runner, producer, worker, service, clock):
    [done] = claimed(producer, worker)
    assert worker.result(done).status_code == 200
    cancelled = producer.create_id()
    assert producer.cancel(cancelled).status_code == 200
    waiting = producer.create_id("video")
    clock.advance(3 * 86400)
    [recent] = claimed(producer, worker)
    assert worker.result(recent).status_code == 200

    result = run(runner, "remote-jobs", "cleanup-old", "--days", "2")
    assert result.exit_code == 0
    assert result.stdout.strip() == "2 job(s) deleted"
    remaining = {j["id"] for j in run_json(runner, "remote-jobs", "list")["jobs"]}
    assert remaining == {waiting, recent}
    assert producer.get(cancelled).status_code == 404
    assert producer.get(recent).status_code == 200
    assert run_json(runner, "remote-jobs", "cleanup-old", "--days", "2") == {"deleted": 0}  # each job once


def test_cleanup_old_json_reports_zero_when_nothing_is_old(runner, producer, worker):
    [done] = claimed(producer, worker)
    worker.result(done)
    assert run_json(runner, "remote-jobs", "cleanup-old", "--days", "1") == {"deleted": 0}


def test_cleanup_old_requires_days(runner):
    assert_one_line_error(run(runner, "remote-jobs", "cleanup-old"), 2, "Missing option '--days'")


@pytest.mark.parametrize("days", ["-1", "soon", "nan", "inf", "1e308", "36501"])
def test_cleanup_old_rejects_a_bad_days_value(runner, producer, worker, days):
    [done] = claimed(producer, worker)
    worker.result(done)
    assert_one_line_error(run(runner, "remote-jobs", "cleanup-old", "--days", days), 2, "--days")
    assert len(run_json(runner, "remote-jobs", "list")["jobs"]) == 1


# -- list --------------------------------------------------------------------------------------

def test_list_prints_one_line_per_job(runner, producer, worker):
    first = producer.create_id("audio")
    second = producer.create_id("video")
    worker.claim("video")
    lines = run(runner, "remote-jobs", "list").stdout.strip().splitlines()
    assert [line.split()[:3] for line in lines] == [[first, "pending", "audio"], [second, "processing", "video"]]
    assert "worker=w1" in lines[1]


def test_list_of_an_empty_store_says_so(runner):
    result = run(runner, "remote-jobs", "list")
    assert (result.exit_code, result.stdout.strip()) == (0, "no jobs")


def test_list_json_has_jobs_without_results_and_a_cursor(runner, producer, worker):
    [done] = claimed(producer, worker)
    worker.result(done)
    body = run_json(runner, "remote-jobs", "list")
    assert body["next_cursor"] is None
    [job] = body["jobs"]
    assert job["id"] == done
    assert job["status"] == "completed"
    assert "result_data" not in job


def test_list_filters_by_status_and_content_type(runner, producer, worker):
    audio = producer.create_id("audio")
    video = producer.create_id("video")
    document = producer.create_id("document")
    worker.claim("video")
    assert [j["id"] for j in run_json(runner, "remote-jobs", "list", "--status", "pending")["jobs"]] == [audio, document]
    assert [j["id"] for j in run_json(runner, "remote-jobs", "list", "--content-type", "video")["jobs"]] == [video]
    assert run_json(runner, "remote-jobs", "list", "--status", "pending", "--content-type", "video")["jobs"] == []


def test_list_filters_by_ingestion_task_and_worker(runner, producer, worker):
    mine = producer.create_id(ingestion_task_id="task-7")
    producer.create_id(ingestion_task_id="task-8")
    worker.claim()
    assert [j["id"] for j in run_json(runner, "remote-jobs", "list", "--ingestion-task-id", "task-7")["jobs"]] == [mine]
    assert [j["id"] for j in run_json(runner, "remote-jobs", "list", "--worker-id", "w1")["jobs"]] == [mine]


def test_list_pages_with_limit_and_after(runner, producer):
    ids = [producer.create_id() for _ in range(3)]
    page = run_json(runner, "remote-jobs", "list", "--limit", "2")
    assert [j["id"] for j in page["jobs"]] == ids[:2]
    assert "more: --after" in run(runner, "remote-jobs", "list", "--limit", "2").stdout
    rest = run_json(runner, "remote-jobs", "list", "--limit", "2", "--after", page["next_cursor"])
    assert ([j["id"] for j in rest["jobs"]], rest["next_cursor"]) == (ids[2:], None)


def test_list_rejects_an_unknown_status(runner):
    assert_one_line_error(run(runner, "remote-jobs", "list", "--status", "done"), 2, "--status", "'done'")


def test_list_rejects_an_unknown_content_type(runner):
    assert_one_line_error(run(runner, "remote-jobs", "list", "--content-type", "banana"), 2,
                          "--content-type", "'banana'")


def test_list_rejects_a_zero_limit(runner):
    assert_one_line_error(run(runner, "remote-jobs", "list", "--limit", "0"), 2, "--limit")


# -- show --------------------------------------------------------------------------------------

def test_show_describes_a_job_for_people(runner, producer, worker):
    [job_id] = claimed(producer, worker)
    worker.result(job_id, content="hello world")
    out = run(runner, "remote-jobs", "show", job_id).stdout
    assert f"id:                {job_id}" in out
    assert "status:            completed" in out
    assert "result:            11 characters of content" in out


def test_show_json_is_the_whole_record_with_its_result(runner, producer, worker):
    [job_id] = claimed(producer, worker)
    worker.result(job_id, content="hello world", metadata={"lang": "en"}, processing_time=2.5)
    job = run_json(runner, "remote-jobs", "show", job_id)
    assert job["id"] == job_id
    assert job["status"] == "completed"
    assert job["result_data"] == {"content": "hello world", "metadata": {"lang": "en"}, "processing_time": 2.5}


@pytest.mark.parametrize("job_id", ["0190b6c8-0000-7000-8000-000000000000", "../../etc/passwd"])
def test_show_an_unknown_id_exits_3_with_one_line(runner, job_id):
    assert_one_line_error(run(runner, "remote-jobs", "show", job_id), 3, "no job with id")


def test_show_without_an_id_is_a_usage_error(runner):
    assert_one_line_error(run(runner, "remote-jobs", "show"), 2, "JOB_ID")


# -- stats -------------------------------------------------------------------------------------

def test_stats_json_counts_by_status_and_content_type(runner, producer, worker, clock):
    producer.create_id("audio")
    clock.advance(5)
    producer.create_id("audio")
    producer.create_id("video")
    worker.claim("video")
    clock.advance(10)
    body = run_json(runner, "remote-jobs", "stats")
    assert body["counts"]["pending"] == {"audio": 2}
    assert body["counts"]["processing"] == {"video": 1}
    assert body["totals"]["pending"] == 2
    assert body["totals"]["completed"] == 0
    assert body["oldest_pending_age_seconds"] == 15
    assert body["active_workers"] == ["w1"]


def test_stats_for_people_has_a_line_per_count(runner, producer):
    producer.create_id("audio")
    out = run(runner, "remote-jobs", "stats").stdout.splitlines()
    assert ["pending", "audio", "1"] in [line.split() for line in out]
    assert out[-1] == "active workers: 0"


def test_stats_of_an_empty_store(runner):
    body = run_json(runner, "remote-jobs", "stats")
    assert body["oldest_pending_age_seconds"] is None
    assert sum(body["totals"].values()) == 0


# -- cancel and retry --------------------------------------------------------------------------

def test_cancel_a_pending_job(runner, producer, service):
    job_id = producer.create_id()
    result = run(runner, "remote-jobs", "cancel", job_id)
    assert (result.exit_code, result.stdout.strip()) == (0, f"{job_id} cancelled")
    assert job_of(service, job_id).status == "cancelled"


def test_cancel_a_processing_job_json(runner, producer, worker):
    [job_id] = claimed(producer, worker)
    job = run_json(runner, "remote-jobs", "cancel", job_id)
    assert (job["id"], job["status"]) == (job_id, "cancelled")


def test_cancel_a_finished_job_exits_4_and_changes_nothing(runner, producer, worker, service):
    [job_id] = claimed(producer, worker)
    worker.result(job_id)
    assert_one_line_error(run(runner, "remote-jobs", "cancel", job_id), 4, "completed")
    assert job_of(service, job_id).status == "completed"


def test_cancel_an_unknown_job_exits_3(runner):
    assert_one_line_error(run(runner, "remote-jobs", "cancel", "no-such-job"), 3, "no-such-job")


def test_retry_a_failed_job_puts_it_back_in_the_queue(runner, producer, worker, service):
    [job_id] = claimed(producer, worker)
    worker.result(job_id, success=False, error_message="gpu on fire", retryable=False)
    result = run(runner, "remote-jobs", "retry", job_id)
    assert (result.exit_code, result.stdout.strip()) == (0, f"{job_id} pending")
    assert job_of(service, job_id).status == "pending"


def test_retry_a_cancelled_job_json(runner, producer):
    job_id = producer.create_id()
    producer.cancel(job_id)
    job = run_json(runner, "remote-jobs", "retry", job_id)
    assert (job["id"], job["status"], job["error_message"]) == (job_id, "pending", None)


def test_retry_a_pending_job_exits_4(runner, producer, service):
    job_id = producer.create_id()
    assert_one_line_error(run(runner, "remote-jobs", "retry", job_id), 4, "pending")
    assert job_of(service, job_id).retry_count == 0


def test_retry_an_unknown_job_exits_3(runner):
    assert_one_line_error(run(runner, "remote-jobs", "retry", "no-such-job"), 3)


# -- fsck --------------------------------------------------------------------------------------

@pytest.mark.files_only
def test_fsck_of_a_clean_store_exits_0(runner, producer):
    producer.create_id()
    result = run(runner, "remote-jobs", "fsck")
    assert (result.exit_code, result.stdout.strip()) == (0, "store is clean")
    assert run_json(runner, "remote-jobs", "fsck") == []


@pytest.mark.files_only
def test_fsck_reports_a_leftover_temp_file_and_exits_1(runner, app):
    leftover = os.path.join(app.config["JOBS_DATA_DIR"], "pending", f"{TEMP_PREFIX}x.json.1.2")
    with open(leftover, "w") as fh:
        fh.write("{")
    result = run(runner, "remote-jobs", "fsck", "--json")
    assert result.exit_code == 1
    [finding] = json.loads(result.stdout)
    assert (finding["kind"], finding["repaired"]) == ("temp", False)
    assert os.path.exists(leftover)


@pytest.mark.files_only
def test_fsck_repair_moves_a_corrupt_file_aside_and_exits_0(runner, app, producer):
    keep = producer.create_id()
    data = app.config["JOBS_DATA_DIR"]
    broken = os.path.join(data, "pending", "0190b6c8-0000-7000-8000-00000000beef.json")
    with open(broken, "w") as fh:
        fh.write("{not json")
    result = run(runner, "remote-jobs", "fsck", "--repair")
    assert result.exit_code == 0, result.output
    assert "corrupt" in result.stdout
    assert "[repaired]" in result.stdout
    assert not os.path.exists(broken)
    assert len(os.listdir(os.path.join(data, "corrupt"))) == 1
    assert run(runner, "remote-jobs", "fsck").exit_code == 0
    assert [j["id"] for j in run_json(runner, "remote-jobs", "list")["jobs"]] == [keep]


@pytest.mark.files_only
def test_fsck_repair_removes_a_leftover_temp_file(runner, app):
    leftover = os.path.join(app.config["JOBS_DATA_DIR"], "pending", f"{TEMP_PREFIX}x.json.1.2")
    with open(leftover, "w") as fh:
        fh.write("{")
    repaired = run(runner, "remote-jobs", "fsck", "--repair")
    assert repaired.exit_code == 0
    assert "[repaired]" in repaired.stdout
    assert not os.path.exists(leftover)
    assert run(runner, "remote-jobs", "fsck").exit_code == 0  # nothing left to find


def _file_of(app, status: str, job_id: str) -> str:
    return os.path.join(app.config["JOBS_DATA_DIR"], status, f"{job_id}.json")


@pytest.mark.files_only
def test_fsck_repair_keeps_the_newer_copy_of_a_job_left_in_two_directories(runner, app, producer, worker, service):
    job_id = producer.create_id()
    stale = open(_file_of(app, "pending", job_id)).read()
    worker.claim()  # now version 2 in processing/; put the version-1 copy back, as a cut move would
    with open(_file_of(app, "pending", job_id), "w") as fh:
        fh.write(stale)
    result = run(runner, "remote-jobs", "fsck", "--json")
    assert result.exit_code == 1
    assert [(f["kind"], f["path"]) for f in json.loads(result.stdout)] == [("duplicate", f"pending/{job_id}.json")]
    assert run(runner, "remote-jobs", "fsck", "--repair").exit_code == 0
    assert not os.path.exists(_file_of(app, "pending", job_id))
    assert service.get(job_id).status == "processing"
    assert run(runner, "remote-jobs", "fsck").exit_code == 0


@pytest.mark.files_only
def test_fsck_repair_moves_a_misplaced_job_to_the_directory_of_its_status(runner, app, producer, service):
    job_id = producer.create_id()
    record = json.loads(open(_file_of(app, "pending", job_id)).read())
    record["status"] = "cancelled"
    with open(_file_of(app, "pending", job_id), "w") as fh:
        json.dump(record, fh)
    result = run(runner, "remote-jobs", "fsck")
    assert result.exit_code == 1
    assert "misplaced" in result.stdout
    assert run(runner, "remote-jobs", "fsck", "--repair").exit_code == 0
    assert os.path.exists(_file_of(app, "cancelled", job_id))
    assert not os.path.exists(_file_of(app, "pending", job_id))
    assert run_json(runner, "remote-jobs", "list", "--status", "cancelled")["jobs"][0]["id"] == job_id


@pytest.mark.files_only
def test_fsck_rejects_an_unknown_option(runner):
    assert_one_line_error(run(runner, "remote-jobs", "fsck", "--fix"), 2, "--fix")


# -- export to a file --------------------------------------------------------------------------

def test_export_to_a_file_is_private_and_complete(runner, producer, tmp_path):
    job_id = producer.create_id()
    target = tmp_path / "jobs.jsonl"
    result = run(runner, "remote-jobs", "export", "--output", str(target))
    assert result.exit_code == 0, result.output
    assert target.stat().st_mode & 0o777 == 0o600
    assert [json.loads(line)["id"] for line in target.read_text().splitlines()] == [job_id]


def test_export_to_a_directory_is_one_line_and_leaves_nothing(runner, producer, tmp_path):
    producer.create_id()
    exports = tmp_path / "exports"
    (exports / "out").mkdir(parents=True)
    assert_one_line_error(run(runner, "remote-jobs", "export", "--output", str(exports / "out")), 2, "directory")
    assert_one_line_error(run(runner, "remote-jobs", "export", "--output", str(exports / "none" / "x")), 1,
                          "could not write")
    assert [p.name for p in exports.iterdir()] == ["out"]
    assert not any((exports / "out").iterdir())
