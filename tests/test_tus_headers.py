"""tus headers read on their own: ``Upload-Metadata`` pairs and ``Upload-Checksum``, each refusal a
client error with the reason, and the client's ``Repr-Digest`` and file-name parsing."""
from __future__ import annotations

import base64
import hashlib

import pytest

from morag_remote.client.download import attachment_name, expected_sha256
from morag_remote.exceptions import ChecksumUnsupported, ServiceError
from morag_remote.uploads import encode_metadata, parse_checksum, parse_metadata


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_metadata_pairs_are_decoded_and_encoded_back():
    header = f"filename {_b64('talk.mp3')},is_confidential,sha256 {_b64('ab')}"
    parsed = parse_metadata(header)
    assert parsed == {"filename": "talk.mp3", "is_confidential": "", "sha256": "ab"}
    assert parse_metadata(encode_metadata(parsed)) == parsed
    assert parse_metadata(None) == {} and parse_metadata("") == {}


@pytest.mark.parametrize("header", [
    "x" * 5000,
    f"a {_b64('1')},a {_b64('2')}",
    "a b c",
    " ,a",
    "a not-base64!",
    f"a {base64.b64encode(bytes([0xff, 0xfe])).decode()}",
    f"a {_b64('nul' + chr(0))}",
])
def test_metadata_that_is_not_key_base64_pairs_is_refused(header):
    with pytest.raises(ServiceError) as caught:
        parse_metadata(header)
    assert caught.value.status_code == 400 and "Upload-Metadata" in caught.value.detail


def test_a_checksum_names_a_known_algorithm_and_a_base64_digest():
    digest = hashlib.sha256(b"x").digest()
    assert parse_checksum(f"sha256 {base64.b64encode(digest).decode()}") == ("sha256", digest)
    assert parse_checksum(None) is None
    for bad in ("sha256", "crc32 AAAA", "sha256 not-base64!"):
        with pytest.raises(ChecksumUnsupported):
            parse_checksum(bad)


def test_the_client_reads_repr_digest_and_a_safe_file_name():
    digest = hashlib.sha256(b"x").digest()
    assert expected_sha256(f"sha-256=:{base64.b64encode(digest).decode()}:") == digest
    assert expected_sha256(None) is None and expected_sha256("sha-256=:!!!!:") is None
    assert attachment_name(None) is None
    assert attachment_name("attachment; filename*=UTF-8''..%2F..%2Fetc%2Fpasswd") == "passwd"
    assert attachment_name('attachment; filename="a\\\\b.srt"') == "b.srt"
    assert attachment_name('attachment; filename="..."') is None
