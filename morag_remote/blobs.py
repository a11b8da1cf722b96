"""The blob store on a filesystem (``BLOB_DIR``, default ``<instance>/blobs``): the bytes that live
outside the job records, for either backend (see :class:`~.store.base.BlobStore`).

Layout:

- ``uploads/<id>/state.json``, ``uploads/<id>/data``, ``uploads/<id>/lock``: an unfinished tus
  upload. ``state.json`` is the truth about it: bytes of ``data`` past its ``offset`` were never
  acknowledged (a cut or a crash mid-chunk) and the next append drops them first.
- ``sources/<sha256[:2]>/<sha256>``: a finished upload, content-addressed, read-only: the same
  bytes uploaded twice are stored once.
- ``artifacts/<job_id>/<attempt>/<key>.json`` and ``<key>-<random>.data``: a result artifact staged
  for one attempt (``key`` is a hash of its name; the JSON names the data file). A result commits
  the list it read into the job record; the data files it names are never replaced (a new upload of
  the name writes a new data file), so what a record points at stays as it was.

Shared by every API host when it is on shared storage: state and bytes sit together, locks are
``flock`` on a file next to them, and every change is a rename or an fsynced append.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterable, Iterator

from .exceptions import DigestMismatch, PayloadTooLarge
from .fileio import TEMP_PREFIX, fsync_dir, unlink_quietly, write_all, write_atomic
from .models import from_iso, to_iso
from .store.base import Finding, StoredArtifact, UploadBusy, UploadState

_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHA = re.compile(r"[0-9a-f]{64}")
PIECE = 1024 * 1024
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:64] or "host"
TRASH_PREFIX = ".trash-"
STALE_SECONDS = 600.0          # a temp file or half-made folder this old has no writer left
ORPHAN_SOURCE_SECONDS = 86400.0  # a source no job or upload names is removed after a day


class FileBlobStore:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.uploads_dir = os.path.join(self.root, "uploads")
        self.sources_dir = os.path.join(self.root, "sources")
        self.artifacts_dir = os.path.join(self.root, "artifacts")
        for folder in (self.uploads_dir, self.sources_dir, self.artifacts_dir):
            os.makedirs(folder, exist_ok=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    # -- uploads ---------------------------------------------------------------------------------

    def _upload_dir(self, upload_id: str) -> str | None:
        return os.path.join(self.uploads_dir, upload_id) if _ID.fullmatch(upload_id) else None

    def create_upload(self, state: UploadState) -> None:
        folder = self._upload_dir(state.id)
        if folder is None:
            raise ValueError(f"bad upload id {state.id!r}")
        os.mkdir(folder, 0o700)
        try:
            fd = os.open(os.path.join(folder, "data"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            self.write_upload(state)  # the commit point: a folder without a state is no upload
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        fsync_dir(self.uploads_dir)

    def read_upload(self, upload_id: str) -> UploadState | None:
        folder = self._upload_dir(upload_id)
        if folder is None:
            return None
        try:
            with open(os.path.join(folder, "state.json"), "rb") as fh:
                raw = json.loads(fh.read())
        except (FileNotFoundError, NotADirectoryError):
            return None
        for name in ("created_at", "expires_at", "completed_at"):
            raw[name] = from_iso(raw.get(name))
        return UploadState(**raw)

    def write_upload(self, state: UploadState) -> None:
        folder = self._upload_dir(state.id)
        data = {**vars(state)}
        for name in ("created_at", "expires_at", "completed_at"):
            data[name] = to_iso(data[name])
        write_atomic(os.path.join(folder, "state.json"), json.dumps(data, sort_keys=True).encode())

    @contextmanager
    def upload_lock(self, upload_id: str) -> Iterator[None]:
        folder = self._upload_dir(upload_id)
        fd = os.open(os.path.join(folder, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UploadBusy(upload_id) from None
            yield
        finally:
            os.close(fd)  # releases the flock

    def append(self, upload_id: str, offset: int, chunks: Iterable[bytes],
               commit: Callable[[int], bool]) -> int:
        path = os.path.join(self._upload_dir(upload_id), "data")
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, offset)  # bytes past the acknowledged offset were never acknowledged
            os.lseek(fd, offset, os.SEEK_SET)
            end = offset
            try:
                for chunk in chunks:
                    write_all(fd, chunk)
                    end += len(chunk)
                if not commit(end - offset):
                    os.ftruncate(fd, offset)
                    return offset
                os.fdatasync(fd)
            except BaseException:
                try:
                    os.ftruncate(fd, offset)  # nothing half-written stays (a full disk, a bad checksum)
                except OSError:
                    pass
                raise
            return end
        finally:
            os.close(fd)

    def read_data(self, upload_id: str, length: int | None = None) -> Iterator[bytes]:
        with open(os.path.join(self._upload_dir(upload_id), "data"), "rb", buffering=0) as fh:
            left = length
            while left is None or left > 0:
                piece = fh.read(PIECE if left is None else min(PIECE, left))
                if not piece:
                    return
                if left is not None:
                    left -= len(piece)
                yield piece

    def source_path(self, sha256: str) -> str:
        if not _SHA.fullmatch(sha256):
            raise ValueError("not a sha256 hex digest")
        return os.path.join(self.sources_dir, sha256[:2], sha256)

    def finalize(self, upload_id: str, sha256: str) -> str:
        target = self.source_path(sha256)
        folder = os.path.dirname(target)
        os.makedirs(folder, exist_ok=True)
        data = os.path.join(self._upload_dir(upload_id), "data")
        if os.path.exists(target):
            unlink_quietly(data)  # the same bytes are stored already: keep one copy
        else:
            try:
                os.chmod(data, 0o444)
                os.rename(data, target)
            except FileNotFoundError:
                if not os.path.exists(target):
                    raise
            fsync_dir(folder)
        fsync_dir(os.path.dirname(data))
        return target

    def delete_upload(self, upload_id: str) -> None:
        folder = self._upload_dir(upload_id)
        if folder is None:
            return
        trash = os.path.join(self.uploads_dir, f"{TRASH_PREFIX}{upload_id}.{secrets.token_hex(4)}")
        try:
            os.rename(folder, trash)  # gone at once for every reader; the bytes after
        except FileNotFoundError:
            return
        fsync_dir(self.uploads_dir)
        shutil.rmtree(trash, ignore_errors=True)

    def upload_ids(self) -> list[str]:
        return sorted(n for n in os.listdir(self.uploads_dir) if not n.startswith("."))

    # -- artifacts -------------------------------------------------------------------------------

    def _attempt_dir(self, job_id: str, attempt: str) -> str:
        if not (_ID.fullmatch(job_id) and _ID.fullmatch(attempt)):
            raise ValueError("bad job or attempt id")
        return os.path.join(self.artifacts_dir, job_id, attempt)

    def stage_artifact(self, job_id: str, attempt: str, name: str, chunks: Iterable[bytes],
                       max_bytes: int, expect_sha256: bytes | None = None) -> StoredArtifact:
        folder = self._attempt_dir(job_id, attempt)
        os.makedirs(folder, exist_ok=True)
        key = hashlib.sha256(name.encode("utf-8")).hexdigest()[:32]
        tmp = os.path.join(folder, f"{TEMP_PREFIX}{key}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}")
        hasher, size = hashlib.sha256(), 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"the artifact is larger than the {max_bytes} bytes allowed")
                    hasher.update(chunk)
                    write_all(fd, chunk)
                if expect_sha256 is not None and hasher.digest() != expect_sha256:
                    raise DigestMismatch("the artifact's bytes do not match its Content-Digest: nothing was stored")
                os.fdatasync(fd)
            finally:
                os.close(fd)
            data_name = f"{key}-{secrets.token_hex(8)}.data"
            os.rename(tmp, os.path.join(folder, data_name))
        except BaseException:
            unlink_quietly(tmp)
            raise
        artifact = StoredArtifact(name=name, size=size, sha256=hasher.hexdigest(),
                                  file=os.path.relpath(os.path.join(folder, data_name), self.root))
        write_atomic(os.path.join(folder, f"{key}.json"), json.dumps(vars(artifact)).encode())
        return artifact

    def staged_artifacts(self, job_id: str, attempt: str) -> list[StoredArtifact]:
        try:
            folder = self._attempt_dir(job_id, attempt)
        except ValueError:  # no attempt ever has such a name (a lease id a caller made up)
            return []
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        found = []
        for entry in names:
            if not entry.endswith(".json") or entry.startswith("."):
                continue
            try:
                with open(os.path.join(folder, entry), "rb") as fh:
                    artifact = StoredArtifact(**json.loads(fh.read()))
            except (OSError, ValueError, TypeError):
                continue
            if os.path.exists(os.path.join(self.root, artifact.file)):
                found.append(artifact)
        return sorted(found, key=lambda a: a.name)

    def open_blob(self, path: str) -> tuple[BinaryIO, os.stat_result]:
        full = os.path.realpath(os.path.join(self.root, path))
        if not full.startswith(self.root + os.sep):
            raise FileNotFoundError(errno.ENOENT, "outside the blob store", path)
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a regular file", path)
            return os.fdopen(fd, "rb"), st
        except BaseException:
            os.close(fd)
            raise

    def remove_artifacts(self, job_id: str, keep: Iterable[str] = ()) -> int:
        if not _ID.fullmatch(job_id):
            return 0
        job_dir = os.path.join(self.artifacts_dir, job_id)
        keep = set(keep)
        try:
            attempts = os.listdir(job_dir)
        except FileNotFoundError:
            return 0
        removed = 0
        for attempt in attempts:
            if attempt in keep:
                continue
            self._discard(os.path.join(job_dir, attempt))
            removed += 1
        if not keep:
            try:
                os.rmdir(job_dir)
            except OSError:
                pass
        return removed

    def _discard(self, folder: str) -> None:
        trash = os.path.join(self.artifacts_dir, f"{TRASH_PREFIX}{secrets.token_hex(8)}")
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def artifact_job_ids(self) -> list[str]:
        return sorted(n for n in os.listdir(self.artifacts_dir) if not n.startswith("."))

    # -- fsck ------------------------------------------------------------------------------------

    def fsck(self, referenced: Callable[[], tuple[set[str], dict[str, set[str]]] | None],
             repair: bool) -> list[Finding]:
        findings: list[Finding] = []
        now = time.time()

        def old(path: str, seconds: float = STALE_SECONDS) -> bool:
            try:
                return os.lstat(path).st_mtime < now - seconds
            except FileNotFoundError:
                return False

        def found(kind: str, path: str, job_id: str | None, detail: str, fix: Callable[[], object]) -> None:
            finding = Finding(kind, os.path.relpath(path, self.root), job_id, detail)
            if repair:
                try:
                    fix()
                    finding.repaired = True
                except OSError as exc:
                    finding.detail += f" (repair failed: {exc.strerror or exc})"
            findings.append(finding)

        def remove_tree(path: str) -> Callable[[], None]:
            return lambda: shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)

        upload_shas: set[str] = set()
        for name in sorted(os.listdir(self.uploads_dir)):
            path = os.path.join(self.uploads_dir, name)
            if name.startswith(TRASH_PREFIX):
                found("blob-temp", path, None, "a deleted upload's leftover", remove_tree(path))
                continue
            try:
                state = self.read_upload(name)
            except (OSError, ValueError, TypeError) as exc:
                found("upload-corrupt", path, None, f"unreadable upload state ({exc})", remove_tree(path))
                continue
            if state is None:
                if old(path):
                    found("upload-temp", path, None, "an upload folder whose creation never finished",
                          remove_tree(path))
                continue
            if state.complete:
                upload_shas.add(state.sha256)
                if os.path.exists(os.path.join(path, "data")):
                    found("upload-unmoved", path, None, "a finished upload whose bytes were not moved to sources/",
                          lambda s=state: self.finalize(s.id, s.sha256))
        named = referenced()
        if named is None:  # a job could not be read: orphans cannot be told, so none are looked for
            return findings
        sources, keep = named
        for job_id in self.artifact_job_ids():
            job_dir = os.path.join(self.artifacts_dir, job_id)
            if job_id.startswith(TRASH_PREFIX) or job_id not in keep:
                found("artifact-orphan", job_dir, None if job_id.startswith(".") else job_id,
                      "artifacts of a job that no longer exists", remove_tree(job_dir))
                continue
            for attempt in sorted(os.listdir(job_dir)):
                folder = os.path.join(job_dir, attempt)
                if attempt not in keep[job_id]:
                    found("artifact-orphan", folder, job_id,
                          "artifacts of an attempt that lost its lease, failed or was cancelled (never shown)",
                          remove_tree(folder))
                    continue
                for entry in sorted(os.listdir(folder)):
                    if entry.startswith(TEMP_PREFIX) and (_writer_gone(entry) or old(os.path.join(folder, entry))):
                        found("blob-temp", os.path.join(folder, entry), job_id,
                              "a partial artifact (an upload cut short); never visible",
                              lambda p=os.path.join(folder, entry): unlink_quietly(p))
        for prefix in sorted(os.listdir(self.sources_dir)):
            for name in sorted(os.listdir(os.path.join(self.sources_dir, prefix))):
                path = os.path.join(self.sources_dir, prefix, name)
                if name in upload_shas or path in sources:
                    continue
                if old(path, ORPHAN_SOURCE_SECONDS):
                    found("source-orphan", path, None, "an uploaded source no job or upload names",
                          lambda p=path: unlink_quietly(p))
        return findings



def _writer_gone(temp_name: str) -> bool:
    """Whether the process that writes a temp file (``.tmp-<key>.<host>.<pid>.<random>``) is gone:
    known only for a writer on this host (another host's pids are not this one's)."""
    parts = temp_name[len(TEMP_PREFIX):].split(".")
    if len(parts) != 4 or parts[1] != _HOST or not parts[2].isdigit():
        return False
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
