"""A small keep-alive HTTP/1.1 client on a plain socket: the benchmark's clients share the CPU with
the server under test, so they should cost it as little as possible (``http.client`` builds and
parses each message with far more Python: its email-style header parser alone cost the clients
about a fifth of a core at 100 cycles/s). It speaks only what the benchmark needs: one request at
a time, bodies by Content-Length or chunked, and a connection the server closed while it was idle
reopened once."""
from __future__ import annotations

import json
import socket
from typing import Any

RECV = 65536


class ClosedBeforeResponse(ConnectionError):
    """The server closed the connection before sending a byte of the response (an idle keep-alive
    connection it timed out): the request can be sent again on a new connection."""


class Api:
    def __init__(self, port: int, key: str, timeout: float = 60.0) -> None:
        self.port = port
        self.timeout = timeout
        self._headers = f"Host: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """Status and body; a connection the server closed while idle is reopened once."""
        head = f"{method} {path} HTTP/1.1\r\n{self._headers}"
        payload = b""
        if body is not None:
            payload = json.dumps(body).encode()
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        message = (head + "\r\n").encode() + payload
        for attempt in (1, 2):
            if self._sock is None:
                self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._sock.sendall(message)
                return self._response(method)
            except (ClosedBeforeResponse, BrokenPipeError, ConnectionResetError):
                self.close()
                if attempt == 2:
                    raise
            except BaseException:
                self.close()
                raise
        raise AssertionError("unreachable")

    def _response(self, method: str) -> tuple[int, bytes]:
        head = self._until(b"\r\n\r\n", first=True)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length: int | None = None
        chunked = close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                close = value == b"close"
        if method == "HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif chunked:
            body = self._chunked()
        elif length is not None:
            body = self._exactly(length)
        else:  # delimited by the end of the connection
            body, close = self._to_end(), True
        if close:
            self.close()
        return status, body

    def _fill(self) -> bool:
        chunk = self._sock.recv(RECV)
        self._buf += chunk
        return bool(chunk)

    def _until(self, marker: bytes, first: bool = False) -> bytes:
        """The bytes before ``marker`` (consumed with it). ``first``: the response's first read."""
        while (end := self._buf.find(marker)) < 0:
            if not self._fill():
                if first and not self._buf:
                    raise ClosedBeforeResponse("connection closed before the response")
                raise ConnectionError("connection closed in the middle of a response")
        data, self._buf = self._buf[:end], self._buf[end + len(marker):]
        return data

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                raise ConnectionError("connection closed in the middle of a body")
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self._until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                self._until(b"\r\n")  # no trailers are sent to us: the empty line that ends them
                return b"".join(parts)
            parts.append(self._exactly(size))
            self._exactly(2)

    def _to_end(self) -> bytes:
        while self._fill():
            pass
        data, self._buf = self._buf, b""
        return data

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
