"""(9) Files: upload and download throughput of one big file over loopback, against the floor of
what ``curl`` gets from plain servers on the same machine.

- Upload: ``curl -T`` of the file as one tus ``PATCH`` to the service (after the tus creation
  ``POST``), against ``curl -T`` to a plain server that writes the body to a file and fsyncs it
  (``_SINK``: a socket loop, nothing else), on the same disk. One PATCH is one fsync, as the sink's
  one request is: the same durability on both sides. It is also what tuspy sends by default (its
  ``chunk_size`` is the whole file); a tuspy user who sets 64 MiB chunks (the README's example)
  adds a PATCH, an fsync and a state write per 64 MiB. The two alternate for ``UPLOAD_ROUNDS``
  rounds (``--quick``: one), each after a ``sync`` so that no transfer pays for the dirty pages of
  the one before (or of the source file just written); the medians are reported, with every round.
- Download: ``curl -o /dev/null`` of the job's ``source_file_url`` (the job made from the upload:
  its sha256 is known, so the download is the file as it is, with ``Repr-Digest``), against
  ``curl`` from ``python -m http.server`` serving the same file.
- The service's memory: the gunicorn workers' RSS, sampled every 50 ms during each transfer (its
  peak next to the RSS before: flat means the bytes are streamed, not held).

``MORAG_REMOTE_BENCH_FILE_BYTES`` sets the size (default 1 GiB; ``--quick``: 32 MiB).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time


from .server import Instance, Server, child_pids, free_port, rss_kib

GIB = 1024 ** 3
UPLOAD_ROUNDS = 3

_SINK = r'''
import os, socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
while True:
    conn, _ = srv.accept()
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(65536)
    head, body = head.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    length = next(int(l.split(":")[1]) for l in lines if l.lower().startswith("content-length"))
    if any(l.lower().startswith("expect") for l in lines):
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    buf = bytearray(1024 * 1024)
    got = len(body)
    os.write(fd, body)
    while got < length:
        n = conn.recv_into(buf)
        if not n:
            break
        os.write(fd, memoryview(buf)[:n])
        got += n
    os.fdatasync(fd)
    os.close(fd)
    conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    conn.close()
'''


def _curl(*args: str) -> tuple[float, str]:
    """Seconds curl took, and what ``-w`` printed."""
    started = time.monotonic()
    done = subprocess.run(["curl", "-s", "-S", "--fail", *args], capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        raise RuntimeError(f"curl failed: {done.stderr.strip()}")
    return time.monotonic() - started, done.stdout


def _rss_mib(pids: list[int]) -> float:
    return round(rss_kib(pids) / 1024, 1)


class _Sampler:
    """The peak RSS of some processes while a transfer runs."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.before = _rss_mib(pids)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _rss_mib(self.pids))

    def __enter__(self) -> "_Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def _mb_s(size: int, seconds: float) -> float:
    return round(size / seconds / 1e6, 1)


def throughput(instance: Instance, size: int, rounds: int = UPLOAD_ROUNDS) -> dict:
    work = instance.path / "files-bench"
    work.mkdir(exist_ok=True)
    source = work / "big.bin"
    with open(source, "wb") as fh:  # random bytes (a cached page written once, read by every side)
        block = os.urandom(8 * 1024 * 1024)
        left = size
        while left > 0:
            fh.write(block[:min(left, len(block))])
            left -= len(block)
    out: dict = {"bytes": size}

    # the download floor: python -m http.server
    static_port = free_port()
    static = subprocess.Popen([sys.executable, "-m", "http.server", str(static_port), "--bind", "127.0.0.1",
                               "--directory", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                _curl("-o", "/dev/null", f"http://127.0.0.1:{static_port}/")
                break
            except RuntimeError:
                time.sleep(0.05)
        seconds, _ = _curl("-o", "/dev/null", f"http://127.0.0.1:{static_port}/big.bin")
        out["floor_download_mb_s"] = _mb_s(size, seconds)
    finally:
        static.kill()
        static.wait()

    with Server(instance, instance.data_dir("files"), env={"MORAG_REMOTE_BLOB_DIR": str(work / "blobs")}) as server:
        base = f"http://127.0.0.1:{server.port}"
        producer = ["-H", f"Authorization: Bearer {instance.keys['producer']}", "-H", "Tus-Resumable: 1.0.0"]
        pids = child_pids(server.proc.pid)
        # the upload floor (a plain fsyncing sink) and the service, alternated
        sink_port = free_port()
        sink = subprocess.Popen([sys.executable, "-c", _SINK, str(sink_port), str(work / "sunk.bin")],
                                stdout=subprocess.PIPE, text=True)
        floors: list[float] = []
        uploads: list[float] = []
        rss_before = rss_peak = _rss_mib(pids)
        try:
            sink.stdout.readline()
            for _ in range(rounds):
                os.sync()
                seconds, _ = _curl("-T", str(source), "-X", "PUT", f"http://127.0.0.1:{sink_port}/big.bin")
                floors.append(_mb_s(size, seconds))
                (work / "sunk.bin").unlink()
                _, headers = _curl("-D", "-", "-o", "/dev/null", "-X", "POST", *producer, "-H",
                                   f"Upload-Length: {size}", f"{base}/api/v1/remote-jobs/uploads/")
                location = next(line.split(":", 1)[1].strip() for line in headers.splitlines()
                                if line.lower().startswith("location:"))
                os.sync()
                with _Sampler(pids) as rss:
                    seconds, _ = _curl("-T", str(source), "-X", "PATCH", *producer, "-H", "Upload-Offset: 0",
                                       "-H", "Content-Type: application/offset+octet-stream", base + location)
                uploads.append(_mb_s(size, seconds))
                rss_peak = max(rss_peak, rss.peak)
        finally:
            sink.kill()
            sink.wait()
            (work / "sunk.bin").unlink(missing_ok=True)
        out["floor_upload_mb_s"] = statistics.median(floors)
        out["upload_mb_s"] = statistics.median(uploads)
        out["upload_rounds"] = {"floor_mb_s": floors, "upload_mb_s": uploads}
        out["upload_rss_mib"] = {"before": rss_before, "peak": rss_peak}
        upload_id = location.rsplit("/", 1)[1]
        _, created = _curl("-X", "POST", *producer, "-H", "Content-Type: application/json", "-d",
                           json.dumps({"source_upload_id": upload_id, "content_type": "audio",
                                       "ingestion_task_id": "bench"}), f"{base}/api/v1/remote-jobs/")
        _, polled = _curl("-H", f"Authorization: Bearer {instance.keys['worker']}",
                          f"{base}/api/v1/remote-jobs/poll?worker_id=bench&content_types=audio")
        url = json.loads(polled)["source_file_url"]
        with _Sampler(pids) as rss:
            seconds, _ = _curl("-o", "/dev/null", "-H", f"Authorization: Bearer {instance.keys['worker']}", base + url)
        out["download_mb_s"] = _mb_s(size, seconds)
        out["download_rss_mib"] = {"before": rss.before, "peak": rss.peak}
    out["upload_share_of_floor"] = round(out["upload_mb_s"] / out["floor_upload_mb_s"], 2)
    out["download_share_of_floor"] = round(out["download_mb_s"] / out["floor_download_mb_s"], 2)
    source.unlink()
    return out


def size_from_env(quick: bool) -> int:
    value = os.environ.get("MORAG_REMOTE_BENCH_FILE_BYTES")
    if value:
        return int(value)
    return 32 * 1024 * 1024 if quick else GIB


def lines(f: dict) -> list[str]:
    return [f"files, one {f['bytes'] / 2**20:,.0f} MiB file over loopback (curl; floor: curl to a plain "
            "fsyncing sink / from python -m http.server):",
            f"  upload (tus PATCH)   {f['upload_mb_s']:>8} MB/s, floor {f['floor_upload_mb_s']} MB/s = "
            f"{f['upload_share_of_floor']:.0%}; server RSS {f['upload_rss_mib']['before']} -> peak "
            f"{f['upload_rss_mib']['peak']} MiB",
            f"    (medians of {len(f['upload_rounds']['upload_mb_s'])} alternated rounds: service "
            f"{', '.join(map(str, f['upload_rounds']['upload_mb_s']))}; floor "
            f"{', '.join(map(str, f['upload_rounds']['floor_mb_s']))} MB/s)",
            f"  download             {f['download_mb_s']:>8} MB/s, floor {f['floor_download_mb_s']} MB/s = "
            f"{f['download_share_of_floor']:.0%}; server RSS {f['download_rss_mib']['before']} -> peak "
            f"{f['download_rss_mib']['peak']} MiB"]
