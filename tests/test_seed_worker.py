"""A worker written against the original specification works unchanged."""
from __future__ import annotations


def test_poll_with_nothing_pending_returns_seed_fields_all_null(worker):
    response = worker.poll()
    assert response.status_code == 200
    body = response.json
    assert {k: body[k] for k in ("job_id", "source_file_url", "content_type", "task_options")} == \
        {"job_id": None, "source_file_url": None, "content_type": None, "task_options": None}
    assert body["jobs"] == []


def test_seed_worker_cycle_create_poll_download_result(producer, worker, instance_path):
    source = producer.source("talk.mp3", b"\x00\x01binary audio\xff" * 1000)
    created = producer.client.post("/api/v1/remote-jobs/", headers=producer.headers, json={
        "source_file_path": str(source), "content_type": "audio",
        "task_options": {"language": "en"}, "ingestion_task_id": "ingest-42"})
    assert created.status_code == 201
    job_id = created.json["job_id"]
    assert created.headers["Location"].endswith(f"/api/v1/remote-jobs/{job_id}")
    assert created.json["status"] == "pending"
    assert created.json["created_at"].endswith(("Z", "+00:00"))

    polled = worker.poll("audio,video", max_jobs=1).json
    assert polled["job_id"] == job_id
    assert polled["content_type"] == "audio"
    assert polled["task_options"] == {"language": "en"}
    assert polled["source_file_url"].startswith(f"/api/v1/remote-jobs/{job_id}/download")

    downloaded = worker.download(polled["source_file_url"])
    assert downloaded.status_code == 200
    assert downloaded.data == source.read_bytes()
    assert downloaded.headers["Content-Length"] == str(len(source.read_bytes()))
    assert "talk.mp3" in downloaded.headers["Content-Disposition"]

    result = worker.client.put(f"/api/v1/remote-jobs/{job_id}/result", headers=worker.headers, json={
        "success": True, "content": "hello world", "metadata": {"duration": 3.5}, "processing_time": 12.5})
    assert result.status_code == 200
    assert result.json == {"status": "completed", "ingestion_continued": False}

    job = producer.get(job_id).json
    assert job["status"] == "completed"
    assert job["result_data"] == {"content": "hello world", "metadata": {"duration": 3.5}, "processing_time": 12.5}
    status = producer.status(job_id).json
    assert status["status"] == "completed" and status["job_id"] == job_id
