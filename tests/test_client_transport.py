"""The transport and downloads in process, against a small stdlib HTTP server on loopback:
connections do not outlive the threads that made them, what is retried and what is not, and how a
download stops, resumes and fails."""
from __future__ import annotations

import gc
import os
import threading
import time

import pytest

from morag_remote.client import (Client, ConnectionFailed, DownloadError, DownloadStopped, RetryPolicy,
                                 ServiceUnavailable)
from support.loopback import answer


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


def in_thread(call) -> tuple[threading.Thread, list[BaseException]]:
    """``call`` started on a thread of its own, and the list that will hold what it raised."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - what it ends in is the point
            raised.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, raised


def test_a_download_stops_between_chunks_when_told(loopback, tmp_path):
    server = loopback(trickle)
    client = Client(server.url, "k")
    stop = threading.Event()
    thread, raised = in_thread(lambda: client.download("/f", str(tmp_path / "f"), stop=stop))
    time.sleep(0.3)
    stop.set()
    thread.join(3)
    assert not thread.is_alive() and [type(e) for e in raised] == [DownloadStopped]
    assert not list(tmp_path.iterdir())  # the .part is gone


def test_an_aborted_long_poll_is_not_sent_again(loopback):
    def respond(handler, method, body):
        time.sleep(body["wait"])
        answer(handler, 200, {"jobs": []})

    server = loopback(respond)
    client = Client(server.url, "k")
    stop = threading.Event()
    client.poll("w", ["audio"], wait=0)  # the connection is reused by the next poll
    thread, raised = in_thread(lambda: client.poll("w", ["audio"], wait=1.5, stop=stop))
    time.sleep(0.5)
    stop.set()
    client.abort()
    thread.join(5)
    time.sleep(0.3)
    assert [b["wait"] for m, p, b in server.requests] == [0, 1.5]
    assert [type(e).__name__ for e in raised] == ["ConnectionFailed"]


def test_a_poll_on_a_connection_the_server_closed_while_idle_is_not_resent(loopback):
    """The server may have read the poll and claimed before the connection broke: a poll is
    never resent once its bytes went out (its jobs would come back only when their leases lapse)."""
    def respond(handler, method, body):
        if len(server.requests) == 2:
            handler.close_connection = True
            handler.connection.shutdown(2)  # read, then gone without an answer
            return
        answer(handler, 200, {"jobs": []})

    server = loopback(respond)
    client = Client(server.url, "k")
    client.poll("w", ["audio"])
    with pytest.raises(ConnectionFailed):
        client.poll("w", ["audio"])
    assert len(server.requests) == 2


def test_a_connection_the_server_closed_while_idle_is_replaced_before_a_poll(loopback):
    def respond(handler, method, body):
        answer(handler, 200, {"jobs": []})
        handler.close_connection = True  # as a keep-alive timeout would, after the answer

    server = loopback(respond)
    client = Client(server.url, "k")
    tries = []
    once = client.transport._once
    client.transport._once = lambda *a, **k: tries.append(once(*a, **k)) or tries[-1]
    client.poll("w", ["audio"])
    time.sleep(0.2)
    assert client.poll("w", ["audio"]) == []
    assert len(server.requests) == 2
    # seen closed before the poll was written (on a real network the write would succeed and the
    # answer be lost, which a poll could not retry)
    assert [t.error for t in tries] == [None, None]


@pytest.mark.parametrize("status, retried", [(502, False), (504, False), (503, True), (429, True)])
def test_a_call_that_may_not_be_resent_is_retried_only_when_the_server_says_it_did_nothing(
        loopback, status, retried):
    """502/504 come from a proxy whose upstream may have acted; 503 and 429 say it did not."""
    def respond(handler, method, body):
        if len(server.requests) == 1:
            return answer(handler, status, {"detail": "busy"})
        answer(handler, 200, {"job_id": "j", "status": "cancelled"})

    server = loopback(respond)
    client = Client(server.url, "k", retry=RetryPolicy(attempts=3, base=0.001))
    if retried:
        assert client.cancel("j").status == "cancelled"
    else:
        with pytest.raises(ServiceUnavailable):
            client.cancel("j")
    assert len(server.requests) == (2 if retried else 1)


def serve_file(data: bytes, cut_first_at: int | None = None, total_on_resume: int | None = None):
    """GET: ``data`` (the first answer cut after ``cut_first_at`` bytes); a Range request is answered
    206 with a Content-Range whose total is ``total_on_resume`` (default: the true size)."""
    calls = []

    def respond(handler, method, body):
        calls.append(handler.headers.get("Range"))
        wanted = handler.headers.get("Range")
        if wanted:
            start = int(wanted.split("=")[1].rstrip("-"))
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{total_on_resume or len(data)}")
            handler.send_header("Content-Length", str(len(data) - start))
            handler.end_headers()
            handler.wfile.write(data[start:])
            return
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("ETag", '"v1"')
        handler.end_headers()
        handler.wfile.write(data[:cut_first_at] if cut_first_at is not None else data)
        if cut_first_at is not None:
            handler.close_connection = True
    return respond, calls


def test_a_full_disk_is_not_retried_as_a_broken_stream(loopback, tmp_path, monkeypatch):
    respond, calls = serve_file(b"x" * 5000)
    server = loopback(respond)
    real_open = open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr("morag_remote.client.download.open", lambda *a, **k: Full(real_open(*a, **k)),
                        raising=False)
    client = Client(server.url, "k", retry=RetryPolicy(attempts=5, base=0.001))
    with pytest.raises(OSError) as raised:
        client.download("/f", str(tmp_path / "f"))
    assert raised.value.errno == 28 and len(calls) == 1
    assert not list(tmp_path.iterdir())


def test_a_resume_whose_total_differs_from_the_first_answer_is_refused(loopback, tmp_path):
    respond, calls = serve_file(b"x" * 5000, cut_first_at=1000, total_on_resume=6000)
    server = loopback(respond)
    client = Client(server.url, "k", retry=RetryPolicy(attempts=3, base=0.001))
    with pytest.raises(DownloadError, match="6000"):
        client.download("/f", str(tmp_path / "f"))
    assert calls == [None, "bytes=1000-"]


def test_a_resumed_download_is_whole(loopback, tmp_path):
    data = bytes(range(256)) * 40
    respond, calls = serve_file(data, cut_first_at=3000)
    server = loopback(respond)
    got = Client(server.url, "k", retry=RetryPolicy(attempts=3, base=0.001)).download("/f", str(tmp_path / "f"))
    assert (tmp_path / "f").read_bytes() == data and got.resumed == 1 and calls == [None, "bytes=3000-"]
