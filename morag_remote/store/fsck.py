"""Check and repair the JSON-file store: what a crash or a hand edit can leave behind.

Findings, and the deterministic repair of each:
- ``temp``: a leftover temp file (a write that never reached its rename): removed; the rename is the
  commit point, so a temp file was never the job.
- ``duplicate``: one id in several status directories (a move cut short): the copy with the highest
  ``version`` stays, the others are removed.
- ``misplaced``: a file whose ``status`` disagrees with its directory: moved to the directory its
  status names.
- ``corrupt``: a file that is not a readable job: moved to ``<data>/corrupt/`` (never deleted).
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from ..models import STATUSES, RemoteJob
from .atomic import TEMP_PREFIX, fsync_dir, unlink_quietly, write_atomic
from .files import CORRUPT_DIR, CorruptJobFile, FileJobStore, _encode, load_job_file


@dataclass
class Finding:
    kind: str
    path: str
    job_id: str | None
    detail: str
    repaired: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


def fsck(store: FileJobStore, repair: bool = False) -> list[Finding]:
    findings: list[Finding] = []
    copies: dict[str, list[tuple[RemoteJob, Path]]] = defaultdict(list)
    with store.lock.hold():
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
                        unlink_quietly(path)
                        f.repaired = True
                    findings.append(f)
                elif name.endswith(".json"):
                    try:
                        job = load_job_file(path)  # before copies[...]: no empty entry on failure
                        copies[name[:-5]].append((job, path))
                    except CorruptJobFile as exc:
                        f = Finding("corrupt", rel, name[:-5], f"unreadable job file: {exc.reason}")
                        if repair:
                            _quarantine(store, path, status)
                            f.repaired = True
                        findings.append(f)
                    except FileNotFoundError:  # pragma: no cover - removed while we listed
                        continue
        touched: list[str] = []
        for job_id, found in sorted(copies.items()):
            found.sort(key=lambda item: (item[0].version, STATUSES.index(item[0].status)), reverse=True)
            keep, keep_path = found[0]
            for _, path in found[1:]:
                f = Finding("duplicate", _rel(store, path), job_id,
                            f"older copy (kept version {keep.version} in {keep_path.parent.name}/)")
                if repair:
                    unlink_quietly(path)
                    fsync_dir(path.parent)
                    f.repaired = True
                    touched.append(job_id)
                findings.append(f)
            if keep_path.parent.name != keep.status:
                f = Finding("misplaced", _rel(store, keep_path), job_id,
                            f"status is {keep.status!r} but the file is in {keep_path.parent.name}/")
                if repair:
                    write_atomic(store.path(keep.status, job_id), _encode(keep))
                    unlink_quietly(keep_path)
                    fsync_dir(keep_path.parent)
                    f.repaired = True
                    touched.append(job_id)
                findings.append(f)
        if touched or any(f.kind == "corrupt" and f.repaired for f in findings):
            corrupt_ids = [f.job_id for f in findings if f.kind == "corrupt" and f.job_id]
            store.journal.append(sorted(set(touched + corrupt_ids)))
    return findings


def _rel(store: FileJobStore, path: Path) -> str:
    return str(path.relative_to(store.root))


def _quarantine(store: FileJobStore, path: Path, status: str) -> Path:
    target = store.root / CORRUPT_DIR / f"{status}-{path.name}.{int(time.time())}"
    os.replace(path, target)
    fsync_dir(target.parent)
    fsync_dir(path.parent)
    return target
