"""A loopback TCP proxy that cuts connections after a number of bytes from the server, for the
download-resume tests (a network that drops a stream midway)."""
from __future__ import annotations

import socket
import threading


class CuttingProxy:
    """Forwards 127.0.0.1:<port> to ``upstream``; the first ``cuts`` connections are closed after
    ``cut_after`` bytes of the server's answer (with ``upstream=True``: of what the client sends,
    for uploads). ``requests`` keeps the bytes clients sent (not kept for uploads: they are big)."""

    def __init__(self, upstream_port: int, cut_after: int, cuts: int, upstream: bool = False) -> None:
        self.upstream_port = upstream_port
        self.cut_after = cut_after
        self.upstream = upstream
        self.cuts_left = cuts
        self.requests: list[bytes] = []
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> "CuttingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(10)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                cut = self.cut_after if self.cuts_left > 0 and not self.upstream else None
                self.cuts_left -= 1 if cut is not None else 0
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self.requests.append(b"")
                index = len(self.requests) - 1
            threading.Thread(target=self._pump_up, args=(client, upstream, index), daemon=True).start()
            threading.Thread(target=self._pump_down, args=(upstream, client, cut), daemon=True).start()

    def _pump_up(self, src: socket.socket, dst: socket.socket, index: int) -> None:
        sent, cut, first = 0, None, True
        try:
            while data := src.recv(65536):
                if first and self.upstream:  # uploads: only requests with a body (PATCH, PUT) are cut
                    first = False
                    with self._lock:
                        if self.cuts_left > 0 and data.startswith((b"PATCH", b"PUT")):
                            cut, self.cuts_left = self.cut_after, self.cuts_left - 1
                if not self.upstream:
                    with self._lock:
                        self.requests[index] += data
                sent = _forward(dst, data, sent, cut)
                if sent is None:
                    break
        except OSError:
            pass
        finally:
            _close(dst)
            if cut is not None:
                _close(src)

    def _pump_down(self, src: socket.socket, dst: socket.socket, cut: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                sent = _forward(dst, data, sent, cut)
                if sent is None:
                    break
        except OSError:
            pass
        finally:
            _close(dst)
            _close(src)


def _forward(dst: socket.socket, data: bytes, sent: int, cut: int | None) -> int | None:
    """Send ``data`` on, up to the cut: the bytes sent so far, or None once the cut is reached."""
    if cut is not None and sent + len(data) >= cut:
        dst.sendall(data[:cut - sent])
        return None
    dst.sendall(data)
    return sent + len(data)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
