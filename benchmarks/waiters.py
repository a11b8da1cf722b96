"""``waiters``: a thousand workers long-polling one host (gunicorn.conf.py's defaults).

One thread of this process drives every poller's socket with a selector (a thousand Python threads
would cost the machine more than the server under test): each sends a long poll for ``image`` jobs,
and polls again as soon as it is answered. Then, with every poller waiting:

- idle: the server's CPU (master and workers) over ``idle_seconds``, its RSS, and how many polls
  were answered early (turned away with ``X-Poll-Host-Full``, or anything else before the wait was
  up);
- pick-up: a producer creates ``jobs`` jobs one at a time; the time from sending the create to a
  poller having the job;
- wake-ups: ``morag_remote_poll_wakeups_total`` before and after the pick-ups, per job.
"""
from __future__ import annotations

import json
import re
import selectors
import socket
import threading
import time
from typing import Any

from .client import Api
from .scenarios import summary_ms
from .server import Instance, Server, rss_kib

WAIT = 20  # seconds each long poll asks for
_WAKEUPS = re.compile(rb"^morag_remote_poll_wakeups_total(?:\{\})? ([0-9.e+]+)$", re.M)
_FULL = re.compile(rb"^morag_remote_poll_host_full_total(?:\{\})? ([0-9.e+]+)$", re.M)


class _Poller:
    """One worker's connection: a long poll in flight, its answer read as it comes."""

    def __init__(self, index: int, port: int, key: str) -> None:
        self.index = index
        self.request = (f"GET /api/v1/remote-jobs/poll?worker_id=waiter-{index}&content_types=image&max_jobs=1"
                        f"&wait={WAIT} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n\r\n"
                        ).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.setblocking(False)
        self.buf = b""
        self.sent_at = 0.0
        self.retry_at: float | None = None  # turned away: poll again then

    def send(self) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(self.request)
        self.sock.setblocking(False)
        self.sent_at = time.monotonic()

    def answers(self) -> list[tuple[int, bool, dict]]:
        """(status, host full, body) of every whole response read so far; raises when closed."""
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"poller {self.index}: the server closed the connection")
        self.buf += chunk
        out = []
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].decode("latin-1").lower()
            length = int(re.search(r"content-length: *(\d+)", head).group(1))
            if len(self.buf) < end + 4 + length:
                break
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            out.append((int(head.split(" ", 2)[1]), "x-poll-host-full: true" in head, json.loads(body)))
        return out


def _counter(port: int, key: str, pattern: re.Pattern) -> float | None:
    with Api(port, key, timeout=30) as api:
        status, text = api.request("GET", "/metrics")
    match = pattern.search(text) if status == 200 else None
    return float(match.group(1)) if match else None


def _threads(pids: list[int]) -> list[int]:
    """How many threads each process runs (a gthread worker's grow with the requests it holds)."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                out.append(next(int(line.split()[1]) for line in fh if line.startswith("Threads:")))
        except (OSError, StopIteration):
            out.append(0)
    return out


def thousand_waiters(instance: Instance, pollers: int = 1000, jobs: int = 100, idle_seconds: float = 20.0,
                     gap: float = 0.1, env: dict[str, str] | None = None) -> dict[str, Any]:
    data_dir = instance.data_dir("waiters")
    picked: dict[str, float] = {}
    picked_cond = threading.Condition()
    counts = {"answers": 0, "early": 0, "host_full": 0, "errors": 0}
    stop = threading.Event()

    with Server(instance, data_dir, env=env) as server:
        rss_before = rss_kib([server.proc.pid, *server.worker_pids()])
        sel = selectors.DefaultSelector()
        conns = []
        for i in range(pollers):
            p = _Poller(i, server.port, instance.keys["worker"])
            p.send()
            sel.register(p.sock, selectors.EVENT_READ, p)
            conns.append(p)

        def drive() -> None:
            while not stop.is_set():
                now = time.monotonic()
                for p in conns:
                    if p.retry_at is not None and p.retry_at <= now:
                        p.retry_at = None
                        p.send()
                for key, _ in sel.select(0.2):
                    p: _Poller = key.data
                    try:
                        answers = p.answers()
                    except (OSError, ValueError, AttributeError) as exc:
                        counts["errors"] += 1
                        sel.unregister(p.sock)
                        print(f"waiters: {exc}")
                        continue
                    for status, full, body in answers:
                        counts["answers"] += 1
                        if status != 200:
                            counts["errors"] += 1
                        elif body.get("job_id"):
                            with picked_cond:
                                picked[body["job_id"]] = time.perf_counter()
                                picked_cond.notify_all()
                        elif full:  # back off, as the project's worker does
                            counts["host_full"] += 1
                            p.retry_at = time.monotonic() + 1.0
                            continue
                        elif time.monotonic() - p.sent_at < WAIT - 1:
                            counts["early"] += 1
                        if not stop.is_set():
                            p.send()

        driver = threading.Thread(target=drive, name="waiters-driver", daemon=True)
        driver.start()
        try:
            time.sleep(max(3.0, pollers / 300))  # every poll connected and waiting
            turned_away_at_start = counts["host_full"] + counts["early"]
            pids = [server.proc.pid, *server.worker_pids()]
            rss_waiting = rss_kib(pids)
            threads_waiting = _threads(server.worker_pids())
            cpu_before, t0 = server.cpu_seconds(), time.monotonic()
            time.sleep(idle_seconds)
            idle_cpu, idle_elapsed = server.cpu_seconds() - cpu_before, time.monotonic() - t0
            turned_away_idle = counts["host_full"] + counts["early"] - turned_away_at_start
            wakeups_before = _counter(server.port, instance.keys["admin"], _WAKEUPS)
            samples, missed = [], 0
            with Api(server.port, instance.keys["producer"]) as producer:
                for _ in range(jobs):
                    time.sleep(gap)
                    sent = time.perf_counter()
                    job_id = producer.create(str(instance.source), "image")
                    with picked_cond:
                        if not picked_cond.wait_for(lambda: job_id in picked, timeout=WAIT + 5):
                            missed += 1
                            continue
                    samples.append(picked[job_id] - sent)
            time.sleep(0.5)  # the last wake-ups counted
            wakeups_after = _counter(server.port, instance.keys["admin"], _WAKEUPS)
            host_full_metric = _counter(server.port, instance.keys["admin"], _FULL)
            rss_end = rss_kib([server.proc.pid, *server.worker_pids()])
        except BaseException:
            print(server.log_tail()[-4000:])
            raise
        finally:
            stop.set()
            driver.join(timeout=5)
            for p in conns:
                p.sock.close()
    wakeups = None if wakeups_before is None or wakeups_after is None else wakeups_after - wakeups_before
    return {"pollers": pollers, "jobs": jobs, "server": {"workers": server.workers, **(env or {})},
            "idle_seconds": round(idle_elapsed, 2), "idle_cpu_seconds": round(idle_cpu, 3),
            "idle_percent_of_one_core": round(idle_cpu / idle_elapsed * 100, 2),
            "turned_away": turned_away_at_start + turned_away_idle, "host_full_answers": counts["host_full"],
            "host_full_metric": host_full_metric, "answered_early": counts["early"],
            "rss_mib": {"started": round(rss_before / 1024, 1), "waiting": round(rss_waiting / 1024, 1),
                        "end": round(rss_end / 1024, 1)},
            "worker_threads": threads_waiting, "pickup": summary_ms(samples), "missed": missed, "errors": counts["errors"],
            "wakeups": wakeups, "wakeups_per_job": round(wakeups / jobs, 2) if wakeups is not None and jobs else None}
