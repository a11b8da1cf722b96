"""A small stdlib HTTP server on loopback whose answers a test decides, for the client's and the
worker's in-process tests."""
from __future__ import annotations

import http.server
import json
import threading
from typing import Any, Callable



class Loopback:
    """A ThreadingHTTPServer whose answers ``respond(handler, method, body)`` decides; every
    request is recorded as (method, path, parsed JSON body or raw bytes)."""

    def __init__(self, respond: Callable[[http.server.BaseHTTPRequestHandler, str, Any], None]) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.raw: list[bytes] = []
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
                outer.raw.append(raw)
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
