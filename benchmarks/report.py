"""The issue's targets, checked against one run's figures, and the printed table.

``r["postgres"]`` holds the PostgreSQL column (its own ``claims`` and ``cycles``, shaped like the
file store's), or ``skipped`` and ``how`` when no server answered.
"""
from __future__ import annotations

from typing import Any, Callable

SEED_CYCLES_PER_S = 60.0  # the original specification's implementation, same kind of machine


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def _claim_ratio(claims: list[dict[str, Any]]) -> float | None:
    """Median claim latency at 50,000 pending over the same at 100."""
    by_label = {c["label"]: c["median_ms"] for c in claims}
    return _ratio(by_label.get("50000"), by_label.get("100"))


def _routing_ratio(claims: list[dict[str, Any]]) -> float | None:
    """A 24 GB worker's median claim with 10,000 pending jobs it cannot take (80 GB) in front of
    100 it can, over the same worker's with only the 100."""
    by_label = {c["label"]: c["median_ms"] for c in claims}
    return _ratio(by_label.get("10000-unclaimable"), by_label.get("100-capable"))


def checks(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issues #8 and #9 whose figures this run has: value, goal, met or not."""
    rows: list[tuple[str, Any, str, Callable[[Any], bool]]] = []
    if "claims" in r:
        claims = {c["label"]: c for c in r["claims"]}
        base = claims["100"]["median_ms"]
        rows += [
            ("claim median at 50,000 / at 100", _claim_ratio(r["claims"]), "<= 2",
             lambda v: v is not None and v <= 2),
            ("claim median at 10,000 other type / at 100", _ratio(claims["10000-other"]["median_ms"], base),
             "<= 2", lambda v: v is not None and v <= 2),
        ]
        if "10000-unclaimable" in claims:
            rows.append(("claim median, 10,000 unclaimable (80 GB) + 100 / 100 only", _routing_ratio(r["claims"]),
                         "<= 2", lambda v: v is not None and v <= 2))
        if "first_polls" in claims.get("50000", {}):
            rows.append(("first 10 polls after a start at 50,000 / steady (median)",
                         _ratio(claims["50000"]["first_polls"]["median_ms"], claims["50000"]["median_ms"]),
                         "<= 2", lambda v: v is not None and v <= 2))
    if "pickup" in r:
        rows.append(("long-poll pick-up median (ms)", r["pickup"]["median_ms"], "<= 100",
                     lambda v: v is not None and v <= 100))
    if "restart" in r:
        rows.append((f"longest write during a worker restart at {r['restart']['jobs']:,} (ms)", r["restart"]["max_ms"],
                     "<= 100", lambda v: v is not None and v <= 100))
    if "worker" in r:
        rows.append(("worker: create to handler start median (ms)",
                     r["worker"]["create_to_handler_start"]["median_ms"], "<= 50", lambda v: v is not None and v <= 50))
    if "idle" in r:
        rows.append(("100 idle long polls, % of one core", r["idle"]["percent_of_one_core"], "< 5", lambda v: v < 5))
    if "waiters" in r:
        wt = r["waiters"]
        n = f"{wt['pollers']:,}"
        rows += [
            (f"{n} waiting polls: turned away", wt["turned_away"], "0", lambda v: v == 0),
            (f"{n} idle waiting polls, % of one core", wt["idle_percent_of_one_core"], "<= 10", lambda v: v <= 10),
            (f"pick-up among {n} waiting, median (ms)", wt["pickup"]["median_ms"], "<= 50",
             lambda v: v is not None and v <= 50),
            (f"pick-up among {n} waiting, p99 (ms)", wt["pickup"]["p99_ms"], "<= 200",
             lambda v: v is not None and v <= 200),
        ]
    if "cycles" in r:
        cyc = r["cycles"]
        if "raw_store" in r:
            rows.append(("full cycles/s / raw store cycles/s", _ratio(cyc["cycles_per_s"], r["raw_store"]["cycles_per_s"]),
                         ">= 0.4", lambda v: v is not None and v >= 0.4))
        rows.append(("server CPU per full cycle (ms, user + system)", cpu_per_cycle(cyc), "<= 2.5",
                     lambda v: v <= 2.5))
        if "floor" in r:
            rows.append(("full cycles/s / HTTP floor cycles/s", _ratio(cyc["cycles_per_s"], r["floor"]["cycles_per_s"]),
                         ">= 0.5", lambda v: v is not None and v >= 0.5))
        rows += [
            ("full cycles/s vs the original (60/s)", cyc["cycles_per_s"], f">= {3 * SEED_CYCLES_PER_S:g}",
             lambda v: v >= 3 * SEED_CYCLES_PER_S),
            ("double claims", cyc["double_claims"], "0", lambda v: v == 0),
        ]
    if "files" in r:
        rows += [("files: upload MB/s / floor", r["files"]["upload_share_of_floor"], ">= 0.7", lambda v: v >= 0.7),
                 ("files: download MB/s / floor", r["files"]["download_share_of_floor"], ">= 0.7", lambda v: v >= 0.7)]
    rows.append(("errors (all scenarios)", total_errors(r), "0", lambda v: v == 0))
    pg = r.get("postgres", {})
    if "claims" in pg:
        rows.append(("PG claim median at 50,000 / at 100", _claim_ratio(pg["claims"]), "<= 1.5",
                     lambda v: v is not None and v <= 1.5))
        if any(c["label"] == "10000-unclaimable" for c in pg["claims"]):
            rows.append(("PG claim median, 10,000 unclaimable (80 GB) + 100 / 100 only", _routing_ratio(pg["claims"]),
                         "<= 2", lambda v: v is not None and v <= 2))
    if "cycles" in pg:
        rows.append(("PG double claims", pg["cycles"]["double_claims"], "0", lambda v: v == 0))
    if "claims" in pg or "cycles" in pg:
        rows.append(("PG errors (claims, cycles)", column_errors(pg), "0", lambda v: v == 0))
    return [{"check": name, "value": value, "target": target, "ok": bool(ok(value))}
            for name, value, target, ok in rows]


def column_errors(r: dict[str, Any]) -> int:
    """Failed requests and claims of the wrong job in the claim and cycle scenarios, and what the
    check of the store afterwards found (fsck for the files, row against document for PostgreSQL)."""
    n = sum(c["errors"] for c in r.get("claims", []))
    if "cycles" in r:
        n += r["cycles"]["errors"] + r["cycles"]["store_after"]["findings"]
    return n


def total_errors(r: dict[str, Any]) -> int:
    """The file store's errors in every scenario: those of :func:`column_errors`, long polls that
    missed their job or returned early."""
    n = column_errors(r)
    if "pickup" in r:
        n += r["pickup"]["errors"] + r["pickup"]["missed"]
    if "idle" in r:
        n += r["idle"]["errors"] + r["idle"]["returned_early"]
    if "restart" in r:
        n += r["restart"]["errors"]
    if "waiters" in r:
        n += r["waiters"]["errors"] + r["waiters"]["missed"]
    if "floor" in r:
        n += r["floor"]["errors"]
    if "worker" in r:
        n += r["worker"]["errors"]
    return n


def table(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["server"]
    lines = [f"machine: {m['cpu']} x{m['cores']}, load average at start {m['load_average_start']}, "
             f"at the end {m.get('load_average_end')}; "
             f"gunicorn {s['workers']} workers x {s['threads']} threads ({s['worker_class']})", ""]
    pg = r.get("postgres", {})
    if "claims" in r:
        lines.append(f"{'claim latency (one poll claims one job)':<44}{'median ms':>10}{'p99 ms':>9}{'ready s':>9}")
        for store, claims in (("", r["claims"]), ("PostgreSQL, ", pg.get("claims", []))):
            for c in claims:
                pending = ", ".join(f"{n:,} {t}" for t, n in c["pending"].items())
                if c.get("resources"):
                    pending += f" (poller {c['resources']})"
                first = c.get("first_polls")
                lines.append(f"  {store + pending + ' pending':<42}{c['median_ms']:>10}{c['p99_ms']:>9}"
                             f"{c['server_ready_seconds']:>9}"
                             + (f"   first {first['n']} polls after the start: median {first['median_ms']}, "
                                f"longest {first['max_ms']} ms" if first else ""))
        lines.append("")
    if "files" in r:
        from .files import lines as file_lines

        lines += [*file_lines(r["files"]), ""]
    if "raw_store" in r:
        raw = r["raw_store"]
        lines.append(f"raw store (in-process, fsync'd): {raw['transitions_per_s']} transitions/s = "
                     f"{raw['ms_per_transition']} ms each ({raw['fsyncs_per_transition']} fsyncs), "
                     f"{raw['cycles_per_s']} cycles/s")
    if "cycles" in r:
        cyc = r["cycles"]
        lines.append(
            f"full cycles over HTTP, {cyc['clients']} clients x {cyc['seconds']} s: {cyc['cycles_per_s']} cycles/s "
            f"({cyc['cycles']} cycles, {cyc['empty_polls']} empty polls, {cyc['errors']} errors, "
            f"{cyc['double_claims']} double claims, fsck findings {cyc['store_after']['findings']}; "
            f"CPU: server {cyc['server_cpu_percent_of_one_core']}% of a core "
            f"({cyc['server_cpu_ms_per_cycle']['user']} ms user + {cyc['server_cpu_ms_per_cycle']['system']} ms "
            f"system per cycle = {cycles_per_cpu_second(cyc)} full cycles per second of server CPU), clients "
            f"{cyc['clients_cpu_percent_of_one_core']}%, whole machine {cyc['machine_busy_percent']}% busy)")
    if "floor" in r:
        fl = r["floor"]
        share = f"; the full cycles reach {_ratio(r['cycles']['cycles_per_s'], fl['cycles_per_s'])} of it" \
            if "cycles" in r else ""
        lines.append(f"HTTP floor (the same four requests to views that only parse and answer JSON, same gunicorn "
                     f"settings): {fl['cycles_per_s']} cycles/s ({fl['errors']} errors; server "
                     f"{fl['server_cpu_ms_per_cycle']} ms CPU per cycle, whole machine {fl['machine_busy_percent']}% "
                     f"busy){share}")
    if "cycles" in pg:
        cyc = pg["cycles"]
        db_cpu = cyc["database_cpu_ms_per_cycle"]
        lines.append(
            f"PostgreSQL full cycles, {cyc['clients']} clients x {cyc['seconds']} s: {cyc['cycles_per_s']} cycles/s "
            f"({cyc['cycles']} cycles, {cyc['empty_polls']} empty polls, {cyc['errors']} errors, "
            f"{cyc['double_claims']} double claims, row findings {cyc['store_after']['findings']}; "
            f"CPU: server {cyc['server_cpu_percent_of_one_core']}% of a core "
            f"({cyc['server_cpu_ms_per_cycle']['user']} ms user + {cyc['server_cpu_ms_per_cycle']['system']} ms "
            f"system per cycle), database "
            + (f"{db_cpu['user']} ms user + {db_cpu['system']} ms system per cycle "
               f"({cyc['database_backends']} backends)" if db_cpu else "not on this machine")
            + f", whole machine {cyc['machine_busy_percent']}% busy)")
    if "pickup" in r:
        pick = r["pickup"]
        lines.append(f"long-poll pick-up over {pick['jobs']} jobs ({pick['waiters']} waiters): median "
                     f"{pick['median_ms']} ms, p99 {pick['p99_ms']} ms (a create alone: {pick['create_median_ms']} ms)")
    if "idle" in r:
        idle = r["idle"]
        lines.append(f"{idle['pollers']} idle long polls for {idle['seconds']} s: {idle['cpu_seconds']} CPU s = "
                     f"{idle['percent_of_one_core']}% of one core ({idle['returned_early']} returned early; "
                     f"all released in {idle['release_all_seconds']} s)")
    if "waiters" in r:
        wt = r["waiters"]
        lines.append(f"{wt['pollers']:,} waiting long polls ({wt['server']['workers']} processes, threads per process "
                     f"{wt['worker_threads']}): idle {wt['idle_percent_of_one_core']}% of one core over "
                     f"{wt['idle_seconds']} s, turned away {wt['turned_away']}, RSS {wt['rss_mib']['started']} -> "
                     f"{wt['rss_mib']['waiting']} MiB; pick-up over {wt['pickup']['n']} jobs median "
                     f"{wt['pickup']['median_ms']} ms, p99 {wt['pickup']['p99_ms']} ms; "
                     f"{wt['wakeups_per_job']} waiters woken per job ({wt['missed']} missed, {wt['errors']} errors)")
    if "restart" in r:
        rs = r["restart"]
        lines.append(f"a worker restart at {rs['jobs']:,} jobs ({rs['restart_seconds']} s until it had built its "
                     f"catalog): {rs['n']} creates meanwhile, median {rs['median_ms']} ms, p99 {rs['p99_ms']} ms, "
                     f"longest {rs['max_ms']} ms (before the restart: {rs['before_max_ms']} ms)")
    if "worker" in r:
        wk = r["worker"]
        pick = wk["create_to_handler_start"]
        lines.append(f"worker (--exec true, --concurrency {wk['concurrency']}): {wk['jobs_per_s']} jobs/s over a backlog "
                     f"of {wk['jobs']}; create to handler start median {pick['median_ms']} ms, p99 {pick['p99_ms']} ms "
                     f"over {pick['n']} jobs (exit {wk['worker_exit']})")
    if "slow_clients" in r:
        sc = r["slow_clients"]
        stalled = sc["stalled_at"] if sc["stalled_at"] is not None else f"none up to {sc['limit']}"
        lines.append(f"slow clients (a byte a second) that stop /health answering within 3 s: {stalled} "
                     f"({sc['workers']} processes; answers again once they close: {sc['answers_again_after_they_close']})")
    lines += _columns(r)
    lines += ["", f"{'target':<46}{'value':>10}  {'goal':<9}ok"]
    for c in r["checks"]:
        lines.append(f"  {c['check']:<44}{str(c['value']):>10}  {c['target']:<9}{'yes' if c['ok'] else 'NO'}")
    return "\n".join(lines)


def _columns(r: dict[str, Any]) -> list[str]:
    """The file store's figures beside PostgreSQL's, or one line saying why PostgreSQL's are missing."""
    pg = r.get("postgres")
    if pg is None or not ({"claims", "cycles"} & r.keys()):
        return []
    if "skipped" in pg:
        return ["", f"PostgreSQL column skipped: {pg['skipped']}; {pg['how']}"]
    server = pg["server"]
    lines = ["", f"{'same run':<46}{'files':>10}{'PostgreSQL':>12}   (PostgreSQL "
                 f"{server['server_version'].split()[0]}, synchronous_commit={server['synchronous_commit']}, "
                 f"fsync={server['fsync']})"]

    def row(name: str, value: Callable[[dict[str, Any]], Any]) -> None:
        lines.append(f"  {name:<44}{_shown(value, r):>10}{_shown(value, pg):>12}")

    measured = pg.get("claims") or r.get("claims") or []
    pending = {label: next((sum(c["pending"].values()) for c in measured if c["label"] == label), int(label))
               for label in ("100", "50000")}
    for label, n in pending.items():
        def median(section: dict[str, Any], label: str = label) -> Any:
            return next(c["median_ms"] for c in section["claims"] if c["label"] == label)
        row(f"claim median ms, {n:,} pending", median)
    row(f"claim median ratio, {pending['50000']:,} / {pending['100']:,}",
        lambda section: _claim_ratio(section["claims"]))
    clients = pg.get("cycles", r.get("cycles", {})).get("clients", "")
    row(f"full cycles/s, {clients} clients", lambda section: section["cycles"]["cycles_per_s"])
    row("full cycles per second of server CPU", lambda section: cycles_per_cpu_second(section["cycles"]))
    row("double claims", lambda section: section["cycles"]["double_claims"])
    row("errors (claims, cycles, store check)", column_errors)
    return lines


def cpu_per_cycle(cycles: dict[str, Any]) -> float:
    """The server's CPU (user + system, master and workers) per full cycle, in ms."""
    cpu = cycles["server_cpu_ms_per_cycle"]
    return round(cpu["user"] + cpu["system"], 2)


def cycles_per_cpu_second(cycles: dict[str, Any]) -> float | None:
    """Full cycles per second of server CPU: what machines of different speed can compare."""
    ms = cpu_per_cycle(cycles)
    return round(1000 / ms, 1) if ms else None


def _shown(value: Callable[[dict[str, Any]], Any], section: dict[str, Any]) -> str:
    """The figure, or '-' when this run did not measure it."""
    try:
        return str(value(section))
    except (KeyError, StopIteration):
        return "-"
