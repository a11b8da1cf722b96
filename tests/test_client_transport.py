"""The transport in process, against a small stdlib HTTP server on loopback: connections do not
outlive the threads that made them, what is retried and what is not, and JSON bodies."""
from __future__ import annotations

import gc
import os
import threading
import time

from morag_remote.client import Client, DownloadStopped, RetryPolicy
from support.loopback import answer, loopback  # noqa: F401 - a fixture


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


def trickle(handler, method, body):
    """GET: announces 10 MB and sends 1 KiB every 20 ms; anything else: 200 {}."""
    if method != "GET":
        return answer(handler, 200, {"job_id": "job-1", "status": "pending"})
    handler.send_response(200)
    handler.send_header("Content-Length", str(10 * 1024 * 1024))
    handler.end_headers()
    try:
        for _ in range(10 * 1024):
            handler.wfile.write(b"x" * 1024)
            handler.wfile.flush()
            time.sleep(0.02)
    except OSError:
        pass


def test_a_download_stops_between_chunks_when_told(loopback, tmp_path):
    server = loopback(trickle)
    client = Client(server.url, "k")
    stop, raised = threading.Event(), []

    def fetch() -> None:
        try:
            client.download("/f", str(tmp_path / "f"), stop=stop)
        except Exception as exc:  # noqa: BLE001 - what it ends in is the point
            raised.append(exc)

    thread = threading.Thread(target=fetch)
    thread.start()
    time.sleep(0.3)
    stop.set()
    thread.join(3)
    assert not thread.is_alive() and [type(e) for e in raised] == [DownloadStopped]
    assert not list(tmp_path.iterdir())  # the .part is gone
