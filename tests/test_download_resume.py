"""Downloads: a stream cut midway is resumed with Range and the bytes come out identical; the
sizes and the server's Repr-Digest are checked."""
from __future__ import annotations

import base64
import hashlib
import http.server
import os
import threading

import pytest

from support.cutting_proxy import CuttingProxy
from morag_remote.client import Client, DownloadError, RetryPolicy
from support.workers import served

pytestmark = pytest.mark.slow


def test_a_download_cut_mid_stream_is_resumed_with_range_and_identical(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)
    with served(tmp_path) as srv:
        srv.client().create(srv.source("big.mp3", data), "audio", "ingest-1")
        job = srv.client("worker").poll("w1", ["audio"])[0]
        port = int(srv.url.rsplit(":", 1)[1])
        with CuttingProxy(port, cut_after=1024 * 1024, cuts=2) as proxy:
            via_proxy = Client(f"http://127.0.0.1:{proxy.port}", srv.keys["worker"],
                               retry=RetryPolicy(attempts=5, base=0.05, cap=0.2))
            got = via_proxy.download(job, str(tmp_path / "out.mp3"))
        assert (tmp_path / "out.mp3").read_bytes() == data
        assert got.size == len(data) and got.sha256 == hashlib.sha256(data).hexdigest()
        assert got.resumed == 2
        ranges = [r for r in proxy.requests if b"\r\nRange: bytes=" in r]
        assert len(ranges) == 2
        assert not (tmp_path / "out.mp3.part").exists()


def test_a_download_into_a_folder_keeps_the_servers_file_name(tmp_path):
    with served(tmp_path) as srv:
        srv.client().create(srv.source("talk one.mp3", b"abc"), "audio", "ingest-1")
        job = srv.client("worker").poll("w1", ["audio"])[0]
        folder = tmp_path / "in"
        folder.mkdir()
        got = srv.client("worker").download(job, str(folder))
        assert got.filename == "talk one.mp3" and open(got.path, "rb").read() == b"abc"


class _DigestServer(http.server.BaseHTTPRequestHandler):
    body = b"payload " * 1000
    digest = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("Repr-Digest", f"sha-512=:AAAA:, sha-256=:{base64.b64encode(self.digest).decode()}:")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def digest_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DigestServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_the_sha256_of_repr_digest_is_checked(tmp_path, digest_server):
    client = Client(f"http://127.0.0.1:{digest_server.server_port}", "k")
    _DigestServer.digest = hashlib.sha256(_DigestServer.body).digest()
    got = client.download("/file", str(tmp_path / "ok"))
    assert got.digest_checked and (tmp_path / "ok").read_bytes() == _DigestServer.body
    _DigestServer.digest = hashlib.sha256(b"something else").digest()
    with pytest.raises(DownloadError, match="sha-256"):
        client.download("/file", str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.part").exists()
