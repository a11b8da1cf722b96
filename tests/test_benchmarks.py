"""``python -m benchmarks --quick`` (the smoke run of ``make bench``) runs end to end: real gunicorn
servers for every scenario, the PostgreSQL column against a schema of its own that is dropped
afterwards, and one line saying why that column is missing when no server answers. The figures of a
quick run mean nothing; what is checked is that every scenario ran, and ran without errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from support.postgres import free_port

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run_quick(tmp_path: Path, database_url: str, *args: str) -> tuple[str, dict]:
    """The benchmark's stdout and its JSON figures."""
    out = tmp_path / "bench-results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MORAG_REMOTE_")}
    env.update(MORAG_REMOTE_BENCH_DATABASE_URL=database_url, TMPDIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(out.read_text())


@pytest.mark.postgres
def test_quick_run_measures_both_stores(pg_database, tmp_path: Path) -> None:
    stdout, results = run_quick(tmp_path, pg_database.base_url)

    assert [c["label"] for c in results["claims"]] == ["100", "10000", "50000", "10000-other", "100-capable",
                                                        "10000-unclaimable"]
    routed = results["claims"][-1]
    assert routed["pending"] == {"audio needing 80 GB": 100, "audio": 5} and routed["errors"] == 0
    for section in ("raw_store", "cycles", "floor", "pickup", "idle", "restart"):
        assert section in results
    floor = results["floor"]  # trivial views under the same gunicorn settings
    assert floor["cycles"] > 0 and floor["errors"] == 0
    assert "HTTP floor" in stdout and "the full cycles reach" in stdout
    assert results["cycles"]["clients_cpu_percent_of_one_core"] < 200  # the clients only, not the server
    pg = results["postgres"]
    assert pg["server"]["synchronous_commit"] == "on"  # as the server has it: not turned off for the run
    assert [(c["label"], c["pending"]) for c in pg["claims"]] == [
        ("100", {"audio": 5}), ("50000", {"audio": 500}), ("100-capable", {"audio": 5}),
        ("10000-unclaimable", {"audio needing 80 GB": 100, "audio": 5})]
    assert [(c["n"], c["errors"]) for c in pg["claims"]] == [(30, 0)] * 4
    cycles = pg["cycles"]
    assert cycles["cycles"] > 0 and cycles["errors"] == 0 and cycles["double_claims"] == 0
    assert cycles["store_after"]["by_status"]["completed"] == cycles["cycles"]
    assert cycles["store_after"]["findings"] == 0

    checks = {c["check"]: c for c in results["checks"]}
    assert checks["PG claim median at 50,000 / at 100"]["value"] > 0
    assert checks["PG claim median, 10,000 unclaimable (80 GB) + 100 / 100 only"]["value"] > 0
    assert checks["claim median, 10,000 unclaimable (80 GB) + 100 / 100 only"]["value"] > 0
    assert checks["PG double claims"]["ok"] and checks["PG errors (claims, cycles)"]["ok"]
    header = next(line for line in stdout.splitlines() if line.startswith("same run"))
    assert "files" in header and "PostgreSQL" in header and "synchronous_commit=on" in header
    assert "PostgreSQL, 500 audio pending" in stdout

    with psycopg.connect(pg_database.base_url, connect_timeout=3) as conn:
        left = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                            (pg["server"]["schema"],)).fetchone()[0]
    assert left == 0


def test_without_a_server_the_postgres_column_is_one_line(tmp_path: Path) -> None:
    nobody = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    stdout, results = run_quick(tmp_path, nobody, "--only", "cycles")

    assert results["cycles"]["cycles"] > 0 and results["cycles"]["errors"] == 0
    assert "no PostgreSQL at MORAG_REMOTE_BENCH_DATABASE_URL" in results["postgres"]["skipped"]
    mentions = [line for line in stdout.splitlines() if "PostgreSQL" in line]
    assert len(mentions) == 1
    assert mentions[0].startswith("PostgreSQL column skipped: no PostgreSQL at MORAG_REMOTE_BENCH_DATABASE_URL")
    assert "MORAG_REMOTE_BENCH_DATABASE_URL=postgresql://" in mentions[0]
    assert not any(c["check"].startswith("PG ") for c in results["checks"])


def test_the_worker_scenario_runs_the_command_and_times_its_pickups(tmp_path: Path) -> None:
    nobody = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    stdout, results = run_quick(tmp_path, nobody, "--only", "worker")

    worker = results["worker"]
    assert worker["completed"] == worker["jobs"] and worker["errors"] == 0 and worker["worker_exit"] == 0
    assert worker["jobs_per_s"] > 0 and worker["create_to_handler_start"]["n"] == 5
    assert "worker (--exec true, --concurrency 8)" in stdout
    assert any(c["check"].startswith("worker: create to handler start") for c in results["checks"])


def test_the_waiters_scenario_keeps_every_poll_waiting_and_counts_the_wake_ups(tmp_path: Path) -> None:
    stdout, results = run_quick(tmp_path, "", "--only", "waiters")

    figures = results["waiters"]
    assert figures["pollers"] == 50 and figures["turned_away"] == 0 and figures["errors"] == 0
    assert figures["missed"] == 0 and figures["pickup"]["n"] == 5
    assert figures["wakeups"] >= 5 and figures["rss_mib"]["waiting"] > 0
    assert "50 waiting long polls" in stdout
    assert any(c["check"] == "50 waiting polls: turned away" and c["ok"] for c in results["checks"])


def test_the_slow_client_scenario_counts_connections_and_closes_them(tmp_path: Path) -> None:
    stdout, results = run_quick(tmp_path, "", "--only", "slow")
    figures = results["slow_clients"]
    assert [p["slow_connections"] for p in figures["probes"]][0] == 32
    assert figures["answers_again_after_they_close"] is True
    assert "slow clients (a byte a second)" in stdout
