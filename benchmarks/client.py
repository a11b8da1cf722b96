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
        self._served = 0     # responses read on the current connection
        self._received = 0   # bytes of the current response read so far

    def __enter__(self) -> "Api":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""
        self._served = 0

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        """Status and body. Sent again, once, only when a connection that had already served a
        response failed before a byte of this one came back: the server closed it while idle."""
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
            reused, self._received = self._served > 0, 0
            try:
                self._sock.sendall(message)
                answer = self._response(method)
            except (ClosedBeforeResponse, BrokenPipeError, ConnectionResetError):
                retry = attempt == 1 and reused and self._received == 0
                self.close()
                if not retry:
                    raise
                continue
            except BaseException:
                self.close()
                raise
            status, data, close = answer
            self._served += 1
            if close:
                self.close()
            return status, data
        raise AssertionError("unreachable")

    def _response(self, method: str) -> tuple[int, bytes, bool]:
        """Status, body, and whether the server closes the connection after it."""
        status, headers = self._head()
        while 100 <= status < 200 and status != 101:  # interim answers (100 Continue): the next one
            status, headers = self._head()
        length = headers.get(b"content-length")
        close = b"close" in {t.strip() for t in headers.get(b"connection", b"").split(b",")}
        if method == "HEAD" or status in (204, 304) or status < 200:
            body = b""
        elif b"chunked" in headers.get(b"transfer-encoding", b""):
            body = self._chunked()
        elif length is not None:
            body = self._exactly(int(length))
        else:  # delimited by the end of the connection
            body, close = self._to_end(), True
        return status, body, close

    def _head(self) -> tuple[int, dict[bytes, bytes]]:
        lines = self._until(b"\r\n\r\n", first=True).split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP status line: {lines[0][:80]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        return int(parts[1]), headers

    def _fill(self) -> bool:
        chunk = self._sock.recv(RECV)
        self._buf += chunk
        self._received += len(chunk)
        return bool(chunk)

    def _until(self, marker: bytes, first: bool = False) -> bytes:
        """The bytes before ``marker`` (consumed with it). ``first``: a header block's read."""
        while (end := self._buf.find(marker)) < 0:
            if not self._fill():
                if first and not self._buf and self._received == 0:
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
                while self._until(b"\r\n"):  # trailer lines, up to the empty one that ends them
                    pass
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

    def poll(self, worker_id: str, content_types: str = "audio", wait: float = 0, resources: str = "") -> dict:
        query = f"worker_id={worker_id}&content_types={content_types}&max_jobs=1"
        if wait:
            query += f"&wait={wait:g}"
        if resources:  # the worker's capabilities, e.g. gpu_memory_gb:24
            query += f"&resources={resources}"
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
