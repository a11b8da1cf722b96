"""The remote-jobs API end to end through the Flask test client: create, poll, download, result,
status, get-one, list, and the health check."""
from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from support.actions import auth
from morag_remote import create_app
from morag_remote.store.base import JobFilter

BASE = "/api/v1/remote-jobs"


def _job_files(data_dir: Path, job_id: str) -> list[str]:
    """The status directories that hold a file for ``job_id``."""
    return sorted(p.parent.name for p in data_dir.glob(f"*/{job_id}.json"))


# -- create ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [BASE, BASE + "/"])
def test_create_answers_201_with_location_with_or_without_trailing_slash(producer, path):
    source = producer.source("a.wav")
    response = producer.client.post(path, headers=producer.headers, json={
        "source_file_path": str(source), "content_type": "audio", "ingestion_task_id": "t-1"})
    assert response.status_code == 201
    job_id = response.json["job_id"]
    assert response.headers["Location"] == f"{BASE}/{job_id}"
    assert response.json["status"] == "pending"
    assert producer.client.get(response.headers["Location"], headers=producer.headers).json["id"] == job_id


@pytest.mark.files_only
def test_create_stores_the_job_as_one_file_in_the_pending_directory(producer, app):
    job_id = producer.create_id("video", task_options={"lang": "de"}, priority=3, max_retries=5)
    data_dir = Path(app.config["JOBS_DATA_DIR"])
    assert _job_files(data_dir, job_id) == ["pending"]
    job = producer.get(job_id).json
    assert (job["task_options"], job["priority"], job["max_retries"], job["retry_count"]) == \
        ({"lang": "de"}, 3, 5, 0)


def test_create_uses_the_configured_default_max_retries(producer):
    assert producer.get(producer.create_id()).json["max_retries"] == 3


def test_create_with_a_relative_path_resolves_it_in_the_first_source_root(producer, worker):
    producer.source("relative.mp3", b"relative bytes")
    response = producer.client.post(BASE, headers=producer.headers, json={
        "source_file_path": "relative.mp3", "content_type": "audio", "ingestion_task_id": "t"})
    assert response.status_code == 201
    assert worker.download(worker.claim()["source_file_url"]).data == b"relative bytes"


# -- poll --------------------------------------------------------------------------------------


def test_poll_by_get_with_a_comma_list(producer, worker):
    job_id = producer.create_id("video")
    body = worker.poll("audio, video").json
    assert body["job_id"] == job_id
    assert [j["job_id"] for j in body["jobs"]] == [job_id]


def test_poll_by_post_with_a_json_list(producer, worker):
    job_id = producer.create_id("video")
    response = worker.client.post(f"{BASE}/poll", headers=worker.headers, json={
        "worker_id": "w1", "content_types": ["audio", "video"], "max_jobs": 1})
    assert response.status_code == 200
    assert response.json["job_id"] == job_id


def test_poll_by_post_with_a_comma_list(producer, worker):
    job_id = producer.create_id("audio")
    response = worker.client.post(f"{BASE}/poll", headers=worker.headers, json={
        "worker_id": "w1", "content_types": "audio,video"})
    assert response.json["job_id"] == job_id


def test_poll_claimed_job_carries_lease_timeout_and_retry_count(producer, worker, clock):
    producer.create_id("audio")
    job = worker.poll().json["jobs"][0]
    assert set(job) == {"job_id", "source_file_url", "content_type", "task_options", "lease_id",
                        "timeout_at", "retry_count", "source_size", "source_sha256"}
    assert job["lease_id"]
    assert job["retry_count"] == 0
    assert datetime.fromisoformat(job["timeout_at"]) == clock.now + timedelta(seconds=1800)


def test_poll_returns_every_job_it_claims_up_to_max_jobs(producer, worker, service):
    created = [producer.create_id("audio") for _ in range(5)]
    body = worker.poll("audio", max_jobs=3).json
    returned = [j["job_id"] for j in body["jobs"]]
    assert returned == created[:3]
    assert body["job_id"] == returned[0]
    processing = service.list(JobFilter(status="processing"), None, 100)[0]
    assert sorted(j.id for j in processing) == sorted(returned)
    assert all(j.worker_id == "w1" for j in processing)
    assert len(service.list(JobFilter(status="pending"), None, 100)[0]) == 2


def test_poll_max_jobs_above_what_is_pending_returns_what_there_is(producer, worker):
    created = [producer.create_id("audio") for _ in range(2)]
    body = worker.poll("audio", max_jobs=5).json
    assert [j["job_id"] for j in body["jobs"]] == created


def test_poll_skips_content_types_the_worker_does_not_take(producer, worker, service):
    document = producer.create_id("document")
    audio = producer.create_id("audio")
    assert [j["job_id"] for j in worker.poll("audio,video", max_jobs=5).json["jobs"]] == [audio]
    assert service.get(document).status == "pending"
    assert worker.poll("audio,video").json["job_id"] is None


def test_poll_is_fifo_by_creation_time(producer, worker, clock):
    first = producer.create_id("audio")
    clock.advance(1)
    second = producer.create_id("video")
    clock.advance(1)
    third = producer.create_id("audio")
    order = [worker.poll("audio,video").json["job_id"] for _ in range(3)]
    assert order == [first, second, third]


def test_poll_takes_higher_priority_first_then_oldest(producer, worker, clock):
    low = producer.create_id("audio", priority=0)
    clock.advance(1)
    high = producer.create_id("audio", priority=10)
    clock.advance(1)
    low_later = producer.create_id("audio", priority=0)
    assert [j["job_id"] for j in worker.poll("audio", max_jobs=3).json["jobs"]] == [high, low, low_later]


@pytest.mark.files_only
def test_poll_order_ignores_file_modification_times(producer, clock, app, keys, client):
    """A new process rebuilds its index from the files: order still comes from created_at."""
    older = producer.create_id("audio")
    clock.advance(60)
    newer = producer.create_id("audio")
    data_dir = Path(app.config["JOBS_DATA_DIR"])
    os.utime(data_dir / "pending" / f"{older}.json", (2_000_000_000, 2_000_000_000))
    os.utime(data_dir / "pending" / f"{newer}.json", (1_000_000_000, 1_000_000_000))
    fresh = create_app({"TESTING": True, "INSTANCE_PATH": app.instance_path, "LOG_JSON": True})
    response = fresh.test_client().get(f"{BASE}/poll", headers=auth(keys["worker"]),
                                       query_string={"worker_id": "w9", "content_types": "audio"})
    assert response.json["job_id"] == older


def test_poll_with_nothing_pending_claims_nothing(worker, producer, service):
    producer.create_id("document")
    body = worker.poll("audio").json
    assert body["jobs"] == []
    assert body["job_id"] is None


def test_a_claimed_job_is_not_handed_to_a_second_worker(producer, worker, worker2):
    job_id = producer.create_id("audio")
    assert worker.poll("audio").json["job_id"] == job_id
    assert worker2.poll("audio").json["job_id"] is None


# -- download ----------------------------------------------------------------------------------


PAYLOAD = bytes(range(256)) * 40  # 10240 bytes, every byte value


@pytest.fixture
def claimed(producer, worker) -> dict:
    producer.source("talk.flac", PAYLOAD)
    response = producer.client.post(BASE, headers=producer.headers, json={
        "source_file_path": str(producer.sources / "talk.flac"), "content_type": "audio",
        "ingestion_task_id": "t"})
    assert response.status_code == 201
    return worker.claim("audio")


def test_download_streams_the_exact_bytes_with_length_and_disposition(worker, claimed):
    response = worker.download(claimed["source_file_url"])
    assert response.status_code == 200
    assert response.data == PAYLOAD
    assert response.headers["Content-Length"] == str(len(PAYLOAD))
    assert response.headers["Content-Disposition"] == "attachment; filename=talk.flac"
    assert response.headers["Accept-Ranges"] == "bytes"


def test_download_range_answers_206_with_content_range(worker, claimed):
    response = worker.download(claimed["source_file_url"], Range="bytes=100-1099")
    assert response.status_code == 206
    assert response.data == PAYLOAD[100:1100]
    assert response.headers["Content-Range"] == f"bytes 100-1099/{len(PAYLOAD)}"
    assert response.headers["Content-Length"] == "1000"


def test_download_open_ended_range_resumes_to_the_end(worker, claimed):
    response = worker.download(claimed["source_file_url"], Range="bytes=10000-")
    assert response.status_code == 206
    assert response.data == PAYLOAD[10000:]


def test_download_unsatisfiable_range_is_416_problem(worker, claimed):
    response = worker.download(claimed["source_file_url"], Range=f"bytes={len(PAYLOAD) + 10}-")
    assert response.status_code == 416
    assert response.content_type == "application/problem+json"
    assert response.json["status"] == 416
    assert response.headers["Content-Range"] == f"bytes */{len(PAYLOAD)}"


def test_download_with_lease_header_instead_of_token(worker, claimed):
    job_id = claimed["job_id"]
    response = worker.client.get(f"{BASE}/{job_id}/download",
                                 headers={**worker.headers, "X-Lease-Id": claimed["lease_id"]})
    assert response.status_code == 200
    assert response.data == PAYLOAD


def test_download_without_token_or_lease_is_refused(worker, claimed):
    response = worker.client.get(f"{BASE}/{claimed['job_id']}/download", headers=worker.headers)
    assert response.status_code == 403
    assert response.content_type == "application/problem+json"


def test_download_with_a_token_of_another_job_is_refused(producer, worker, claimed):
    producer.create_id("audio")
    other = worker.claim("audio")
    token = claimed["source_file_url"].split("token=", 1)[1]
    response = worker.client.get(f"{BASE}/{other['job_id']}/download?token={token}", headers=worker.headers)
    assert response.status_code == 403


def test_download_of_a_source_removed_after_create_is_404(worker, claimed, producer):
    (producer.sources / "talk.flac").unlink()
    response = worker.download(claimed["source_file_url"])
    assert response.status_code == 404
    assert response.json["title"] == "Source file not found"


def test_download_by_admin_needs_no_token(claimed, client, admin_headers):
    response = client.get(f"{BASE}/{claimed['job_id']}/download", headers=admin_headers)
    assert response.status_code == 200
    assert response.data == PAYLOAD


# -- result, status, get-one -------------------------------------------------------------------


def test_result_success_completes_and_get_one_returns_result_data(producer, worker, claimed, clock):
    clock.advance(42)
    response = worker.result(claimed["job_id"], content="text", metadata={"pages": 2}, processing_time=41.5)
    assert response.status_code == 200
    assert response.json == {"status": "completed", "ingestion_continued": False}
    job = producer.get(claimed["job_id"]).json
    assert job["status"] == "completed"
    assert job["result_data"] == {"content": "text", "metadata": {"pages": 2}, "processing_time": 41.5}
    assert datetime.fromisoformat(job["completed_at"]) == clock.now


def test_result_failure_with_retries_left_requeues(producer, worker, claimed):
    response = worker.result(claimed["job_id"], success=False, error_message="CUDA out of memory")
    assert response.status_code == 200
    assert response.json["status"] == "pending"
    job = producer.get(claimed["job_id"]).json
    assert (job["retry_count"], job["error_message"]) == (1, "CUDA out of memory")


def test_result_failure_not_retryable_fails_the_job(producer, worker, claimed):
    response = worker.result(claimed["job_id"], success=False, error_message="bad file", retryable=False)
    assert response.json["status"] == "failed"


def test_result_resubmitted_identically_is_idempotent(worker, claimed):
    first = worker.result(claimed["job_id"])
    again = worker.result(claimed["job_id"])
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json["status"] == "completed"


def test_result_for_a_job_not_held_is_409(producer, worker):
    job_id = producer.create_id("audio")
    response = worker.result(job_id)
    assert response.status_code == 409
    assert producer.get(job_id).json["status"] == "pending"


def test_result_ignores_extra_fields_a_seed_worker_may_send(worker, claimed):
    response = worker.result(claimed["job_id"], worker_id="w1", extra_field={"x": 1})
    assert response.status_code == 200


def test_status_reports_the_seed_fields_and_progress(producer, worker, claimed):
    status = producer.status(claimed["job_id"]).json
    assert status["job_id"] == claimed["job_id"]
    assert status["status"] == "processing"
    assert status["worker_id"] == "w1"
    assert status["content_type"] == "audio"
    assert status["timeout_at"] == claimed["timeout_at"]
    assert status["estimated_completion"] is not None
    for name in ("created_at", "started_at", "completed_at", "error_message", "retry_count",
                 "max_retries", "progress"):
        assert name in status


def test_status_is_readable_with_a_worker_key(worker, claimed):
    response = worker.client.get(f"{BASE}/{claimed['job_id']}/status", headers=worker.headers)
    assert response.status_code == 200


def test_get_one_of_an_unknown_job_is_404(producer):
    response = producer.get("0190d6a0-0000-7000-8000-000000000000")
    assert response.status_code == 404
    assert response.content_type == "application/problem+json"


# -- list --------------------------------------------------------------------------------------


def test_list_walks_every_page_without_duplicates_or_gaps(producer):
    created = [producer.create_id("audio") for _ in range(23)]
    seen: list[str] = []
    cursor = None
    for _ in range(10):
        query = {"limit": 5, **({"cursor": cursor} if cursor else {})}
        page = producer.client.get(BASE, headers=producer.headers, query_string=query).json
        assert len(page["jobs"]) <= 5
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == created


def test_list_last_full_page_has_no_next_cursor(producer):
    for _ in range(4):
        producer.create_id("audio")
    page = producer.client.get(BASE + "/", headers=producer.headers, query_string={"limit": 4}).json
    assert len(page["jobs"]) == 4
    assert page["next_cursor"] is None


def test_list_filters_by_status_content_type_task_and_worker(producer, worker):
    audio = producer.create_id("audio", ingestion_task_id="task-a")
    video = producer.create_id("video", ingestion_task_id="task-b")
    doc = producer.create_id("document", ingestion_task_id="task-a")
    worker.poll("video")

    def ids(**query) -> list[str]:
        response = producer.client.get(BASE, headers=producer.headers, query_string=query)
        assert response.status_code == 200, response.json
        return [j["id"] for j in response.json["jobs"]]

    assert ids(status="pending") == [audio, doc]
    assert ids(status="processing") == [video]
    assert ids(content_type="document") == [doc]
    assert ids(ingestion_task_id="task-a") == [audio, doc]
    assert ids(worker_id="w1") == [video]
    assert ids(status="pending", ingestion_task_id="task-b") == []


def test_list_filtered_pages_hold_only_matching_jobs(producer):
    wanted = []
    for i in range(12):
        job_id = producer.create_id("audio" if i % 3 else "video")
        if i % 3:
            wanted.append(job_id)
    seen, cursor = [], None
    for _ in range(10):
        query = {"limit": 3, "content_type": "audio", **({"cursor": cursor} if cursor else {})}
        page = producer.client.get(BASE, headers=producer.headers, query_string=query).json
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == wanted


def test_list_carries_no_result_bodies(producer, worker, claimed):
    worker.result(claimed["job_id"])
    job = producer.client.get(BASE, headers=producer.headers).json["jobs"][0]
    assert "result_data" not in job
    assert job["status"] == "completed"


def test_list_with_an_unknown_status_is_422(producer):
    response = producer.client.get(BASE, headers=producer.headers, query_string={"status": "done"})
    assert response.status_code == 422
    assert "status" in response.json["errors"]


# -- timestamps --------------------------------------------------------------------------------


TIME_FIELDS = ("created_at", "started_at", "completed_at", "timeout_at", "available_at", "updated_at")


def _assert_aware_utc(value: str) -> None:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0), value


@pytest.mark.files_only
def test_every_timestamp_in_responses_and_files_is_aware_utc_iso8601(producer, worker, claimed, app):
    worker.result(claimed["job_id"])
    job = producer.get(claimed["job_id"]).json
    status = producer.status(claimed["job_id"]).json
    listed = producer.client.get(BASE, headers=producer.headers).json["jobs"][0]
    for body in (job, status, listed):
        for name in TIME_FIELDS:
            if body.get(name) is not None:
                _assert_aware_utc(body[name])
    _assert_aware_utc(claimed["timeout_at"])
    stored = (Path(app.config["JOBS_DATA_DIR"]) / "completed" / f"{claimed['job_id']}.json").read_text()
    record = json.loads(stored)
    for name in TIME_FIELDS:
        if record.get(name) is not None:
            _assert_aware_utc(record[name].replace("Z", "+00:00"))


def test_create_response_created_at_has_an_offset(producer):
    _assert_aware_utc(producer.create().json["created_at"])


# -- health ------------------------------------------------------------------------------------


def test_health_is_200_without_a_key_when_the_store_is_writable(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "store": "writable", "detail": "ready"}


@pytest.mark.files_only
def test_health_is_503_when_the_data_dir_is_replaced_by_a_file(client, app):
    """A lost volume: the data directory is gone and a file stands where it was."""
    data_dir = Path(app.config["JOBS_DATA_DIR"])
    moved = data_dir.with_name("moved-away")
    data_dir.rename(moved)
    data_dir.write_text("not a directory")
    try:
        response = client.get("/health")
        assert response.status_code == 503
        assert response.content_type == "application/problem+json"
        assert response.json["title"] == "Store unavailable"
        assert response.json["detail"].startswith("the job store is not writable")
    finally:
        data_dir.unlink()
        moved.rename(data_dir)
    assert client.get("/health").status_code == 200


@pytest.mark.files_only
def test_health_is_503_when_the_data_dir_is_read_only(client, app):
    data_dir = Path(app.config["JOBS_DATA_DIR"])
    data_dir.chmod(0o500)
    try:
        try:
            (data_dir / "probe").touch()
        except PermissionError:
            pass
        else:
            (data_dir / "probe").unlink()
            pytest.skip("this user bypasses file permissions (root): see the replaced-by-a-file test")
        response = client.get("/health")
        assert response.status_code == 503
    finally:
        data_dir.chmod(0o700)


# -- source confinement at download time ---------------------------------------------------------


def test_download_refuses_a_source_swapped_for_a_symlink_out_of_the_roots(producer, worker, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    job_id = producer.create_id("audio", name="swap.mp3")
    url = worker.claim("audio")["source_file_url"]
    source = producer.sources / "swap.mp3"
    source.unlink()
    source.symlink_to(secret)
    response = worker.download(url)
    assert response.status_code == 403
    assert b"private" not in response.data
    assert producer.get(job_id).json["status"] == "processing"


def test_download_refuses_a_source_whose_directory_now_leads_out_of_the_roots(producer, worker, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "clip.mp3").write_text("private")
    inner = producer.sources / "inner"
    inner.mkdir()
    (inner / "clip.mp3").write_text("public")
    response = producer.client.post(BASE, headers=producer.headers, json={
        "source_file_path": str(inner / "clip.mp3"), "content_type": "audio", "ingestion_task_id": "t"})
    assert response.status_code == 201
    url = worker.claim("audio")["source_file_url"]
    (inner / "clip.mp3").unlink()
    inner.rmdir()
    inner.symlink_to(outside)
    response = worker.download(url)
    assert response.status_code == 403
    assert b"private" not in response.data


def test_create_refuses_a_symlink_that_leads_out_of_the_roots(producer, tmp_path):
    (tmp_path / "elsewhere.mp3").write_text("x")
    (producer.sources / "link.mp3").symlink_to(tmp_path / "elsewhere.mp3")
    response = producer.client.post(BASE, headers=producer.headers, json={
        "source_file_path": str(producer.sources / "link.mp3"), "content_type": "audio",
        "ingestion_task_id": "t"})
    assert response.status_code == 422


def test_create_refuses_a_directory(producer):
    (producer.sources / "folder").mkdir()
    response = producer.client.post(BASE, headers=producer.headers, json={
        "source_file_path": str(producer.sources / "folder"), "content_type": "audio",
        "ingestion_task_id": "t"})
    assert response.status_code == 422
    assert response.json["errors"] == {"source_file_path": ["not a regular file"]}
