"""Operator commands: ``flask --app morag_remote remote-jobs ...`` and ``... keys ...``.

Each command is a thin wrapper around the same service the API uses (same locks, so safe from cron
while gunicorn serves). Errors are one line on stderr and a non-zero exit, never a traceback;
``--json`` prints what a script would parse (on stdout; logs go to stderr).

Exit codes: 0 success; 1 failure (fsck found a problem, a bad key request, ...); 2 bad usage (an
unknown option or command, a bad option value); 3 no such job; 4 the job's state does not allow
it (cancel a finished job, retry a pending one).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from typing import IO, Any, Callable, Iterator

import click
from flask import current_app
from flask.cli import with_appcontext

from flask import Flask

from . import schemas
from .auth import ROLES
from .context import artifacts, backend, key_store, service, uploads, workers
from .events.cli import deliver_command
from .exceptions import ServiceError
from .fileio import fsync_dir, stage_open, unlink_quietly
from .models import STATUSES
from .store.base import JobFilter

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
_EXIT_BY_STATUS = {404: EXIT_NOT_FOUND, 409: EXIT_CONFLICT}


class OneLineGroup(click.Group):
    """A group whose commands fail in one line ("Error: ..."): a usage error without the usage
    block, a service error (no such job, a state that does not allow it, a store or database that
    cannot be used, a value it cannot store) with its exit code, and a failure of the system
    (EIO, a directory where the store expects a file), never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            exc.ctx = None  # the message already names the option; --help shows the usage
            raise
        except ServiceError as exc:
            raise CommandFailed(exc.detail, _EXIT_BY_STATUS.get(exc.status_code, EXIT_FAILURE)) from None
        except OSError as exc:  # e.g. the instance folder damaged under the store (a directory for its lock)
            where = f": {exc.filename}" if exc.filename else ""
            raise CommandFailed(f"{exc.strerror or exc}{where}") from None


class CommandFailed(click.ClickException):
    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


jobs_cli = OneLineGroup("remote-jobs", help="Inspect and maintain the remote job queue. Exit codes: 0 ok, "
                        "1 failure, 2 bad usage, 3 no such job, 4 the job's state does not allow it.")
keys_cli = OneLineGroup("keys", help="Create, list and revoke API keys.")

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _emit(as_json: bool, value: Any, human: Callable[[Any], str]) -> None:
    click.echo(json.dumps(value, indent=None, sort_keys=True, default=str) if as_json else human(value))


def _job_line(job: dict) -> str:
    return (f"{job['id']}  {job['status']:<10} {job['content_type']:<9} retries={job['retry_count']} "
            f"worker={job['worker_id'] or '-'}")


@jobs_cli.command("cleanup-expired")
@json_option
@with_appcontext
def cleanup_expired(as_json: bool) -> None:
    """Re-queue or time out jobs whose lease lapsed, expire pending jobs past their TTL, and delete
    uploads not finished within UPLOAD_EXPIRY_SECONDS (the counts)."""
    count = service().expire_due()
    expired_uploads = uploads().expire()
    body = {"expired": count, **({"uploads_expired": expired_uploads} if expired_uploads else {})}
    _emit(as_json, body, lambda v: f"{v['expired']} job(s) handled" + (
        f", {v['uploads_expired']} upload(s) expired" if "uploads_expired" in v else ""))


MAX_CLEANUP_DAYS = 36_500  # a century: beyond it the cutoff would leave the calendar (OverflowError)


def _finite(_ctx: click.Context, _param: click.Parameter, value: float | None) -> float | None:
    """click's FloatRange lets NaN through (it compares false with both bounds)."""
    if value is not None and math.isnan(value):
        raise click.BadParameter("not a number")
    return value


@jobs_cli.command("cleanup-old")
@click.option("--days", type=click.FloatRange(min=0, max=MAX_CLEANUP_DAYS), callback=_finite, required=True,
              help="Age in days of finished jobs to delete.")
@json_option
@with_appcontext
def cleanup_old(days: float, as_json: bool) -> None:
    """Delete finished jobs (completed, failed, timeout, cancelled) older than --days (the count)."""
    count = service().cleanup_old(days)
    artifacts().sweep(service().store)  # the deleted jobs' artifacts go with them
    _emit(as_json, {"deleted": count}, lambda v: f"{v['deleted']} job(s) deleted")


@jobs_cli.command("list")
@click.option("--status", type=click.Choice(STATUSES))
@click.option("--content-type")
@click.option("--ingestion-task-id")
@click.option("--worker-id")
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
@click.option("--after", metavar="CURSOR", help="Continue after this job id (the previous page's next_cursor).")
@json_option
@with_appcontext
def list_jobs(status: str | None, content_type: str | None, ingestion_task_id: str | None,
              worker_id: str | None, limit: int, after: str | None, as_json: bool) -> None:
    """List jobs in creation order, without result bodies; --json gives {jobs, next_cursor}."""
    known = service().settings.content_types
    if content_type is not None and content_type not in known:
        raise click.BadParameter(f"{content_type!r} is not one of {', '.join(map(repr, known))}.",
                                 param_hint="'--content-type'")
    filters = JobFilter(status=status, content_type=content_type, ingestion_task_id=ingestion_task_id,
                        worker_id=worker_id)
    jobs, next_cursor = service().list(filters, after, limit)
    body = {"jobs": schemas.JobSummary(many=True).dump(jobs), "next_cursor": next_cursor}
    _emit(as_json, body, lambda b: "\n".join([_job_line(r) for r in b["jobs"]] + (
        [f"more: --after {b['next_cursor']}"] if b["next_cursor"] else [])) or "no jobs")


@jobs_cli.command("show")
@click.argument("job_id")
@json_option
@with_appcontext
def show(job_id: str, as_json: bool) -> None:
    """One job; --json prints the whole record with its result."""
    job = service().get(job_id)
    _emit(as_json, schemas.JobDetail().dump(job), _describe)


def _describe(job: dict) -> str:
    fields = ("id", "status", "content_type", "ingestion_task_id", "source_file_path", "priority",
              "worker_id", "attempt", "retry_count", "max_retries", "releases", "created_at", "started_at",
              "timeout_at", "completed_at", "progress", "error_message", "requires", "available_at",
              "expires_at", "on_lapse")
    lines = [f"{name + ':':<18} {job[name] if job[name] is not None else '-'}" for name in fields]
    result = job.get("result_data")
    if result:
        lines.append(f"{'result:':<18} {len(result.get('content') or '')} characters of content")
    if job.get("source_sha256") or job.get("source_size") is not None:
        lines.append(f"{'source:':<18} {job.get('source_size')} bytes, sha256 {job.get('source_sha256') or '-'}")
    for artifact in job.get("artifacts") or ():
        lines.append(f"{'artifact:':<18} {artifact['name']}  {artifact['size']} bytes  sha256 {artifact['sha256']}")
    return "\n".join(lines)


@jobs_cli.command("stats")
@json_option
@with_appcontext
def stats(as_json: bool) -> None:
    """Counts by status and content type, the oldest pending job's age, workers seen."""
    body = service().estimates.queue_summary()
    _emit(as_json, schemas.StatsResponse().dump(body), lambda b: "\n".join(
        [f"{status:<10} {ct:<9} {n}" for status, per in sorted(b["counts"].items())
         for ct, n in sorted(per.items())]
        + [f"paused: {', '.join(ct for ct, t in sorted(b['types'].items()) if t['paused']) or 'none'}"]
        + [f"oldest pending: {b['oldest_pending_age_seconds']} s", f"active workers: {len(b['active_workers'])}"]))


def _type_line(t: dict) -> str:
    limit = "-" if t["max_processing"] is None else f"{t['max_processing']} ({t['limit_source']})"
    return (f"{t['content_type']:<9} {'paused' if t['paused'] else 'active':<7} "
            f"processing={t['processing']} limit={limit}")


def _known_type(content_type: str) -> str:
    known = service().settings.content_types
    if content_type not in known:
        raise click.BadParameter(f"{content_type!r} is not one of {', '.join(map(repr, known))}.",
                                 param_hint="'TYPE'")
    return content_type


@jobs_cli.command("types")
@json_option
@with_appcontext
def types_command(as_json: bool) -> None:
    """Each content type: paused or active, jobs processing, the limit in force and where it comes from."""
    body = schemas.TypeState(many=True).dump(list(service().type_states().values()))
    _emit(as_json, body, lambda rows: "\n".join(map(_type_line, rows)))


@jobs_cli.command("pause")
@click.argument("content_type", metavar="TYPE")
@json_option
@with_appcontext
def pause_command(content_type: str, as_json: bool) -> None:
    """Stop claims of TYPE on every host (running jobs go on, creates are accepted); durable."""
    svc = service()
    state = schemas.TypeState().dump(svc.type_state(svc.pause(_known_type(content_type))))
    _emit(as_json, state, _type_line)


@jobs_cli.command("resume")
@click.argument("content_type", metavar="TYPE")
@json_option
@with_appcontext
def resume_command(content_type: str, as_json: bool) -> None:
    """Let workers claim TYPE again."""
    svc = service()
    state = schemas.TypeState().dump(svc.type_state(svc.resume(_known_type(content_type))))
    _emit(as_json, state, _type_line)


def _limit_value(_ctx: click.Context, _param: click.Parameter, value: str) -> int | None:
    if value.strip().lower() in ("none", "null", "config"):
        return None
    try:
        number = int(value)
    except ValueError:
        raise click.BadParameter("a whole number, 0 or more, or 'none' (back to MAX_PROCESSING)") from None
    if number < 0:
        raise click.BadParameter("a whole number, 0 or more, or 'none' (back to MAX_PROCESSING)")
    return number


@jobs_cli.command("limit")
@click.argument("content_type", metavar="TYPE")
@click.argument("max_processing", metavar="N|none", callback=_limit_value)
@json_option
@with_appcontext
def limit_command(content_type: str, max_processing: int | None, as_json: bool) -> None:
    """At most N jobs of TYPE processing at once across the fleet ('none': MAX_PROCESSING again)."""
    svc = service()
    state = schemas.TypeState().dump(svc.type_state(svc.set_limit(_known_type(content_type), max_processing)))
    _emit(as_json, state, _type_line)


@jobs_cli.command("workers")
@json_option
@with_appcontext
def workers_command(as_json: bool) -> None:
    """The workers heard from in the last day: last seen, host, what they poll for, jobs held."""
    body = schemas.WorkersResponse().dump({"workers": workers().list()})
    _emit(as_json, body, lambda b: "\n".join(
        f"{w['worker_id']}  seen={w['last_seen'] or '-'} host={w['hostname'] or '-'} "
        f"version={w['version'] or '-'} types={','.join(w['content_types']) or '-'} "
        f"jobs={','.join(j['job_id'] for j in w['jobs']) or '-'}" for w in b["workers"]) or "no worker seen")


@jobs_cli.command("cancel")
@click.argument("job_id")
@json_option
@with_appcontext
def cancel(job_id: str, as_json: bool) -> None:
    """Cancel a pending, processing or held job (exit 4 when it has finished)."""
    job = service().cancel(job_id)
    _emit(as_json, schemas.JobSummary().dump(job), lambda j: f"{j['id']} {j['status']}")


@jobs_cli.command("retry")
@click.argument("job_id")
@json_option
@with_appcontext
def retry(job_id: str, as_json: bool) -> None:
    """Put a failed, timed-out, cancelled or held job back in the queue (exit 4 for any other state)."""
    job = service().retry(job_id)
    _emit(as_json, schemas.JobSummary().dump(job), lambda j: f"{j['id']} {j['status']}")


@jobs_cli.command("fsck")
@click.option("--repair", is_flag=True, help="Repair what can be repaired; move unreadable files to corrupt/.")
@json_option
@with_appcontext
def fsck_command(repair: bool, as_json: bool) -> None:
    """Check the store (files or database); exit 1 when a problem is found (with --repair: when one is left)."""
    try:
        findings = backend().fsck(repair) + artifacts().fsck(service().store, repair)
    except OSError as exc:  # the system failed (EIO, EMFILE...): no verdict on any file, nothing moved
        raise CommandFailed(f"fsck stopped: {exc}") from None
    _emit(as_json, [f.as_dict() for f in findings], lambda fs: "\n".join(
        f"{f['kind']:<10} {f['path']}  {f['detail']}{'  [repaired]' if f['repaired'] else ''}" for f in fs)
        or "store is clean")
    left = [f for f in findings if not f.repaired]
    if left:
        sys.exit(EXIT_FAILURE)


@keys_cli.command("create")
@click.option("--role", type=click.Choice(ROLES), required=True)
@click.option("--name", required=True)
@click.option("--worker-id", default=None, help="Bind a worker key to this worker id.")
@with_appcontext
def keys_create(role: str, name: str, worker_id: str | None) -> None:
    """Create a key; the key itself is printed alone on the last line, once."""
    key, secret = key_store().create(name, role, worker_id)
    click.echo(f"created {key.role} key {key.name!r}" + (f" for worker {worker_id!r}" if worker_id else ""), err=True)
    click.echo(secret)


@keys_cli.command("bootstrap-admin")
@with_appcontext
def keys_bootstrap_admin() -> None:
    """When no key exists yet, create an admin key in <instance>/admin-key.txt (mode 0600)."""
    store = key_store()
    if current_app.config["AUTH_DISABLED"] or store.has_keys():
        return
    path = os.path.join(current_app.instance_path, "admin-key.txt")
    _, secret = store.create("admin", "admin")
    try:
        with _private_file(path) as fh:
            fh.write(secret + "\n")
    except OSError as exc:
        store.revoke("admin")
        raise click.ClickException(f"{exc.strerror}; no key was created") from None
    click.echo(f"created an admin API key; it is in {path} (readable by you only)")


@contextlib.contextmanager
def _private_file(path: str) -> Iterator[IO[str]]:
    """A text file for ``path``, mode 0600 from the first byte, that appears there (fsynced, by
    rename) only when the block ends without error; else nothing is left behind. Failing to create
    or place it is an OSError that names ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    with _naming(path):
        tmp, fd = stage_open(folder, name, b"", sync=False)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
            with _naming(path):
                fh.flush()
                os.fsync(fh.fileno())
        with _naming(path):
            os.replace(tmp, path)
            fsync_dir(folder)
    finally:
        unlink_quietly(tmp)  # gone already once renamed into place


@contextlib.contextmanager
def _naming(path: str) -> Iterator[None]:
    """An OSError inside, told as one that names ``path`` (not the temp file's name)."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, f"could not write {path}: {exc.strerror}") from None


@keys_cli.command("list")
@json_option
@with_appcontext
def keys_list(as_json: bool) -> None:
    """Names, roles, creation and last use of every key (never the key)."""
    rows = [k.public() for k in key_store().list()]
    _emit(as_json, rows, lambda rs: "\n".join(
        f"{r['name']:<20} {r['role']:<9} worker={r['worker_id'] or '-'} created={r['created_at']} "
        f"last_used={r['last_used_at'] or 'never'}" for r in rs) or "no keys")


@keys_cli.command("revoke")
@click.argument("name")
@with_appcontext
def keys_revoke(name: str) -> None:
    """Revoke (delete) the key called NAME."""
    key_store().revoke(name)
    click.echo(f"revoked {name}")


jobs_cli.add_command(deliver_command)

@jobs_cli.command("export")
@click.option("--output", type=click.Path(dir_okay=False, allow_dash=True), default="-",
              help="File to write (default: standard output); written whole or not at all, mode 0600.")
@with_appcontext
def export_command(output: str) -> None:
    """Write every job as JSON lines (to move the store to another backend)."""
    from .transfer import export_jobs

    if output == "-":
        count = export_jobs(service().store, sys.stdout)
    else:
        with _private_file(output) as fh:
            count = export_jobs(service().store, fh)
    click.echo(f"exported {count} job(s)", err=True)


@jobs_cli.command("import")
@click.option("--input", "input_", type=click.File("rb"), default="-",
              help="JSON lines from 'remote-jobs export' (default: standard input).")
@json_option
@with_appcontext
def import_command(input_, as_json: bool) -> None:
    """Store the jobs of an export; idempotent by id, never replaces a newer copy. Exit 1 on a bad line."""
    from .transfer import import_jobs

    report = import_jobs(service().store, input_)
    for error in report.errors:
        click.echo(error, err=True)
    _emit(as_json, report.as_dict(), lambda r: ", ".join(f"{n} {k}" for k, n in r.items()))
    if report.errors:
        sys.exit(1)


db_cli = OneLineGroup("db", help="Schema of the PostgreSQL backend (MORAG_REMOTE_DATABASE_URL).")


def _migrations():
    migrations = backend().migrations
    if migrations is None:
        raise click.ClickException("MORAG_REMOTE_DATABASE_URL is not set: the JSON-file store needs no migrations")
    return migrations


@db_cli.command("upgrade")
@with_appcontext
def db_upgrade() -> None:
    """Apply the pending migrations (safe to run on every start and from several hosts at once)."""
    applied, version = _migrations().upgrade()
    done = f"applied {', '.join(f'{m.version:04d}_{m.name}' for m in applied)}" if applied else "up to date"
    click.echo(f"{done}; schema version {version}")


@db_cli.command("current")
@with_appcontext
def db_current() -> None:
    """Print the schema version of the database, and whether migrations are pending."""
    version, latest = _migrations().current()
    click.echo(f"{version}" + ("" if version >= latest else f" (latest {latest}: run 'db upgrade')"))


def register_commands(app: Flask) -> None:
    app.cli.add_command(jobs_cli)
    app.cli.add_command(keys_cli)
    app.cli.add_command(db_cli)
