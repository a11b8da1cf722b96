"""``POST /<id>/release``: the holder hands a job back unfinished; it is claimable at once, no
failed attempt is counted, and only the current holder may do it."""
from __future__ import annotations

from support.actions import auth


def test_a_released_job_is_pending_at_once_with_its_retry_count_unchanged(producer, worker, worker2):
    job_id = producer.create_id()
    claimed = worker.claim()
    response = worker.release(job_id, lease_id=claimed["lease_id"])
    assert response.status_code == 200
    assert response.json == {"job_id": job_id, "status": "pending", "retry_count": 0, "releases": 1}
    again = worker2.claim()
    assert again["job_id"] == job_id and again["retry_count"] == 0 and again["lease_id"] != claimed["lease_id"]
    detail = producer.get(job_id).json
    assert detail["releases"] == 1 and detail["worker_id"] == "w2" and detail["attempt"] == 2


def test_release_takes_the_lease_id_from_the_header_too(producer, worker, client, keys):
    job_id = producer.create_id()
    lease = worker.claim()["lease_id"]
    response = client.post(f"/api/v1/remote-jobs/{job_id}/release",
                           headers={**auth(keys["worker"]), "X-Lease-Id": lease})
    assert response.status_code == 200 and response.json["status"] == "pending"


def test_a_stale_lease_cannot_release_the_job_of_the_new_holder(producer, worker, worker2):
    job_id = producer.create_id()
    first = worker.claim()["lease_id"]
    worker.release(job_id, lease_id=first)
    second = worker2.claim()["lease_id"]
    response = worker.release(job_id, lease_id=first)
    assert response.status_code == 409 and response.mimetype == "application/problem+json"
    detail = producer.get(job_id).json
    assert detail["status"] == "processing" and detail["releases"] == 1
    assert worker2.release(job_id, lease_id=second).status_code == 200


def test_a_cancelled_or_pending_job_cannot_be_released(producer, worker):
    pending = producer.create_id()
    assert worker.release(pending).status_code == 409
    job_id = producer.create_id()
    lease = worker.claim()["lease_id"]
    producer.cancel(job_id)
    response = worker.release(job_id, lease_id=lease)
    assert response.status_code == 409
    assert producer.get(job_id).json["status"] == "cancelled"
    assert producer.get(pending).json["releases"] == 0


def test_a_key_bound_to_another_worker_cannot_release(producer, worker, client, keys):
    job_id = producer.create_id()
    worker.claim()
    response = client.post(f"/api/v1/remote-jobs/{job_id}/release", json={}, headers=auth(keys["worker_bound"]))
    assert response.status_code == 409
    assert producer.get(job_id).json["status"] == "processing"


def test_release_of_an_unknown_job_is_404_and_a_bad_body_is_422(worker):
    assert worker.release("nope").status_code == 404
    bad = worker.release("nope", lease_id=5)
    assert bad.status_code == 422 and "lease_id" in bad.json["errors"]
    unknown = worker.release("nope", extra=1)
    assert unknown.status_code == 422


def test_releases_count_in_the_requeue_metric(producer, worker, client, keys):
    job_id = producer.create_id()
    worker.release(job_id, lease_id=worker.claim()["lease_id"])
    text = client.get("/metrics", headers=auth(keys["admin"])).get_data(as_text=True)
    assert 'morag_remote_job_requeues_total{content_type="audio",reason="release"} 1.0' in text


def test_the_cli_shows_how_often_a_job_was_released(producer, worker, runner):
    job_id = producer.create_id()
    worker.release(job_id, lease_id=worker.claim()["lease_id"])
    out = runner.invoke(args=["remote-jobs", "show", job_id])
    assert out.exit_code == 0 and "releases:          1" in out.output
