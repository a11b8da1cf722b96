"""The poll response's download URL carries a signed token bound to the job and its attempt.

Decision (documented in ``tokens.py``): a genuine token whose attempt is over answers 409, like every
stale worker's request; a token that is forged, altered, expired or for another job answers 403.
"""
from __future__ import annotations

import time
from urllib.parse import parse_qs, urlsplit

import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer

from support.actions import WorkerActions, auth
from morag_remote import tokens as tokens_module
from morag_remote.context import KEYS

LEASE = 1800  # the audio lease by default


def token_of(url: str) -> str:
    return parse_qs(urlsplit(url).query)["token"][0]


def with_token(url: str, token: str) -> str:
    return f"{urlsplit(url).path}?token={token}"


@pytest.fixture
def first_attempt(producer, worker, clock):
    """A job claimed by w1 (attempt 1): (job id, its download URL, the source bytes)."""
    job_id = producer.create_id("audio", name="talk.mp3")
    claimed = worker.claim("audio")
    assert claimed["job_id"] == job_id
    data = (producer.sources / "talk.mp3").read_bytes()
    return job_id, claimed["source_file_url"], data


def test_download_url_of_attempt_1_is_409_after_the_lease_lapsed_and_another_worker_claimed(
        first_attempt, worker, worker2, clock):
    job_id, old_url, data = first_attempt
    clock.advance(LEASE + 1)
    second = worker2.claim("audio")
    assert second["job_id"] == job_id and second["retry_count"] == 1
    stale = worker.download(old_url)
    assert stale.status_code == 409
    assert stale.json["title"] == "Lease not held"
    assert data not in stale.data
    assert worker2.download(second["source_file_url"]).data == data


def test_download_url_of_attempt_1_is_409_after_a_failure_requeued_it_and_the_same_worker_claimed_again(
        first_attempt, worker, clock):
    job_id, old_url, data = first_attempt
    assert worker.result(job_id, success=False, error_message="GPU out of memory").json["status"] == "pending"
    clock.advance(3600)  # past the retry backoff
    again = worker.claim("audio")
    assert again["job_id"] == job_id
    assert worker.download(old_url).status_code == 409
    assert worker.download(again["source_file_url"]).data == data


def test_download_url_is_409_while_the_job_waits_requeued(first_attempt, worker, service, clock):
    job_id, old_url, _ = first_attempt
    clock.advance(LEASE + 1)
    assert service.expire_due() == 1
    assert service.get(job_id).status == "pending"
    assert worker.download(old_url).status_code == 409


@pytest.mark.parametrize("ending", ["cancel", "complete"])
def test_download_url_is_409_once_the_job_ended(ending, first_attempt, worker, producer):
    job_id, old_url, data = first_attempt
    if ending == "cancel":
        assert producer.cancel(job_id).status_code == 200
    else:
        assert worker.result(job_id).status_code == 200
    response = worker.download(old_url)
    assert response.status_code == 409
    assert data not in response.data


def test_lease_id_header_of_attempt_1_is_409_after_the_job_was_claimed_again(producer, worker, worker2, clock):
    job_id = producer.create_id("audio")
    first = worker.claim("audio")
    clock.advance(LEASE + 1)
    assert worker2.claim("audio")["job_id"] == job_id
    path = urlsplit(first["source_file_url"]).path
    assert worker.download(path, **{"X-Lease-Id": first["lease_id"]}).status_code == 409


def _tampered(token: str) -> dict[str, str]:
    """Altered copies of ``token``. Each flips a character whose six bits all count: the last one
    of a base64 signature carries padding bits, which a decoder ignores (A and B differ only there)."""
    payload, stamp, signature = token.rsplit(".", 2)  # a compressed payload starts with "."
    flip = lambda s, i: s[:i] + ("A" if s[i] != "A" else "B") + s[i + 1:]  # noqa: E731
    return {
        "middle signature character changed": f"{payload}.{stamp}.{flip(signature, len(signature) // 2)}",
        "first payload character changed": flip(token, 0),
        "timestamp changed": f"{payload}.{flip(stamp, 0)}.{signature}",
        "signature dropped": f"{payload}.{stamp}",
        "signature truncated": token[:-4],
        "extra characters appended": token + "AAAA",
        "empty": "",
        "not a token": "../../etc/passwd",
        "dots only": "..",
        "unsigned payload": payload,
    }


def test_tampered_token_is_403(first_attempt, worker):
    job_id, url, data = first_attempt
    for name, bad in _tampered(token_of(url)).items():
        response = worker.download(with_token(url, bad))
        assert response.status_code == 403, name
        assert data not in response.data, name


def test_every_tampering_is_refused_whatever_the_token():
    """Hundreds of genuine tokens: no variant of any of them may pass (a flip of padding bits would)."""
    tokens = tokens_module.DownloadTokens("a secret key for this test")
    for n in range(300):
        job_id, lease_id = f"job-{n}", f"lease-{n}"
        token = tokens.issue(job_id, lease_id)
        assert tokens.lease_of(token, job_id) == lease_id
        for name, bad in _tampered(token).items():
            assert tokens.lease_of(bad, job_id) is None, (name, token)


def test_token_of_job_a_used_on_job_b_is_403(producer, worker):
    job_a = producer.create_id("audio", name="a.mp3")
    job_b = producer.create_id("audio", name="b.mp3")
    url_a = worker.claim("audio")["source_file_url"]
    assert worker.claim("audio")["job_id"] == job_b  # the same worker holds both
    response = worker.download(f"/api/v1/remote-jobs/{job_b}/download?token={token_of(url_a)}")
    assert response.status_code == 403
    assert (producer.sources / "b.mp3").read_bytes() not in response.data
    assert job_a != job_b


def test_expired_token_is_403(first_attempt, worker, app, service):
    job_id, url, _ = first_attempt

    class EightDaysAgo(TimestampSigner):
        def get_timestamp(self) -> int:
            return int(time.time()) - 8 * 24 * 3600

    old = URLSafeTimedSerializer(app.config["SECRET_KEY"], salt=tokens_module.SALT, signer=EightDaysAgo)
    token = old.dumps([job_id, service.get(job_id).lease_id])
    assert worker.download(with_token(url, token)).status_code == 403


def test_token_signed_by_another_instance_is_403(first_attempt, worker, service):
    job_id, url, _ = first_attempt
    foreign = tokens_module.DownloadTokens("another instance's secret").issue(job_id, service.get(job_id).lease_id)
    assert worker.download(with_token(url, foreign)).status_code == 403


def test_download_url_alone_is_not_enough_without_a_key(first_attempt, client, keys):
    _, url, data = first_attempt
    anonymous = client.get(url)
    assert anonymous.status_code == 401 and data not in anonymous.data
    producer_key = client.get(url, headers=auth(keys["producer"]))
    assert producer_key.status_code == 403 and data not in producer_key.data


def test_worker_key_without_token_or_lease_id_is_403_with_a_hint(first_attempt, worker):
    _, url, _ = first_attempt
    response = worker.download(urlsplit(url).path)
    assert response.status_code == 403
    assert "source_file_url" in response.json["detail"]


def test_any_worker_key_with_the_current_url_downloads(first_attempt, client, app):
    """The token is the proof of the attempt (the seed's worker shares one key across machines)."""
    job_id, url, data = first_attempt
    _, other_key = app.extensions[KEYS].create("another-worker-key", "worker")
    assert WorkerActions(client, other_key, "w9").download(url).data == data
