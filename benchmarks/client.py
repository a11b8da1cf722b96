"""A small keep-alive HTTP client (``http.client``): the benchmark's clients should cost the shared
CPU as little as possible, so that what is measured is the server."""
from __future__ import annotations

import http.client
import json
from typing import Any


class Api:
    def __init__(self, port: int, key: str, timeout: float = 60.0) -> None:
        self.port = port
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """Status and body; a connection the server closed while idle is reopened once."""
        payload = json.dumps(body).encode() if body is not None else None
        for attempt in (1, 2):
            try:
                self.conn.request(method, path, body=payload, headers=self.headers)
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        status, raw = self.request(method, path, body)
        if status != expect:
            raise BadStatus(method, path, status, raw)
        return json.loads(raw) if raw else None

    # -- the calls a producer and a worker make ---------------------------------------------------

    def create(self, source: str, content_type: str = "audio") -> str:
        body = {"source_file_path": source, "content_type": content_type, "ingestion_task_id": "bench"}
        return self.json("POST", "/api/v1/remote-jobs/", body, expect=201)["job_id"]

    def poll(self, worker_id: str, content_types: str = "audio", wait: float = 0) -> dict:
        query = f"worker_id={worker_id}&content_types={content_types}&max_jobs=1"
        if wait:
            query += f"&wait={wait:g}"
        return self.json("GET", f"/api/v1/remote-jobs/poll?{query}")

    def download(self, url: str) -> bytes:
        status, raw = self.request("GET", url)
        if status != 200:
            raise BadStatus("GET", url, status, raw)
        return raw

    def result(self, job_id: str) -> dict:
        body = {"success": True, "content": "converted", "metadata": {"bench": True}, "processing_time": 0.01}
        return self.json("PUT", f"/api/v1/remote-jobs/{job_id}/result", body)


class BadStatus(Exception):
    def __init__(self, method: str, path: str, status: int, body: bytes) -> None:
        super().__init__(f"{method} {path.split('?')[0]} -> {status}: {body[:200]!r}")
        self.status = status
