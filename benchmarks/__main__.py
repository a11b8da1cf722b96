"""``python -m benchmarks`` (``make bench``): run every measurement, print the table, write JSON.

``--quick`` runs the same code with small sizes (a smoke run, its figures mean nothing). When the
PostgreSQL server that ``MORAG_REMOTE_BENCH_DATABASE_URL`` names answers, the claim and cycle
scenarios also run against a server on a schema of their own there (the PostgreSQL column);
otherwise the table says in one line why that column is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone

from . import files, floor, pg, report, scenarios, slow_clients, waiters, worker
from .server import REPO, Instance


SCENARIOS = ("raw", "claims", "cycles", "floor", "pickup", "idle", "waiters", "restart", "worker", "slow", "files")
DEPTHS = [("100", {"audio": 100}), ("10000", {"audio": 10_000}), ("50000", {"audio": 50_000}),
          ("10000-other", {"video": 10_000, "audio": 100}),
          # routing: a worker with 24 GB, 10,000 pending jobs it cannot take (they need 80 GB) in front
          # of the 100 it can, against the same worker and the 100 alone
          ("100-capable", {"audio": 100}),
          ("10000-unclaimable", {"audio needing 80 GB": 10_000, "audio": 100})]
ROUTED_DEPTHS = {"100-capable", "10000-unclaimable"}
WORKER_RESOURCES = "gpu_memory_gb:24"
PG_DEPTHS = ("100", "50000", "100-capable", "10000-unclaimable")  # the PostgreSQL column's claim depths


def machine() -> dict:
    cpu = platform.processor() or "unknown cpu"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "kernel": platform.release()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--out", default="bench-results.json", help="where to write the JSON figures")
    parser.add_argument("--quick", action="store_true", help="small sizes: check that the benchmark runs")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {','.join(SCENARIOS)} (the targets need all)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary instance folder (and the PostgreSQL schema)")
    args = parser.parse_args(argv)
    q = args.quick
    only = set(args.only.split(","))
    if not only <= set(SCENARIOS):
        parser.error(f"--only takes {','.join(SCENARIOS)}")
    instance = Instance.create()
    started = time.monotonic()
    results: dict = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                     "quick": q, "server": gunicorn_settings()}
    schema: pg.BenchSchema | None = None
    claims = {"samples": 30, "warmup": 5} if q else {"samples": 500, "warmup": 20}
    cycles = {"clients": 4, "seconds": 2} if q else {"clients": 16, "seconds": 20}
    try:
        def step(name: str) -> None:
            print(f"[{time.monotonic() - started:6.1f} s] {name}", file=sys.stderr, flush=True)

        def sized(seeded: dict[str, int]) -> dict[str, int]:
            return {t: max(n // 100, 5) for t, n in seeded.items()} if q else seeded

        if only & {"claims", "cycles"}:
            schema = _postgres(instance, results)
        if "raw" in only:
            step("raw store")
            results["raw_store"] = scenarios.raw_store(instance, seconds=1 if q else 5)
        if "claims" in only:
            results["claims"] = []
            for label, seeded in DEPTHS:
                step(f"claim latency, {label}")
                results["claims"].append(scenarios.claim_latency(instance, label, sized(seeded), **claims,
                                                                 resources=_resources(label)))
            if schema is not None:
                results["postgres"]["claims"] = []
                for label in PG_DEPTHS:
                    step(f"PostgreSQL claim latency, {label}")
                    results["postgres"]["claims"].append(
                        scenarios.claim_latency(instance, label, sized(dict(DEPTHS)[label]), **claims, pg=schema,
                                                resources=_resources(label)))
        if "cycles" in only:
            step("full cycles")
            results["cycles"] = scenarios.full_cycles(instance, **cycles)
            if schema is not None:
                step("PostgreSQL full cycles")
                results["postgres"]["cycles"] = scenarios.full_cycles(instance, **cycles, pg=schema)
        if "floor" in only:
            step("HTTP floor (trivial views, same gunicorn settings)")
            results["floor"] = floor.http_floor(results["server"], **cycles)
        if "pickup" in only:
            step("long-poll pick-up")
            results["pickup"] = scenarios.pickup_latency(instance, jobs=5 if q else 50)
        if "idle" in only:
            step("idle long polls")
            results["idle"] = scenarios.idle_cpu(instance, pollers=10 if q else 100, seconds=2 if q else 20,
                                                 wait=3 if q else 20)
        if "waiters" in only:
            step("1,000 long-polling workers on one host")
            results["waiters"] = waiters.thousand_waiters(
                instance, **({"pollers": 50, "jobs": 5, "idle_seconds": 2} if q else {}))
        if "restart" in only:
            step("write stall while a worker restarts")
            results["restart"] = scenarios.restart_stall(instance, jobs=500 if q else 50_000)
        if "worker" in only:
            step("morag-remote-worker --exec true --concurrency 8")
            results["worker"] = worker.worker_scenario(instance, jobs=20 if q else 200, pickups=5 if q else 30)
        if "slow" in only:
            step("slow clients (a byte a second) until a request is not answered")
            results["slow_clients"] = slow_clients.stall_point(
                instance, **({"step": 32, "limit": 64} if q else {}))
        if "files" in only:
            size = files.size_from_env(q)
            step(f"files: upload and download of {size / 2**20:,.0f} MiB against curl's floor")
            results["files"] = files.throughput(instance, size, rounds=1 if q else files.UPLOAD_ROUNDS)
    finally:
        if schema is not None and not args.keep:
            schema.drop()
        if not args.keep:
            shutil.rmtree(instance.path, ignore_errors=True)
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["checks"] = report.checks(results)
    results["total_seconds"] = round(time.monotonic() - started, 1)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(report.table(results))
    print(f"\nwritten to {args.out} in {results['total_seconds']} s")
    return 0


def _resources(label: str) -> str:
    return WORKER_RESOURCES if label in ROUTED_DEPTHS else ""


def _postgres(instance: Instance, results: dict) -> pg.BenchSchema | None:
    """This run's PostgreSQL schema, created, or None with the reason recorded in ``results``."""
    base, why = pg.probe()
    if base is None:
        results["postgres"] = {"skipped": why, "how": pg.HOW}
        return None
    schema = pg.BenchSchema(base, instance)
    try:
        schema.create()
        results["postgres"] = {"server": schema.settings()}
    except BaseException:
        schema.drop()
        raise
    return schema


def gunicorn_settings() -> dict:
    """What gunicorn.conf.py chooses in this environment (the servers are started with it)."""
    namespace: dict = {}
    with open(REPO / "gunicorn.conf.py") as fh:
        exec(compile(fh.read(), "gunicorn.conf.py", "exec"), namespace)
    return {"workers": namespace.get("workers"), "threads": namespace.get("threads"),
            "worker_class": namespace.get("worker_class"),
            "poll_max_waiters": os.environ.get("MORAG_REMOTE_POLL_MAX_WAITERS", "app default")}


if __name__ == "__main__":
    sys.exit(main())
