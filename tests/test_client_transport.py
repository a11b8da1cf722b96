"""The transport in process, against a small stdlib HTTP server on loopback: connections do not
outlive the threads that made them, what is retried and what is not, and JSON bodies."""
from __future__ import annotations

import gc
import os
import threading
import time

from morag_remote.client import Client, RetryPolicy
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
