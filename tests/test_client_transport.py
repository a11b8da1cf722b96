"""The transport in process, against a small stdlib HTTP server on loopback: connections do not
outlive the threads that made them, what is retried and what is not, and JSON bodies."""
from __future__ import annotations

import gc
import http.server
import json
import os
import threading
import time
from typing import Any, Callable

import pytest

from morag_remote.client import Client, RetryPolicy


class Loopback:
    """A ThreadingHTTPServer whose answers ``respond(handler, method, body)`` decides; every
    request is recorded as (method, path, parsed JSON body or raw bytes)."""

    def __init__(self, respond: Callable[[http.server.BaseHTTPRequestHandler, str, Any], None]) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                outer.requests.append((self.command, self.path, body))
                respond(self, self.command, body)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(handler: http.server.BaseHTTPRequestHandler, status: int, body: Any = None,
           headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body if body is not None else {}).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def loopback():
    servers: list[Loopback] = []

    def start(respond) -> Loopback:
        servers.append(Loopback(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_thread_that_ends_leaves_no_connection_open(loopback):
    server = loopback(lambda h, m, b: answer(h, 200, {"totals": {}}))
    client = Client(server.url, "k")
    client.stats()  # the server's own threads and sockets settle
    before = open_fds()
    for _ in range(60):
        thread = threading.Thread(target=client.stats)
        thread.start()
        thread.join()
    gc.collect()
    deadline = time.monotonic() + 5
    while open_fds() > before + 4 and time.monotonic() < deadline:
        time.sleep(0.05)  # the server's side closes once it sees the end of each connection
    assert open_fds() <= before + 4
    assert len(client.transport._live) <= 1
    client.close()
