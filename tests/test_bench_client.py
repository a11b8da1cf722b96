"""The benchmark's socket client reads every framing a server may use, and sends a request again
only when the server closed an idle connection before answering (against a loopback server that
answers from a script)."""
from __future__ import annotations

import socket
import struct
import threading
from typing import Iterator

import pytest

from benchmarks.client import Api

RESET = "reset"  # as the last answer of a connection: reset it (RST) right after sending the answer before
Script = list[list[bytes | str | None]]


@pytest.fixture
def scripted() -> Iterator[tuple[int, Script, list[bytes]]]:
    """A server on a free loopback port. For each connection it accepts it takes the next list of
    answers from the script and sends one per request it reads; ``None`` closes the connection
    without answering, ``RESET`` resets it. The requests it read are kept in order."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    script: Script = []
    seen: list[bytes] = []
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            with conn:
                for answer in script.pop(0) if script else []:
                    if answer is None:
                        break
                    if answer == RESET:
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        break
                    seen.append(conn.recv(65536))
                    conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1], script, seen
    done.set()
    thread.join(15)
    listener.close()


def test_bodies_by_length_chunked_and_until_close(scripted):
    port, script, seen = scripted
    script.append([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                   b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n",
                   b"HTTP/1.1 204 No Content\r\n\r\n",
                   b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end"])
    with Api(port, "k", timeout=10) as api:
        assert api.request("GET", "/a") == (200, b"hello")
        assert api.request("POST", "/b", {"x": 1}) == (201, b"abcde")
        assert api.request("DELETE", "/c") == (204, b"")
        assert api.request("GET", "/d") == (200, b"to the end")
    assert seen[0].startswith(b"GET /a HTTP/1.1\r\n") and b"Authorization: Bearer k\r\n" in seen[0]
    assert seen[1].endswith(b'Content-Length: 8\r\n\r\n{"x": 1}')


def test_an_idle_connection_the_server_closed_is_reopened_once(scripted):
    port, script, seen = scripted
    script.extend([[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", None],  # then closes while idle
                   [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nagain"]])
    with Api(port, "k", timeout=10) as api:
        assert api.request("GET", "/a") == (200, b"ok")
        assert api.request("GET", "/b") == (200, b"again")
    assert [r.split(b" ")[1] for r in seen] == [b"/a", b"/b"]


def test_a_connection_cut_in_the_middle_of_a_body_is_an_error_not_a_retry(scripted):
    port, script, seen = scripted
    script.extend([[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", None],
                   [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno"]])
    with Api(port, "k", timeout=10) as api, pytest.raises(ConnectionError):
        api.request("POST", "/a", {"once": True})
    assert len(seen) == 1


def test_a_reset_in_the_middle_of_a_body_is_an_error_not_a_retry(scripted):
    port, script, seen = scripted
    script.extend([[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                    b"HTTP/1.1 201 Created\r\nContent-Length: 10\r\n\r\nshort", RESET],
                   [b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nno"]])
    with Api(port, "k", timeout=10) as api:
        assert api.request("GET", "/a") == (200, b"ok")
        with pytest.raises(ConnectionError):
            api.request("POST", "/b", {"once": True})
    assert len(seen) == 2


def test_a_new_connection_closed_before_an_answer_is_an_error_not_a_retry(scripted):
    port, script, seen = scripted
    script.extend([[None], [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno"]])
    with Api(port, "k", timeout=10) as api, pytest.raises(ConnectionError):
        api.request("POST", "/a", {"once": True})
    assert seen == []


def test_an_interim_answer_is_skipped(scripted):
    port, script, seen = scripted
    script.append([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops",
                   b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok"])
    with Api(port, "k", timeout=10) as api:
        assert api.request("GET", "/a") == (500, b"oops")
        assert api.request("GET", "/b") == (200, b"ok")
        assert api._sock is None  # the server said it closes the connection
