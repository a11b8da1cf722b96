"""A request body read into the caller's buffer, for bodies of gigabytes (tus ``PATCH``).

``request.stream`` hands out each piece as new ``bytes``, and under gunicorn each piece is copied
several times on its way there: gunicorn's ``Body`` and its ``Unreader`` gather what ``recv``
returns in ``BytesIO`` buffers and slice it out again, then werkzeug's ``LimitedStream`` (which
``max_content_length`` puts in front) copies it once more into a ``bytearray`` and out as
``bytes``. For a 1 GiB upload that was most of the server's CPU (``make bench``'s files scenario).

:func:`body_reader` returns a ``readinto`` that fills a buffer the caller reuses:

- under gunicorn (its ``Body`` over a ``LengthReader`` over the connection's ``SocketUnreader``),
  what gunicorn already holds of the body is handed out first, then the rest is received straight
  into the buffer with ``recv_into``; gunicorn's count of the body's remaining bytes is kept right,
  so it drains nothing twice and keeps the connection alive as it would;
- anywhere else (werkzeug's server, the test client, a chunked body, TLS or HTTP/2 as gunicorn
  may wrap them), ``request.stream``'s own ``readinto``.
"""
from __future__ import annotations

import socket
from typing import Any, Callable, Protocol

try:  # gunicorn is how the service is run, but the app does not need it (tests, flask run)
    from gunicorn.http.body import Body, LengthReader
    from gunicorn.http.unreader import SocketUnreader
except ImportError:  # pragma: no cover - gunicorn is in the pinned requirements
    Body = LengthReader = SocketUnreader = None

ReadInto = Callable[[memoryview], int]


class _Stream(Protocol):
    def readinto(self, buffer: memoryview) -> int: ...


def body_reader(environ: dict[str, Any], stream: _Stream) -> ReadInto:
    """``readinto(buffer) -> bytes received`` (0 at the end of the body) for this request's body;
    ``stream`` is ``request.stream`` (werkzeug's ``LimitedStream`` once ``max_content_length`` is
    set), used when the body does not come from gunicorn's socket."""
    body = environ.get("wsgi.input")
    sock = environ.get("gunicorn.socket")
    if (Body is not None and type(body) is Body and type(body.reader) is LengthReader
            and type(body.reader.unreader) is SocketUnreader and body.reader.unreader.sock is sock):
        return _GunicornBody(body, sock).readinto
    return stream.readinto


class _GunicornBody:
    """gunicorn's body of known length, received into the caller's buffer."""

    def __init__(self, body: Any, sock: socket.socket) -> None:
        self.body = body
        self.reader = body.reader
        self.sock = sock
        # what gunicorn read ahead: the Body's buffer, then the Unreader's (which may hold the start
        # of a pipelined request after the body: only the body's share is taken)
        held = body.buf.getvalue()
        body.buf.seek(0)
        body.buf.truncate()
        left = self.reader.length
        ahead = self.reader.unreader.take_buffered()
        if ahead[left:]:
            self.reader.unreader.unread(ahead[left:])
        self.held = memoryview(held + ahead[:left])
        self.reader.length -= len(ahead[:left])

    def readinto(self, buffer: memoryview) -> int:
        if self.held:
            n = min(len(buffer), len(self.held))
            buffer[:n] = self.held[:n]
            self.held = self.held[n:]
            return n
        want = min(len(buffer), self.reader.length)
        if want <= 0:
            return 0
        try:
            n = self.sock.recv_into(buffer[:want], want)
        except Exception:
            self.body.failed = True  # where the next request starts is unknown: gunicorn closes
            raise
        self.reader.length -= n
        return n

