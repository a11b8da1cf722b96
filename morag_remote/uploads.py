"""Resumable uploads: the tus 1.0 protocol's rules (core, ``creation``, ``checksum``, ``expiration``,
``termination``) over a :class:`~.store.base.BlobStore`.

- A chunk is appended at the upload's offset, fsynced, and only then is the new offset written
  (the acknowledgement): a crash or a cut connection mid-chunk leaves the offset where it was, and
  the next append drops any bytes past it first.
- A chunk with ``Upload-Checksum`` is kept only when its digest matches (460 otherwise, nothing
  appended); one whose connection was cut is dropped. A chunk without a checksum cut midway keeps
  what arrived (tus: "store as much of the received data as possible").
- The last chunk completes the upload: the whole file's sha256 (computed while the chunks came in
  when one process saw them all, else read again) is checked against the one declared in
  ``Upload-Metadata`` (``sha256 <hex>``); on a mismatch that chunk is dropped (460). Then the bytes
  move to the content-addressed source store, where a job can be created from them.
- Free space is checked before a chunk is taken: 507 when the chunk would leave less than
  ``UPLOAD_RESERVE_BYTES`` free; a disk that fills anyway is 507 with the chunk dropped.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Callable, Iterator

import structlog

from .errors import NO_SPACE
from .exceptions import (ChecksumMismatch, ChecksumUnsupported, InsufficientStorage, InvalidRequest,
                         OffsetMismatch, PayloadTooLarge, ServiceError, UnsupportedMedia, UploadBusyError,
                         UploadGone, UploadNotFound)
from .models import Clock, utcnow
from .request_body import ReadInto
from .store.base import BlobStore, UploadBusy, UploadState

log = structlog.get_logger(__name__)

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,checksum,expiration,termination"
CHECKSUMS: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "sha1": hashlib.sha1, "md5": hashlib.md5}
OFFSET_TYPE = "application/offset+octet-stream"
PIECE = 1024 * 1024
MAX_METADATA = 4096


@dataclass(frozen=True)
class UploadSettings:
    max_bytes: int = 20 * 1024 ** 3
    expiry_seconds: float = 86400
    reserve_bytes: int = 64 * 1024 ** 2

    @classmethod
    def from_config(cls, config) -> "UploadSettings":
        return cls(int(config["MAX_UPLOAD_BYTES"]), float(config["UPLOAD_EXPIRY_SECONDS"]),
                   int(config["UPLOAD_RESERVE_BYTES"]))


def parse_metadata(header: str | None) -> dict[str, str]:
    """``Upload-Metadata``: comma-separated ``key base64value`` pairs (the value may be absent)."""
    out: dict[str, str] = {}
    if not header:
        return out
    if len(header) > MAX_METADATA:
        raise ServiceError(f"Upload-Metadata is longer than {MAX_METADATA} characters")
    for pair in header.split(","):
        parts = pair.strip().split(" ")
        if not parts[0] or len(parts) > 2 or parts[0] in out:
            raise ServiceError("Upload-Metadata must be comma-separated 'key base64value' pairs, each key once")
        try:
            value = base64.b64decode(parts[1], validate=True).decode("utf-8") if len(parts) == 2 else ""
        except (binascii.Error, UnicodeDecodeError):
            raise ServiceError(f"Upload-Metadata value of {parts[0]!r} is not base64 of UTF-8 text") from None
        if "\x00" in value:
            raise ServiceError(f"Upload-Metadata value of {parts[0]!r} contains a NUL byte")
        out[parts[0]] = value
    return out


def encode_metadata(metadata: dict[str, str]) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" if v else k for k, v in metadata.items())


def parse_checksum(header: str | None) -> tuple[str, bytes] | None:
    """``Upload-Checksum: <algorithm> <base64 digest>``; 400 for an algorithm this server lacks."""
    if not header:
        return None
    parts = header.strip().split(" ")
    if len(parts) != 2:
        raise ChecksumUnsupported("Upload-Checksum must be '<algorithm> <base64 digest>'")
    algorithm, encoded = parts[0].lower(), parts[1]
    if algorithm not in CHECKSUMS:
        raise ChecksumUnsupported(f"checksum algorithm {algorithm!r} is not supported; use one of "
                                  f"{', '.join(CHECKSUMS)}")
    try:
        digest = base64.b64decode(encoded, validate=True)
    except binascii.Error:
        raise ChecksumUnsupported("the Upload-Checksum digest is not base64") from None
    return algorithm, digest


class _Running:
    """Per process: the sha256 of each upload so far, for the uploads whose chunks this process saw
    in order (a chunk that went to another process or host makes the last chunk read the file again)."""

    def __init__(self, size: int = 256) -> None:
        self._items: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._size = size
        self._mutex = threading.Lock()

    def take(self, upload_id: str, offset: int) -> Any | None:
        with self._mutex:
            item = self._items.pop(upload_id, None)
        if item is None or item[0] != offset:
            return hashlib.sha256() if offset == 0 else None
        return item[1]

    def put(self, upload_id: str, offset: int, hasher: Any) -> None:
        with self._mutex:
            self._items[upload_id] = (offset, hasher)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class Uploads:
    def __init__(self, blobs: BlobStore, settings: UploadSettings, clock: Clock = utcnow) -> None:
        self.blobs = blobs
        self.settings = settings
        self.clock = clock
        self.running = _Running()
        self.count_bytes: Callable[[int], None] = lambda n: None  # metrics set it

    # -- creation --------------------------------------------------------------------------------

    def create(self, length_header: str | None, metadata_header: str | None, owner: str | None,
               defer: str | None = None) -> UploadState:
        if defer is not None:
            raise ServiceError("Upload-Defer-Length is not supported: send Upload-Length")
        if length_header is None or not length_header.isdigit() or len(length_header) > 20:
            raise ServiceError("Upload-Length must be given as a non-negative integer")
        length = int(length_header)
        if length > self.settings.max_bytes:
            raise PayloadTooLarge(f"the upload of {length} bytes is larger than the {self.settings.max_bytes} "
                                  "bytes this server accepts (MORAG_REMOTE_MAX_UPLOAD_BYTES)")
        metadata = parse_metadata(metadata_header)
        declared = metadata.get("sha256")
        if declared is not None:
            declared = declared.strip().lower()
            if len(declared) != 64 or any(c not in "0123456789abcdef" for c in declared):
                raise ServiceError("Upload-Metadata sha256 must be the file's sha256 as 64 hex digits")
        self._room_for(length)
        now = self.clock()
        state = UploadState(id=secrets.token_hex(16), length=length, offset=0, created_at=now,
                            expires_at=now + timedelta(seconds=self.settings.expiry_seconds),
                            metadata=metadata, owner=owner, declared_sha256=declared)
        self._no_space_is_507(lambda: self.blobs.create_upload(state))
        if length == 0:
            with self.blobs.upload_lock(state.id):
                self._complete(state, hashlib.sha256())
        log.info("upload.created", upload_id=state.id, length=length)
        return state

    def _room_for(self, nbytes: int) -> None:
        free = self.blobs.free_bytes()
        if free - nbytes < self.settings.reserve_bytes:
            raise InsufficientStorage(f"the blob store has {free} bytes free: not enough for {nbytes} more "
                                      f"(and the {self.settings.reserve_bytes} kept in reserve); nothing was "
                                      "stored, try again once an operator frees space")

    @staticmethod
    def _no_space_is_507(action: Callable[[], Any]) -> Any:
        try:
            return action()
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise InsufficientStorage("the blob store's disk filled: the chunk was dropped, the offset is "
                                          "unchanged; try again once an operator frees space") from None
            raise

    # -- reading ---------------------------------------------------------------------------------

    def get(self, upload_id: str) -> UploadState:
        state = self.blobs.read_upload(upload_id)
        if state is None:
            raise UploadNotFound(f"no upload with id {upload_id!r}")
        if not state.complete and state.expires_at <= self.clock():
            raise UploadGone(f"upload {upload_id} expired at {state.expires_at.isoformat()} before it was finished")
        return state

    # -- appending -------------------------------------------------------------------------------

    def patch(self, upload_id: str, offset_header: str | None, content_type: str | None,
              checksum_header: str | None, readinto: ReadInto, content_length: int | None) -> UploadState:
        """Append the body that ``readinto`` (:func:`~.request_body.body_reader`) receives."""
        if (content_type or "").split(";")[0].strip().lower() != OFFSET_TYPE:
            raise UnsupportedMedia(f"a PATCH must be Content-Type: {OFFSET_TYPE}")
        if offset_header is None or not offset_header.isdigit() or len(offset_header) > 20:
            raise ServiceError("Upload-Offset must be given as a non-negative integer")
        offset = int(offset_header)
        checksum = parse_checksum(checksum_header)
        self.get(upload_id)  # 404 / 410 before the lock file is touched
        try:
            with self.blobs.upload_lock(upload_id):
                return self._patch_locked(upload_id, offset, checksum, readinto, content_length)
        except UploadBusy:
            raise UploadBusyError(f"another request is appending to upload {upload_id}; retry when it ends") from None

    def _patch_locked(self, upload_id: str, offset: int, checksum: tuple[str, bytes] | None,
                      readinto: ReadInto, content_length: int | None) -> UploadState:
        state = self.get(upload_id)
        if offset != state.offset:
            raise OffsetMismatch(f"Upload-Offset is {offset}, the upload is at {state.offset}: resume from there",
                                 upload_offset=state.offset)
        remaining = state.length - state.offset
        if content_length is not None and content_length > remaining:
            raise PayloadTooLarge(f"the chunk of {content_length} bytes goes past the upload's length "
                                  f"({remaining} bytes remain)")
        if state.complete:
            return state
        self._room_for(content_length if content_length is not None else remaining)
        running = self.running.take(upload_id, state.offset)
        if running is not None:
            running = running.copy()
        chunk_hasher = CHECKSUMS[checksum[0]]() if checksum else None
        cut = [False]

        def chunks() -> Iterator[memoryview]:
            # one buffer for the whole chunk: each piece is written out before the next is received
            buffer = memoryview(bytearray(PIECE))
            received = 0
            while True:
                try:
                    piece = buffer[:readinto(buffer)]
                except Exception as exc:  # the client went away mid-chunk (werkzeug's ClientDisconnected)
                    if not isinstance(exc, (OSError, ValueError)) and type(exc).__name__ != "ClientDisconnected":
                        raise
                    log.info("upload.cut", upload_id=upload_id, received=received, error=type(exc).__name__,
                             kept=checksum is None)
                    cut[0] = True
                    return
                if not piece:
                    if content_length is not None and received < content_length:  # the stream ended early
                        log.info("upload.cut", upload_id=upload_id, received=received, expected=content_length,
                                 kept=checksum is None)
                        cut[0] = True
                    return
                received += len(piece)
                if received > remaining:
                    raise PayloadTooLarge(f"the chunk goes past the upload's length ({remaining} bytes remain)")
                if chunk_hasher is not None:
                    chunk_hasher.update(piece)
                if running is not None:
                    running.update(piece)
                yield piece

        whole: list[str | None] = [None]

        def commit(written: int) -> bool:
            if cut[0] and checksum is not None:
                return False  # a checksummed chunk cut short cannot be verified: dropped whole
            if checksum is not None and chunk_hasher.digest() != checksum[1]:
                raise ChecksumMismatch(f"the chunk's {checksum[0]} does not match Upload-Checksum: nothing "
                                       f"was appended, the upload stays at {state.offset}")
            if state.offset + written == state.length:
                digest = running.hexdigest() if running is not None else self._rehash(upload_id, state.length)
                if state.declared_sha256 is not None and digest != state.declared_sha256:
                    raise ChecksumMismatch(f"the uploaded file's sha256 is {digest}, not the {state.declared_sha256} "
                                           "declared in Upload-Metadata: the last chunk was dropped")
                whole[0] = digest
            return True

        end = self._no_space_is_507(lambda: self.blobs.append(upload_id, state.offset, chunks(), commit))
        if end == state.offset:
            return state
        before, state.offset = state.offset, end
        if whole[0] is not None:
            self._complete(state, None, whole[0])
        else:
            self._no_space_is_507(lambda: self.blobs.write_upload(state))  # the acknowledgement
            if running is not None:
                self.running.put(upload_id, end, running)
        self.count_bytes(end - before)
        return state

    def _rehash(self, upload_id: str, length: int) -> str:
        hasher = hashlib.sha256()
        for piece in self.blobs.read_data(upload_id, length):
            hasher.update(piece)
        return hasher.hexdigest()

    def _complete(self, state: UploadState, hasher: Any | None, digest: str | None = None) -> None:
        digest = digest or hasher.hexdigest()
        if state.declared_sha256 is not None and digest != state.declared_sha256:
            raise ChecksumMismatch("the uploaded file's sha256 does not match the one declared")
        state.sha256 = digest
        state.completed_at = self.clock()
        self._no_space_is_507(lambda: self.blobs.write_upload(state))
        self.blobs.finalize(state.id, digest)
        log.info("upload.completed", upload_id=state.id, length=state.length, sha256=digest)

    # -- termination and expiry ------------------------------------------------------------------

    def terminate(self, upload_id: str) -> None:
        if self.blobs.read_upload(upload_id) is None:
            raise UploadNotFound(f"no upload with id {upload_id!r}")
        try:
            with self.blobs.upload_lock(upload_id):
                self.blobs.delete_upload(upload_id)
        except UploadBusy:
            raise UploadBusyError(f"a request is appending to upload {upload_id}; retry when it ends") from None
        log.info("upload.terminated", upload_id=upload_id)

    def expire(self, now: datetime | None = None) -> int:
        """Delete unfinished uploads past their expiry, and the records of finished ones older than
        the expiry (their bytes stay in the source store while a job names them)."""
        now = now or self.clock()
        count = 0
        for upload_id in self.blobs.upload_ids():
            try:
                state = self.blobs.read_upload(upload_id)
            except (OSError, ValueError, TypeError):
                continue
            if state is None:
                continue
            done = state.complete and state.completed_at is not None and \
                state.completed_at + timedelta(seconds=self.settings.expiry_seconds) <= now
            if done or (not state.complete and state.expires_at <= now):
                try:
                    with self.blobs.upload_lock(upload_id):
                        self.blobs.delete_upload(upload_id)
                except (UploadBusy, FileNotFoundError):
                    continue
                count += 1
                log.info("upload.expired", upload_id=upload_id, complete=state.complete)
        return count

    # -- a job's source --------------------------------------------------------------------------

    def source_of(self, upload_ref: str) -> dict[str, Any]:
        """What a job created from an upload records: its path in the source store, name, size, sha256.
        ``upload_ref`` is the upload's id or its URL (the last path segment is the id)."""
        upload_id = upload_ref.rstrip("/").rsplit("/", 1)[-1]
        field = "source_upload_id"
        try:
            state = self.get(upload_id)
        except (UploadNotFound, UploadGone) as exc:
            raise InvalidRequest(f"source_upload_id: {exc.detail}", {field: [exc.detail]}) from None
        if not state.complete:
            detail = f"upload {upload_id} is not finished ({state.offset} of {state.length} bytes)"
            raise InvalidRequest(f"source_upload_id: {detail}", {field: [detail]})
        path = self.blobs.finalize(upload_id, state.sha256)  # idempotent: a crash may have left it unmoved
        name = state.metadata.get("filename") or state.metadata.get("name") or None
        return {"source_file_path": path, "source_upload_id": upload_id, "source_name": name,
                "source_size": state.length, "source_sha256": state.sha256}

