"""Test helpers that speak the API the way real callers do: ``ProducerActions``, ``WorkerActions``,
``auth`` headers, and a clock the test moves by hand."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any


class FakeClock:
    """A clock the test moves by hand (the service reads time only through it)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class ProducerActions:
    def __init__(self, client, key: str, sources: Path) -> None:
        self.client = client
        self.headers = auth(key)
        self.sources = sources

    def source(self, name: str = "input.mp3", data: bytes = b"RIFF-fake-audio" * 64) -> Path:
        path = self.sources / name
        path.write_bytes(data)
        return path

    def create(self, content_type: str = "audio", name: str | None = None, **extra: Any):
        path = self.source(name or f"{content_type}-{len(list(self.sources.iterdir()))}.bin")
        body = {"source_file_path": str(path), "content_type": content_type,
                "ingestion_task_id": extra.pop("ingestion_task_id", "ingest-1"), **extra}
        return self.client.post("/api/v1/remote-jobs/", json=body, headers=self.headers)

    def create_id(self, content_type: str = "audio", **extra: Any) -> str:
        response = self.create(content_type, **extra)
        assert response.status_code == 201, response.json
        return response.json["job_id"]

    def get(self, job_id: str):
        return self.client.get(f"/api/v1/remote-jobs/{job_id}", headers=self.headers)

    def status(self, job_id: str):
        return self.client.get(f"/api/v1/remote-jobs/{job_id}/status", headers=self.headers)

    def cancel(self, job_id: str):
        return self.client.post(f"/api/v1/remote-jobs/{job_id}/cancel", headers=self.headers)

    def retry(self, job_id: str):
        return self.client.post(f"/api/v1/remote-jobs/{job_id}/retry", headers=self.headers)


class WorkerActions:
    def __init__(self, client, key: str, worker_id: str = "w1") -> None:
        self.client = client
        self.headers = auth(key)
        self.worker_id = worker_id

    def poll(self, content_types: str = "audio,video", max_jobs: int = 1, **params: Any):
        query = {"worker_id": self.worker_id, "content_types": content_types, "max_jobs": max_jobs, **params}
        return self.client.get("/api/v1/remote-jobs/poll", query_string=query, headers=self.headers)

    def claim(self, content_types: str = "audio,video") -> dict:
        response = self.poll(content_types)
        assert response.status_code == 200, response.json
        assert response.json["job_id"], "nothing was claimed"
        return response.json["jobs"][0]

    def download(self, url: str, **headers: str):
        return self.client.get(url, headers={**self.headers, **headers})

    def heartbeat(self, job_id: str, **body: Any):
        return self.client.post(f"/api/v1/remote-jobs/{job_id}/heartbeat", json=body, headers=self.headers)

    def release(self, job_id: str, **body: Any):
        return self.client.post(f"/api/v1/remote-jobs/{job_id}/release", json=body, headers=self.headers)

    def result(self, job_id: str, success: bool = True, **body: Any):
        payload = {"success": success, **body}
        if success:
            payload.setdefault("content", "transcript")
            payload.setdefault("metadata", {"lang": "en"})
            payload.setdefault("processing_time", 1.25)
        return self.client.put(f"/api/v1/remote-jobs/{job_id}/result", json=payload, headers=self.headers)


