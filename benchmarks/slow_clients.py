"""Slow clients: how many connections that send a request a byte a second it takes to stall a
default host (gthread: a connection holds a thread while its request is read).

Connections are opened in steps; after each step a normal request (``GET /health``) must be answered
within ``PROBE_TIMEOUT``. The figure is the number of slow connections at which it was not. Every
slow connection sends one byte a second and is closed at the end; bounded in count and time.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Any

from .server import Instance, Server

PROBE_TIMEOUT = 3.0
REQUEST = b"POST /api/v1/remote-jobs/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"


def _probe(port: int) -> float | None:
    """Seconds /health took, or None when it was not answered within PROBE_TIMEOUT."""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PROBE_TIMEOUT) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            if not sock.recv(64).startswith(b"HTTP/1.1"):
                return None
    except OSError:
        return None
    return time.monotonic() - started


def stall_point(instance: Instance, step: int = 32, limit: int = 640, env: dict[str, str] | None = None) -> dict[str, Any]:
    stop = threading.Event()
    sockets: list[socket.socket] = []
    lock = threading.Lock()

    def trickle() -> None:
        offset = 0
        while not stop.wait(1.0) and offset < len(REQUEST):
            with lock:
                alive = list(sockets)
            for sock in alive:
                try:
                    sock.send(REQUEST[offset:offset + 1])
                except OSError:
                    pass
            offset += 1

    with Server(instance, instance.data_dir("slow-clients"), env=env) as server:
        threading.Thread(target=trickle, daemon=True).start()
        stalled_at, probes = None, []
        try:
            for count in range(step, limit + 1, step):
                for _ in range(step):
                    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
                    sock.send(REQUEST[:1])
                    with lock:
                        sockets.append(sock)
                time.sleep(1.5)
                took = _probe(server.port)
                probes.append({"slow_connections": count, "health_ms": round(took * 1000, 1) if took else None})
                if took is None:
                    stalled_at = count
                    break
        finally:
            stop.set()
            for sock in sockets:
                sock.close()
        recovered = None
        for _ in range(20):
            if _probe(server.port) is not None:
                recovered = True
                break
            time.sleep(0.5)
        return {"workers": server.workers, "stalled_at": stalled_at, "limit": limit, "probes": probes,
                "answers_again_after_they_close": bool(recovered)}
