"""Check and repair the PostgreSQL backend: what can drift between a row's columns and its record.

A crash cannot half-write a row (a transaction commits whole), but a hand edit, a restore or a bug
can leave what the queries filter on disagreeing with what the API reads. Findings, and the repair
of each (the JSON document is the record; the columns are derived from it):

- ``drift``: a job row whose columns (status, content type, priority, times, worker, version...)
  are not what its document says: the columns are written again from the document.
- ``corrupt``: a job row whose document is not a readable job: reported, left as it is (the API
  answers it as unreadable; an operator deletes or restores it).
- ``lease``: a processing job without a lease (no ``lease_id`` or no ``timeout_at``): no worker can
  be fenced or lapsed on it, so it would stay processing for ever. Repaired by ending its lease now,
  so that the next poll or ``cleanup-expired`` hands it on as it does any lapsed lease.
- ``event``: an outbox row whose columns disagree with its event document (its id or state): the
  columns are written again from the document.

An event whose job was deleted is not a finding: deleting a finished job records its event first,
so that the receiver still hears of it (see ``events/delivery.py``).
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from ...models import RemoteJob, Status, utcnow
from ..base import Finding
from .db import Database
from .jobs import WRITE_COLUMNS, job_from_row, row_params

BATCH = 500
_JOB_COLUMNS = ("id", *WRITE_COLUMNS)
_SELECT_JOBS = (f"SELECT {', '.join(_JOB_COLUMNS)} FROM remote_jobs WHERE id > %s ORDER BY id LIMIT %s")
_REPAIR_COLUMNS = tuple(c for c in WRITE_COLUMNS if c != "doc")
_REWRITE = (f"UPDATE remote_jobs SET {', '.join(f'{c} = %({c})s' for c in WRITE_COLUMNS)} "
            "WHERE id = %(id)s AND version = %(found_version)s")


def fsck(db: Database, repair: bool = False) -> list[Finding]:
    """Every finding in the jobs and the outbox (with ``repair``: repaired where it can be)."""
    return [*_check_jobs(db, repair), *_check_events(db, repair)]


def _check_jobs(db: Database, repair: bool) -> list[Finding]:
    findings: list[Finding] = []
    after = ""
    while True:
        with db.transaction() as conn:
            rows = conn.execute(_SELECT_JOBS, (after, BATCH)).fetchall()
        if not rows:
            return findings
        for row in rows:
            values = dict(zip(_JOB_COLUMNS, row))
            findings.extend(_check_job(db, values, repair))
        after = rows[-1][0]


def _check_job(db: Database, row: dict[str, Any], repair: bool) -> list[Finding]:
    job_id = row["id"]
    where = f"remote_jobs/{job_id}"
    try:
        job = job_from_row(row["version"], row["doc"])
        expected = row_params(job)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        return [Finding("corrupt", where, job_id, f"the document is not a readable job ({exc})")]
    findings = []
    if job.id != job_id:
        return [Finding("corrupt", where, job_id, f"the document names another id ({job.id!r})")]
    wrong = [c for c in _REPAIR_COLUMNS if row[c] != expected[c]]
    if wrong:
        finding = Finding("drift", where, job_id, "columns disagree with the document: " + ", ".join(wrong))
        if repair:
            finding.repaired = _rewrite(db, job, row["version"])
        findings.append(finding)
    if job.status == Status.PROCESSING.value and (job.lease_id is None or job.timeout_at is None):
        finding = Finding("lease", where, job_id, "processing without a lease: no worker can be fenced "
                          "or lapsed on it")
        if repair:
            job.timeout_at = utcnow() - timedelta(microseconds=1)
            finding.repaired = _rewrite(db, job, row["version"])
        findings.append(finding)
    return findings


def _rewrite(db: Database, job: RemoteJob, found_version: int) -> bool:
    """Write the row's columns (and document) from ``job``, unless the row changed since it was read."""
    params = dict(row_params(job), found_version=found_version)
    with db.transaction() as conn:
        return conn.execute(_REWRITE, params).rowcount == 1


def _check_events(db: Database, repair: bool) -> list[Finding]:
    findings: list[Finding] = []
    with db.transaction() as conn:
        rows = conn.execute("SELECT id, state, doc->>'id', doc->>'state' FROM event_outbox "
                            "WHERE doc->>'id' IS DISTINCT FROM id OR doc->>'state' IS DISTINCT FROM state").fetchall()
    for event_id, state, doc_id, doc_state in rows:
        where = f"event_outbox/{event_id}"
        if doc_id != event_id or doc_state not in ("pending", "delivered"):
            findings.append(Finding("corrupt", where, None, f"the event document names id {doc_id!r}, "
                                    f"state {doc_state!r}"))
            continue
        finding = Finding("event", where, None, f"state column {state!r}, document {doc_state!r}")
        if repair:
            with db.transaction() as conn:
                finding.repaired = conn.execute("UPDATE event_outbox SET state = %s WHERE id = %s AND state = %s",
                                                (doc_state, event_id, state)).rowcount == 1
        findings.append(finding)
    return findings
