"""The filesystem blob store on its own: ids it refuses, an upload's lock, appends that are cut
back when they fail or are not committed, bounded reads, one copy of the same bytes, deletes of
what is not there."""
from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import pytest

from morag_remote.blobs import FileBlobStore
from morag_remote.store.base import UploadBusy, UploadState

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)


@pytest.fixture
def blobs(tmp_path) -> FileBlobStore:
    return FileBlobStore(str(tmp_path / "blobs"))


def _upload(blobs: FileBlobStore, upload_id: str = "up1", length: int = 10) -> UploadState:
    state = UploadState(upload_id, length, 0, NOW, NOW + timedelta(days=1), {"filename": "a.bin"}, "producer")
    blobs.create_upload(state)
    return state


def test_ids_that_could_name_another_file_are_refused(blobs):
    with pytest.raises(ValueError):
        blobs.create_upload(UploadState("../x", 1, 0, NOW, NOW))
    assert blobs.read_upload("../x") is None and blobs.read_upload("missing") is None
    blobs.delete_upload("../x")  # nothing to do, nothing raised
    blobs.delete_upload("missing")
    with pytest.raises(ValueError):
        blobs.source_path("not-a-digest")
    with pytest.raises(ValueError):
        blobs.stage_artifact("../job", "1", "a.srt", [b"x"], 10)


def test_an_upload_is_read_back_as_it_was_written(blobs):
    state = _upload(blobs)
    again = blobs.read_upload("up1")
    assert again == state and blobs.upload_ids() == ["up1"]


def test_a_second_holder_of_an_upload_is_told_it_is_busy(blobs):
    _upload(blobs)
    with blobs.upload_lock("up1"):
        with pytest.raises(UploadBusy):
            with blobs.upload_lock("up1"):
                pass
    with blobs.upload_lock("up1"):  # released: free again
        pass


def test_an_append_not_committed_or_failing_leaves_the_offset_where_it_was(blobs):
    _upload(blobs)
    assert blobs.append("up1", 0, [b"01234"], commit=lambda n: True) == 5
    assert blobs.append("up1", 5, [b"56789"], commit=lambda n: False) == 5

    def broken():
        yield b"567"
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        blobs.append("up1", 5, broken(), commit=lambda n: True)
    assert b"".join(blobs.read_data("up1")) == b"01234"
    assert b"".join(blobs.read_data("up1", 3)) == b"012"


def test_the_same_bytes_uploaded_twice_are_stored_once(blobs):
    digest = hashlib.sha256(b"0123456789").hexdigest()
    for upload_id in ("a1", "a2"):
        _upload(blobs, upload_id)
        blobs.append(upload_id, 0, [b"0123456789"], commit=lambda n: True)
        path = blobs.finalize(upload_id, digest)
    assert path == blobs.source_path(digest)
    with open(path, "rb") as fh:
        assert fh.read() == b"0123456789"
    blobs.delete_upload("a1")
    blobs.delete_upload("a2")
    assert blobs.upload_ids() == []
