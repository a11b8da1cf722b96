"""The measurements. Each returns a plain dict (it goes into the JSON as it is).

All loops are bounded by a count or a deadline, all traffic goes to 127.0.0.1.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from morag_remote.models import Action, RemoteJob, new_job_id, next_status, utcnow
from morag_remote.store.files.jobs import FileJobStore
from morag_remote.store.files.fsck import fsck

from .client import Api, BadStatus
from .pg import BenchSchema
from .seed import seed_pending
from .server import Instance, Server, process_cpu


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat, in clock ticks."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


def busy_percent(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Share of the machine's CPUs (all cores) that was busy between two ``machine_busy`` readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return round(busy / total * 100, 1) if total else 0.0


def summary_ms(samples: list[float]) -> dict[str, float | int]:
    """Median and p99 (nearest rank) in milliseconds of samples given in seconds."""
    ordered = sorted(samples)
    if not ordered:
        return {"n": 0, "median_ms": None, "p99_ms": None, "max_ms": None}
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return {"n": len(ordered), "median_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(p99 * 1000, 2), "max_ms": round(ordered[-1] * 1000, 2)}


# -- (4) the raw store ----------------------------------------------------------------------------

def _claim(job: RemoteJob) -> RemoteJob:
    job.status = next_status(job.status, Action.CLAIM).value
    job.worker_id = "raw"
    job.attempt += 1
    job.lease_id = "lease"
    job.started_at = job.updated_at = utcnow()
    return job


def _complete(job: RemoteJob) -> RemoteJob:
    job.status = next_status(job.status, Action.COMPLETE).value
    job.completed_at = job.updated_at = utcnow()
    job.result_data = {"content": "converted", "metadata": {"bench": True}, "processing_time": 0.01}
    return job


def raw_store(instance: Instance, seconds: float = 5.0, max_cycles: int = 5000) -> dict[str, Any]:
    """create -> claim -> complete on the store itself, in this process, every write fsync'd."""
    store = FileJobStore(instance.data_dir("raw"))
    fsyncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    os.fsync = counting_fsync
    try:
        cycles = 0
        started = time.perf_counter()
        while cycles < max_cycles and time.perf_counter() - started < seconds:
            now = utcnow()
            job = RemoteJob(id=new_job_id(), ingestion_task_id="bench", source_file_path=str(instance.source),
                            content_type="audio", task_options={}, created_at=now, updated_at=now,
                            available_at=now)
            store.create(job)
            claimed = store.claim(["audio"], 1, now, _claim)
            store.update(claimed[0].id, _complete)
            cycles += 1
        elapsed = time.perf_counter() - started
    finally:
        os.fsync = real_fsync
    transitions = cycles * 3
    return {"cycles": cycles, "seconds": round(elapsed, 3), "cycles_per_s": round(cycles / elapsed, 1),
            "transitions_per_s": round(transitions / elapsed, 1),
            "ms_per_transition": round(elapsed / transitions * 1000, 3),
            "fsyncs_per_transition": round(fsyncs / transitions, 2)}


# -- (1) claim latency at a queue depth ------------------------------------------------------------

FIRST_POLLS = 10  # issue 20: the median of the first ten polls after a start, against the steady one


def claim_latency(instance: Instance, label: str, seeded: dict[str, int], claim_type: str = "audio",
                  samples: int = 500, warmup: int = 20, pg: BenchSchema | None = None,
                  resources: str = "") -> dict[str, Any]:
    """One poll claiming one job, ``samples`` times, while the queue holds what ``seeded`` says.
    ``resources``: the poller's capabilities (``gpu_memory_gb:24``), for the routing scenarios.

    Before each timed poll an untimed create adds a job of ``claim_type``, so the depth stays put
    and every claim also pays for catching up with the other worker process's change. ``pg``: the
    same against a server on that PostgreSQL schema, its job table emptied and seeded first.
    """
    data_dir = instance.data_dir(f"pg-{label}" if pg else label)
    seed_started = time.perf_counter()
    if pg is None:
        seed_pending(data_dir, instance.source, seeded)
    else:
        pg.seed(instance.source, seeded)
    seed_seconds = time.perf_counter() - seed_started
    latencies: list[float] = []
    firsts: list[float] = []  # the first polls after the start (untimed warm-up otherwise)
    errors = 0
    with Server(instance, data_dir, pg.server_env() if pg else None) as server:
        with Api(server.port, instance.keys["producer"]) as producer, \
                Api(server.port, instance.keys["worker"]) as worker:
            for i in range(warmup + samples):
                producer.create(str(instance.source), claim_type)
                started = time.perf_counter()
                body = worker.poll("bench-claimer", claim_type, resources=resources)
                elapsed = time.perf_counter() - started
                if body["job_id"] is None or body["content_type"] != claim_type:
                    errors += 1
                if i >= warmup:
                    latencies.append(elapsed)
                elif i < FIRST_POLLS:
                    firsts.append(elapsed)
        ready = server.ready_seconds
    first = summary_ms(firsts)
    return {"label": label, "pending": seeded, **({"resources": resources} if resources else {}),
            **summary_ms(latencies), "errors": errors,
            "first_polls": {"n": first["n"], "median_ms": first["median_ms"], "max_ms": first["max_ms"],
                            "each_ms": [round(t * 1000, 2) for t in firsts]},
            "seed_seconds": round(seed_seconds, 2), "server_ready_seconds": round(ready or 0, 2)}


# -- (2) full cycles with concurrent clients -------------------------------------------------------

def run_clients(target: Callable[..., None], args: tuple, clients: int, seconds: float,
                probe: Callable[[], Any]) -> tuple[list[dict[str, Any]], float, Any, Any]:
    """``clients`` forked processes running ``target(*args, index, seconds, ready, go, start_at,
    out)``, started together once all are ready; their reports, the start time (monotonic) and what
    ``probe`` returned just before the start and once every report was in (the clients have
    finished their loops, though maybe not exited: they are joined after)."""
    ctx = multiprocessing.get_context("fork")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=target, args=(*args, i, seconds, ready, go, start_at, out), daemon=True)
             for i in range(clients)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=60)
    before = probe()
    start_at.value = time.monotonic()
    go.set()
    reports = [out.get(timeout=seconds + 120) for _ in procs]
    after = probe()
    for p in procs:
        p.join(timeout=30)
    return reports, start_at.value, before, after


def _cycle_client(port: int, keys: dict[str, str], source: str, index: int, seconds: float,
                  ready: Any, go: Any, start_at: Any, out: Any) -> None:
    """One client: create, poll, download, result, as fast as it can until the deadline."""
    claimed: list[str] = []
    cycles = empty = errors = 0
    first_errors: list[str] = []
    expected = Path(source).stat().st_size
    try:
        with Api(port, keys["producer"]) as producer, Api(port, keys["worker"]) as worker:
            ready.put(index)
            go.wait(60)
            deadline = start_at.value + seconds
            while time.monotonic() < deadline:
                try:
                    producer.create(source, "audio")
                    body = worker.poll(f"bench-{index}", "audio")
                    if body["job_id"] is None:
                        empty += 1
                        continue
                    claimed.append(body["job_id"])
                    if len(worker.download(body["source_file_url"])) != expected:
                        raise BadStatus("GET", "download", 200, b"short body")
                    worker.result(body["job_id"])
                    cycles += 1
                except Exception as exc:  # counted, never the end of the client: its report must come
                    errors += 1
                    if len(first_errors) < 5:
                        first_errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        out.put({"index": index, "cycles": cycles, "empty_polls": empty, "errors": errors,
                 "first_errors": first_errors, "claimed": claimed, "finished": time.monotonic()})


def full_cycles(instance: Instance, clients: int = 16, seconds: float = 20.0,
                pg: BenchSchema | None = None) -> dict[str, Any]:
    """``clients`` processes each running create, poll, download, result for ``seconds``, then the
    store is read back. ``pg``: against a server on that PostgreSQL schema, its job table emptied
    first; the CPU of the database's server processes is reported too when they run on this machine."""
    data_dir = instance.data_dir("cycles-pg" if pg else "cycles")
    if pg is not None:
        pg.seed(instance.source, {})
    with Server(instance, data_dir, pg.server_env() if pg else None) as server:
        def probe() -> tuple:
            return server.cpu_split(), machine_busy(), _cpu_by_pid(pg.backend_pids()) if pg else {}

        children_before = os.times()  # a child's CPU counts here once it is joined (and before the server's)
        reports, started, before, after = run_clients(
            _cycle_client, (server.port, instance.keys, str(instance.source)), clients, seconds, probe)
        children = os.times()
    (cpu_before, machine_before, db_before), (cpu_after, machine_after, db_after) = before, after
    user, system = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
    client_cpu = (children.children_user + children.children_system
                  - children_before.children_user - children_before.children_system)
    elapsed = max(r["finished"] for r in reports) - started
    claimed = Counter(job_id for r in reports for job_id in r["claimed"])
    double = sum(n - 1 for n in claimed.values() if n > 1)
    cycles = sum(r["cycles"] for r in reports)
    verify = pg.verify() if pg else _verify_store(data_dir)
    figures = {"clients": clients, "seconds": round(elapsed, 2), "cycles": cycles,
               "cycles_per_s": round(cycles / elapsed, 1),
               "double_claims": double + verify["claimed_more_than_once"],
               "errors": sum(r["errors"] for r in reports),
               "first_errors": [e for r in reports for e in r["first_errors"]][:5],
               "empty_polls": sum(r["empty_polls"] for r in reports),
               "server_cpu_percent_of_one_core": round((user + system) / elapsed * 100, 1),
               "server_cpu_ms_per_cycle": {"user": round(user / max(cycles, 1) * 1000, 2),
                                           "system": round(system / max(cycles, 1) * 1000, 2)},
               "clients_cpu_percent_of_one_core": round(client_cpu / elapsed * 100, 1),
               "machine_busy_percent": busy_percent(machine_before, machine_after),
               "store_after": verify}
    if pg is not None:
        # a backend that started during the run counts whole; one that ended in it is missed (the
        # pools keep theirs open)
        db_user = sum(u - db_before.get(pid, (0.0, 0.0))[0] for pid, (u, _) in db_after.items())
        db_system = sum(s - db_before.get(pid, (0.0, 0.0))[1] for pid, (_, s) in db_after.items())
        figures["database_backends"] = len(db_after)
        figures["database_cpu_ms_per_cycle"] = ({"user": round(db_user / max(cycles, 1) * 1000, 2),
                                                 "system": round(db_system / max(cycles, 1) * 1000, 2)}
                                                if db_after else None)
    return figures


def _cpu_by_pid(pids: list[int]) -> dict[int, tuple[float, float]]:
    return {pid: process_cpu(pid) for pid in pids}


def _verify_store(data_dir: Path) -> dict[str, Any]:
    """Read the store the server left: every job once, readable, claimed at most once."""
    store = FileJobStore(data_dir)
    statuses: Counter[str] = Counter()
    more_than_once = 0
    for job in store.iter_all():
        statuses[job.status] += 1
        if job.attempt > 1:
            more_than_once += 1
    findings = fsck(store, repair=False)
    return {"jobs": sum(statuses.values()), "by_status": dict(statuses),
            "claimed_more_than_once": more_than_once, "findings": len(findings), "checked_with": "fsck"}


# -- (3) long-poll pick-up -------------------------------------------------------------------------

def pickup_latency(instance: Instance, jobs: int = 50, waiters: int = 4, gap: float = 0.1) -> dict[str, Any]:
    """``waiters`` workers long-poll for ``image`` jobs; a producer creates one job at a time and
    times create-sent -> a waiter holds it."""
    data_dir = instance.data_dir("pickup")
    picked: dict[str, float] = {}
    picked_cond = threading.Condition()
    stop = threading.Event()
    errors: list[str] = []

    def waiter(port: int, index: int) -> None:
        with Api(port, instance.keys["worker"]) as api:
            for _ in range(jobs + waiters + 10):
                if stop.is_set():
                    return
                try:
                    body = api.poll(f"waiter-{index}", "image", wait=20)
                except (BadStatus, OSError) as exc:
                    errors.append(str(exc))
                    return
                if body["job_id"] is not None:
                    with picked_cond:
                        picked[body["job_id"]] = time.perf_counter()
                        picked_cond.notify_all()

    samples: list[float] = []
    create_samples: list[float] = []
    missed = 0
    with Server(instance, data_dir) as server:
        threads = [threading.Thread(target=waiter, args=(server.port, i), daemon=True) for i in range(waiters)]
        for t in threads:
            t.start()
        with Api(server.port, instance.keys["producer"]) as producer:
            time.sleep(0.5)  # let every waiter reach its wait
            for _ in range(jobs):
                time.sleep(gap)
                sent = time.perf_counter()
                job_id = producer.create(str(instance.source), "image")
                create_samples.append(time.perf_counter() - sent)
                with picked_cond:
                    if not picked_cond.wait_for(lambda: job_id in picked, timeout=25):
                        missed += 1
                        continue
                samples.append(picked[job_id] - sent)
            stop.set()
            for _ in threads:  # release the waiters still waiting
                producer.create(str(instance.source), "image")
        for t in threads:
            t.join(timeout=25)
    return {"jobs": jobs, "waiters": waiters, **summary_ms(samples), "missed": missed, "errors": len(errors),
            "create_median_ms": summary_ms(create_samples)["median_ms"]}


# -- (5) CPU of idle long polls --------------------------------------------------------------------

def idle_cpu(instance: Instance, pollers: int = 100, seconds: float = 20.0, wait: float = 20.0) -> dict[str, Any]:
    """``pollers`` long polls for a content type nobody creates; the server's CPU over ``seconds``."""
    data_dir = instance.data_dir("idle")
    stop = threading.Event()
    early = Counter()
    errors: list[str] = []
    returned: list[float] = []
    lock = threading.Lock()

    def poller(port: int, index: int) -> None:
        with Api(port, instance.keys["worker"], timeout=wait + 30) as api:
            for _ in range(int(seconds / wait) + 10):
                if stop.is_set():
                    break
                started = time.monotonic()
                try:
                    body = api.poll(f"idle-{index}", "youtube", wait=wait)
                except (BadStatus, OSError) as exc:
                    errors.append(str(exc))
                    return
                if body["job_id"] is None and time.monotonic() - started < wait - 1 and not stop.is_set():
                    early[index] += 1
                if body["job_id"] is not None:
                    with lock:
                        returned.append(time.monotonic())
                    return

    with Server(instance, data_dir) as server:
        threads = [threading.Thread(target=poller, args=(server.port, i), daemon=True) for i in range(pollers)]
        for t in threads:
            t.start()
        time.sleep(2.0)  # every poll connected and waiting
        cpu_before, t0 = server.cpu_seconds(), time.monotonic()
        time.sleep(seconds)
        cpu, elapsed = server.cpu_seconds() - cpu_before, time.monotonic() - t0
        stop.set()
        released_at = time.monotonic()
        with Api(server.port, instance.keys["producer"]) as producer:
            for _ in range(pollers):
                producer.create(str(instance.source), "youtube")
        for t in threads:
            t.join(timeout=wait + 30)
        release = (max(returned) - released_at) if returned else None
    return {"pollers": pollers, "seconds": round(elapsed, 2), "cpu_seconds": round(cpu, 3),
            "percent_of_one_core": round(cpu / elapsed * 100, 2),
            "returned_early": sum(early.values()), "errors": len(errors),
            "release_all_seconds": round(release, 3) if release is not None else None}


# -- (7) the write stall while a worker restarts --------------------------------------------------

def restart_stall(instance: Instance, jobs: int = 50_000, before: float = 1.0, after: float = 1.0,
                  gap: float = 0.005) -> dict[str, Any]:
    """A producer creates a job every ``gap`` seconds (a new connection each, so the kernel hands
    it to a process that is serving) while one of the two worker processes is restarted (SIGTERM:
    it finishes its requests and exits, gunicorn starts another, which builds its catalog of the
    ``jobs`` pending ones before it serves); the longest create meanwhile is the write stall a
    worker start causes (target: <= 100 ms), beside the longest before it (the machine's noise)."""
    data_dir = instance.data_dir("restart")
    seed_pending(data_dir, instance.source, {"audio": jobs})
    samples: list[tuple[float, float]] = []  # (sent, seconds)
    errors: list[str] = []
    stop = threading.Event()

    def producer(port: int) -> None:
        while not stop.is_set():
            sent = time.perf_counter()
            try:
                with Api(port, instance.keys["producer"]) as api:
                    api.create(str(instance.source), "video")
            except (BadStatus, OSError) as exc:
                errors.append(str(exc))
            samples.append((sent, time.perf_counter() - sent))
            time.sleep(gap)

    with Server(instance, data_dir) as server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.catalogs_built < server.workers:  # both have booted
            time.sleep(0.01)
        thread = threading.Thread(target=producer, args=(server.port,), daemon=True)
        thread.start()
        time.sleep(before)
        old = server.worker_pids()
        built = server.catalogs_built
        killed = time.perf_counter()
        os.kill(old[0], signal.SIGTERM)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.catalogs_built == built:  # the new one has built its catalog
            time.sleep(0.01)
        booted = time.perf_counter()
        time.sleep(after)
        stop.set()
        thread.join(30)
    during = [took for sent, took in samples if killed <= sent <= booted]
    calm = [took for sent, took in samples if sent < killed]
    return {"jobs": jobs, "restart_seconds": round(booted - killed, 2), **summary_ms(during),
            "before_max_ms": summary_ms(calm)["max_ms"], "creates": len(samples), "errors": len(errors)}
