"""Check and repair the JSON-file store: what a crash or a hand edit can leave behind.

Findings, and the deterministic repair of each:
- ``temp``: a leftover temp file (a write that never reached its rename): removed; the rename is the
  commit point, so a temp file was never the job. In ``.incoming/``, where requests write new
  records (most of them before they take the lock), only a file older than
  ``INCOMING_STALE_SECONDS`` is one.
- ``duplicate``: one id in several status directories (a move cut short): the copy with the highest
  ``version`` stays (on a tie, the one in the directory its status names; its directory is fsynced
  first), the others are removed. A move in flight leaves its older copy for the moment it takes
  to fsync the new one's directory, so a duplicate counts only when a second look, a moment later,
  still finds it.
- ``misplaced``: a file whose ``status`` disagrees with its directory: moved to the directory its
  status names.
- ``corrupt``: a file that is not a readable job (a hand edit, or a file written under the lock
  whose fsync a power loss cut short, next to the older copy that is the job): moved to
  ``<data>/corrupt/`` (never deleted, never overwriting an earlier one).

- ``journal``: a segment of the change journal with a line that does not parse (its readers cannot
  know which job it announced) or ending in a torn line (part of a line, its writer killed or its
  disk full): a torn end is cut off (it never announced a change, and no reader has read it); past
  a damaged line a new segment is started and the older ones removed, so every process that had
  not read past it rebuilds its catalog from the folders.

- ``temp`` next to ``<instance>/api_keys.json``: a key-file write that never reached its rename
  (every key write holds the key lock, so under it a temp file has no writer left): removed.

A repair that fails (an OSError) leaves its finding unrepaired with the reason, so the CLI exits 1.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from ...models import STATUSES, RemoteJob
from ...fileio import TEMP_PREFIX, fsync_dir, unlink_quietly, write_atomic
from ..base import Finding
from .journal import check_segment
from .jobs import CORRUPT_DIR, INCOMING_DIR, CorruptJobFile, FileJobStore, encode_job, load_job_file
from .keys import FileKeyStore


IN_FLIGHT_SECONDS = 0.2  # longer than a write needs to settle (fsync a directory, drop the older copy)
INCOMING_STALE_SECONDS = 600.0  # a staged record lives for one request; this one's writer is gone


def fsck(store: FileJobStore, repair: bool = False) -> list[Finding]:
    findings = _scan(store, repair=False)
    if any(f.kind == "duplicate" for f in findings):
        time.sleep(IN_FLIGHT_SECONDS)
        findings = _scan(store, repair=False)
    if repair and findings:
        findings = _scan(store, repair=True)
    return findings


def _scan(store: FileJobStore, repair: bool) -> list[Finding]:
    findings: list[Finding] = []
    copies: dict[str, list[tuple[RemoteJob, Path]]] = defaultdict(list)
    with store.lock.hold():
        findings.extend(_stale_incoming(store, repair))
        findings.extend(_journal(store, repair))
        for status in STATUSES:
            folder = store.root / status
            with os.scandir(folder) as it:
                names = sorted(e.name for e in it)
            for name in names:
                path = folder / name
                rel = f"{status}/{name}"
                if name.startswith(TEMP_PREFIX):
                    f = Finding("temp", rel, None, "leftover temp file of an interrupted write")
                    if repair:
                        _attempt(f, lambda: unlink_quietly(path))
                    findings.append(f)
                elif name.endswith(".json"):
                    try:
                        job = load_job_file(path)  # before touching copies: a corrupt file adds no entry
                        copies[name[:-5]].append((job, path))
                    except CorruptJobFile as exc:
                        f = Finding("corrupt", rel, name[:-5], f"unreadable job file: {exc.reason}")
                        if repair:
                            _attempt(f, lambda: _quarantine(store, path, status))
                        findings.append(f)
                    except FileNotFoundError:  # pragma: no cover - removed while we listed
                        continue
        touched: list[str] = []
        for job_id, found in sorted(copies.items()):
            found.sort(key=lambda item: (item[0].version, item[1].parent.name == item[0].status,
                                         STATUSES.index(item[0].status)), reverse=True)
            keep, keep_path = found[0]
            for _, path in found[1:]:
                f = Finding("duplicate", _rel(store, path), job_id,
                            f"older copy (kept version {keep.version} in {keep_path.parent.name}/)")
                if repair and _attempt(f, lambda: _drop_older(path, keep_path)):
                    touched.append(job_id)
                findings.append(f)
            if keep_path.parent.name != keep.status:
                f = Finding("misplaced", _rel(store, keep_path), job_id,
                            f"status is {keep.status!r} but the file is in {keep_path.parent.name}/")
                if repair and _attempt(f, lambda: _move(store, keep, keep_path)):
                    touched.append(job_id)
                findings.append(f)
        if touched or any(f.kind == "corrupt" and f.repaired for f in findings):
            corrupt_ids = [f.job_id for f in findings if f.kind == "corrupt" and f.job_id]
            store.journal.append(sorted(set(touched + corrupt_ids)))
    return findings


def fsck_keys(keys: FileKeyStore, repair: bool = False) -> list[Finding]:
    """Leftover temp files of the key file (``.tmp-api_keys.json.<pid>.<random>``); the path of each
    is its name in the instance folder."""
    folder, prefix = keys.path.parent, f"{TEMP_PREFIX}{keys.path.name}."
    findings = []
    with keys.lock.hold():
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if e.name.startswith(prefix))
        for name in names:
            f = Finding("temp", name, None, "leftover temp file of an interrupted API key write (instance folder)")
            if repair:
                _attempt(f, lambda path=folder / name: unlink_quietly(path))
            findings.append(f)
    return findings


def _journal(store: FileJobStore, repair: bool) -> list[Finding]:
    findings: list[Finding] = []
    journal = store.journal
    damaged = False
    for segment in journal._segments():
        path = journal._path(segment)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:  # pragma: no cover - removed while we listed
            continue
        bad, torn = check_segment(data)
        rel = f"journal/{os.path.basename(path)}"
        if bad:
            damaged = True
            findings.append(Finding("journal", rel, None, f"{len(bad)} line(s) that do not parse, the first at "
                                    f"byte {bad[0]}: readers cannot tell which job they announced"))
        if torn:
            f = Finding("journal", rel, None, f"ends in a torn line ({torn} bytes without a newline)")
            if repair and not bad:
                _attempt(f, lambda path=path, size=len(data) - torn: os.truncate(path, size))
            findings.append(f)
    if repair and damaged and _attempt(findings[0], journal.rotate):
        for f in findings:  # every segment older than the new one is gone, torn ends included
            f.repaired = True
    return findings


def _stale_incoming(store: FileJobStore, repair: bool) -> list[Finding]:
    findings = []
    cutoff = time.time() - INCOMING_STALE_SECONDS
    with os.scandir(store.root / INCOMING_DIR) as it:
        entries = sorted((e for e in it if e.name.startswith(TEMP_PREFIX)), key=lambda e: e.name)
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
        except FileNotFoundError:  # renamed into place while we looked
            continue
        f = Finding("temp", f"{INCOMING_DIR}/{entry.name}", None, "leftover record of a request that never committed")
        if repair:
            _attempt(f, lambda path=Path(entry.path): unlink_quietly(path))
        findings.append(f)
    return findings


def _rel(store: FileJobStore, path: Path) -> str:
    return str(path.relative_to(store.root))


def _attempt(finding: Finding, repair: Callable[[], object]) -> bool:
    """Run one repair; on OSError the finding stays unrepaired and says why."""
    try:
        repair()
    except OSError as exc:
        finding.detail += f" (repair failed: {exc.strerror or exc})"
        return False
    finding.repaired = True
    return True


def _drop_older(path: Path, kept: Path) -> None:
    """Remove an older copy once the copy that stays is durable (its directory fsynced)."""
    fsync_dir(kept.parent)
    _remove(path)


def _remove(path: Path) -> None:
    unlink_quietly(path)
    fsync_dir(path.parent)


def _move(store: FileJobStore, job: RemoteJob, path: Path) -> None:
    """Write the job where its status says (the new copy first), then drop the misplaced one."""
    write_atomic(store.path(job.status, job.id), encode_job(job))
    _remove(path)


def _quarantine(store: FileJobStore, path: Path, status: str) -> Path:
    """Move an unreadable file into ``corrupt/`` under a name no earlier quarantined file has.

    Only fsck writes there, and it holds the store's exclusive lock, so a free name stays free.
    """
    folder = store.root / CORRUPT_DIR
    stem = f"{status}-{path.name}.{int(time.time())}"
    target = folder / stem
    n = 0
    while os.path.lexists(target):
        n += 1
        target = folder / f"{stem}.{n}"
    os.rename(path, target)
    fsync_dir(folder)
    fsync_dir(path.parent)
    return target
