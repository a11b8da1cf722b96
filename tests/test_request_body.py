"""The request body received into a reused buffer (``morag_remote/request_body.py``): over gunicorn's
own body objects on a loopback TCP connection, what gunicorn read ahead comes first, a pipelined
request after the body stays for gunicorn, gunicorn's count of the body's bytes ends at zero, and a
reset connection marks the body failed; through a real gunicorn, a PATCH followed on the same
connection by a pipelined HEAD and another PATCH is answered right each time."""
from __future__ import annotations

import hashlib
import io
import os
import socket
import struct
import threading

import pytest
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import SocketUnreader

from morag_remote.request_body import body_reader
from support.workers import served

MIB = 1024 * 1024
J = "/api/v1/remote-jobs"


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def gunicorn_body(sock: socket.socket, length: int, ahead: bytes = b"") -> tuple[Body, dict]:
    """The body gunicorn makes for a request of ``length`` bytes, with ``ahead`` read along with
    the headers (gunicorn's parser pushes it back into the Unreader)."""
    unreader = SocketUnreader(sock)
    if ahead:
        unreader.unread(ahead)
    body = Body(LengthReader(unreader, length))
    return body, {"wsgi.input": body, "gunicorn.socket": sock}


def read_all(readinto, size: int = MIB) -> bytes:
    buffer = memoryview(bytearray(size))
    out = bytearray()
    for _ in range(10_000):
        n = readinto(buffer)
        if not n:
            return bytes(out)
        out += buffer[:n]
    raise AssertionError("the body never ended")


def test_read_ahead_comes_first_and_a_pipelined_request_is_left_to_gunicorn():
    client, server = tcp_pair()
    with client, server:
        body, environ = gunicorn_body(server, 10, ahead=b"0123456789GET / HTTP/1.1\r\n")
        readinto = body_reader(environ, io.BytesIO(b"not this"))
        assert read_all(readinto, size=4) == b"0123456789"
        assert body.reader.length == 0
        assert body.reader.unreader.take_buffered() == b"GET / HTTP/1.1\r\n"


def test_what_gunicorns_body_buffered_comes_before_the_socket():
    client, server = tcp_pair()
    with client, server:
        client.sendall(b"ghij")
        body, environ = gunicorn_body(server, 10, ahead=b"abcdef")
        assert body.read(2) == b"ab"  # gunicorn's Body keeps the rest of what it read
        assert read_all(body_reader(environ, io.BytesIO())) == b"cdefghij"
        assert body.reader.length == 0


def test_a_large_body_is_received_straight_into_the_buffer():
    data = os.urandom(5 * MIB + 123)
    client, server = tcp_pair()
    with client, server:
        sender = threading.Thread(target=client.sendall, args=(data + b"NEXT",))
        sender.start()
        body, environ = gunicorn_body(server, len(data))
        got = read_all(body_reader(environ, io.BytesIO()))
        sender.join()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        assert body.reader.length == 0 and not body.failed
        assert server.recv(4) == b"NEXT"  # nothing past the body was taken


def test_a_reset_connection_marks_the_body_failed():
    client, server = tcp_pair()
    with server:
        client.sendall(b"x" * 100)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        body, environ = gunicorn_body(server, 1000)
        readinto = body_reader(environ, io.BytesIO())
        buffer = memoryview(bytearray(MIB))
        with pytest.raises(ConnectionResetError):
            for _ in range(10):
                readinto(buffer)
        assert body.failed


def test_without_gunicorns_socket_the_stream_is_read():
    stream = io.BytesIO(b"from werkzeug")
    assert read_all(body_reader({"wsgi.input": stream}, stream)) == b"from werkzeug"


@pytest.mark.slow
def test_patches_and_a_pipelined_head_on_one_connection_through_gunicorn(tmp_path):
    data = os.urandom(3 * MIB)
    with served(tmp_path, workers=1) as srv:
        port = int(srv.url.rsplit(":", 1)[1])
        key = srv.keys["producer"]
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            reader = conn.makefile("rb")

            def send(method: str, path: str, headers: dict[str, str], body: bytes = b"", after: bytes = b"") -> None:
                head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                conn.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                             f"Tus-Resumable: 1.0.0\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body + after)

            def answer(has_body: bool = True) -> tuple[int, dict[str, str]]:
                status = int(reader.readline().split()[1])
                headers = {}
                for _ in range(100):
                    line = reader.readline().decode().strip()
                    if not line:
                        break
                    name, value = line.split(":", 1)
                    headers[name.lower()] = value.strip()
                if has_body:
                    reader.read(int(headers.get("content-length", "0")))
                return status, headers

            send("POST", f"{J}/uploads/", {"Upload-Length": str(len(data))})
            status, headers = answer()
            assert status == 201
            location = headers["location"]
            patch = {"Content-Type": "application/offset+octet-stream"}
            # the first chunk and a HEAD in one write: gunicorn reads past the body, the HEAD stays its
            head = f"HEAD {location} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nTus-Resumable: 1.0.0\r\n\r\n"
            send("PATCH", location, {**patch, "Upload-Offset": "0"}, data[:1000], head.encode())
            assert answer()[0] == 204
            status, headers = answer(has_body=False)
            assert (status, headers["upload-offset"]) == (200, "1000")
            send("PATCH", location, {**patch, "Upload-Offset": "1000"}, data[1000:])
            status, headers = answer()
            assert (status, headers["upload-offset"]) == (204, str(len(data)))
        stored = list((srv.server.instance / "blobs" / "sources").rglob("*"))
        files = [p for p in stored if p.is_file()]
        assert [p.read_bytes() == data for p in files] == [True]
