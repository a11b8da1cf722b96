"""``GET /metrics`` in one process: who may scrape it, the queue gauges read from the store, and
the counters fed by the service's transitions. (Across gunicorn processes: test_metrics_gunicorn.py.)"""
from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from support.actions import auth
from support.metrics_text import parse_samples, value, values_of
from morag_remote import create_app
from morag_remote.context import SERVICE
from morag_remote.metrics import is_public
from morag_remote.models import STATUSES, Action

AUDIO_LEASE = 1800


@pytest.fixture
def scrape(client, keys):
    def _scrape() -> dict:
        response = client.get("/metrics", headers=auth(keys["worker"]))
        assert response.status_code == 200, response.data
        return parse_samples(response.get_data(as_text=True))

    return _scrape


# -- access ------------------------------------------------------------------------------------

def test_metrics_without_a_key_is_401_problem_json(client):
    response = client.get("/metrics")
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_metrics_with_a_bad_key_is_401(client, keys):
    assert client.get("/metrics", headers=auth("mrk_not-a-key")).status_code == 401


@pytest.mark.parametrize("role", ["worker", "producer", "admin"])
def test_metrics_accepts_a_key_of_any_role(client, keys, role):
    response = client.get("/metrics", headers=auth(keys[role]))
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain; version=")
    assert response.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("app_config", [{"METRICS_PUBLIC": True}, {"METRICS_PUBLIC": "true"}])
def test_public_metrics_need_no_key(client):
    assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize("flag", ["no", "false", "0", "", 0, False, None, "off"])
def test_only_an_explicit_yes_makes_metrics_public(flag):
    assert is_public(flag) is False


@pytest.mark.parametrize("flag", ["yes", "TRUE", "1", " on ", 1, True])
def test_an_explicit_yes_makes_metrics_public(flag):
    assert is_public(flag) is True


def test_public_flag_from_the_environment_opens_metrics(monkeypatch, instance_path):
    monkeypatch.setenv("MORAG_REMOTE_METRICS_PUBLIC", "true")
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path)})
    assert app.test_client().get("/metrics").status_code == 200


def test_openmetrics_is_served_when_the_scraper_asks_for_it(client, keys):
    response = client.get("/metrics", headers={**auth(keys["admin"]),
                                                "Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.content_type.startswith("application/openmetrics-text")
    assert response.get_data(as_text=True).rstrip().endswith("# EOF")


@pytest.mark.parametrize("accept", ["application/openmetrics-text; version=abc",
                                    "application/openmetrics-text; version=1.0.0x",
                                    "text/plain; version=abc", "text/plain; version=" + "9" * 5000])
def test_an_accept_version_that_cannot_be_read_gets_the_text_format(client, keys, accept):
    response = client.get("/metrics", headers={**auth(keys["admin"]), "Accept": accept})
    assert response.status_code == 200
    assert response.content_type.startswith("text/plain")
    assert "morag_remote_jobs" in response.get_data(as_text=True)


# -- gauges read from the store ----------------------------------------------------------------

def test_queue_depth_by_status_and_content_type(scrape, producer, worker):
    for _ in range(3):
        producer.create_id("audio")
    producer.create_id("video")
    worker.claim("audio")
    samples = scrape()
    assert values_of(samples, "morag_remote_jobs") == {
        (("content_type", "audio"), ("status", "pending")): 2,
        (("content_type", "audio"), ("status", "processing")): 1,
        (("content_type", "video"), ("status", "pending")): 1,
    }


def test_queue_depth_has_a_zero_series_for_every_status_and_configured_type(scrape):
    samples = scrape()
    depth = {labels for (name, labels) in samples if name == "morag_remote_jobs"}
    assert len(depth) == len(STATUSES) * 6  # held included
    assert value(samples, "morag_remote_jobs", status="timeout", content_type="youtube") == 0


def test_oldest_pending_age_follows_the_store_and_the_clock(scrape, producer, worker, clock):
    assert value(scrape(), "morag_remote_oldest_pending_job_age_seconds") == 0
    producer.create_id("audio")
    clock.advance(90)
    producer.create_id("video")
    clock.advance(30)
    assert value(scrape(), "morag_remote_oldest_pending_job_age_seconds") == 120
    worker.claim("audio")
    assert value(scrape(), "morag_remote_oldest_pending_job_age_seconds") == 30


def test_active_workers_counts_distinct_workers_holding_jobs(scrape, producer, worker, worker2):
    producer.create_id("audio")
    producer.create_id("audio")
    worker.claim("audio")
    worker2.claim("audio")
    assert value(scrape(), "morag_remote_active_workers") == 2


# -- counters fed by the service ---------------------------------------------------------------

def test_claims_are_counted_by_content_type(scrape, producer, worker):
    producer.create_id("audio")
    producer.create_id("audio")
    producer.create_id("video")
    worker.poll("audio,video", max_jobs=3)
    samples = scrape()
    assert value(samples, "morag_remote_job_claims_total", content_type="audio") == 2
    assert value(samples, "morag_remote_job_claims_total", content_type="video") == 1


def test_a_completion_is_counted_with_its_duration(scrape, producer, worker, clock):
    producer.create_id("video")
    job = worker.claim("video")
    clock.advance(42)
    assert worker.result(job["job_id"]).status_code == 200
    samples = scrape()
    assert value(samples, "morag_remote_job_completions_total", content_type="video") == 1
    assert value(samples, "morag_remote_job_duration_seconds_count", content_type="video") == 1
    assert value(samples, "morag_remote_job_duration_seconds_sum", content_type="video") == 42
    assert value(samples, "morag_remote_job_duration_seconds_bucket", content_type="video", le="30.0") == 0
    assert value(samples, "morag_remote_job_duration_seconds_bucket", content_type="video", le="60.0") == 1


def test_a_repeated_result_is_counted_once(scrape, producer, worker):
    producer.create_id("audio")
    job = worker.claim("audio")
    worker.result(job["job_id"])
    assert worker.result(job["job_id"]).status_code == 200
    assert value(scrape(), "morag_remote_job_completions_total", content_type="audio") == 1


def test_a_failure_with_a_retry_left_counts_a_failure_and_a_requeue(scrape, producer, worker):
    producer.create_id("audio")
    job = worker.claim("audio")
    worker.result(job["job_id"], success=False, error_message="oom")
    samples = scrape()
    assert values_of(samples, "morag_remote_job_failures_total") == {
        (("content_type", "audio"), ("outcome", "requeued")): 1}
    assert values_of(samples, "morag_remote_job_requeues_total") == {
        (("content_type", "audio"), ("reason", "failure")): 1}
    assert values_of(samples, "morag_remote_job_completions_total") == {}


def test_a_final_failure_counts_a_failure_and_no_requeue(scrape, producer, worker):
    producer.create_id("document")
    job = worker.claim("document")
    worker.result(job["job_id"], success=False, error_message="not a pdf", retryable=False)
    samples = scrape()
    assert values_of(samples, "morag_remote_job_failures_total") == {
        (("content_type", "document"), ("outcome", "failed")): 1}
    assert values_of(samples, "morag_remote_job_requeues_total") == {}


def test_lapsed_leases_count_expiries_by_outcome(scrape, producer, worker, worker2, clock):
    producer.create_id("audio")
    producer.create_id("audio", max_retries=0)
    worker.poll("audio", max_jobs=2)
    clock.advance(AUDIO_LEASE + 1)
    worker2.poll("video")  # any poll handles lapsed leases first
    samples = scrape()
    assert values_of(samples, "morag_remote_lease_expiries_total") == {
        (("content_type", "audio"), ("outcome", "requeued")): 1,
        (("content_type", "audio"), ("outcome", "timeout")): 1}
    assert values_of(samples, "morag_remote_job_requeues_total") == {
        (("content_type", "audio"), ("reason", "lease_expired")): 1}


def test_an_explicit_retry_counts_a_requeue(scrape, producer):
    job_id = producer.create_id("web")
    producer.cancel(job_id)
    assert producer.retry(job_id).status_code == 200
    assert values_of(scrape(), "morag_remote_job_requeues_total") == {
        (("content_type", "web"), ("reason", "retry")): 1}


def test_each_app_counts_its_own_events(instance_path, tmp_path, keys, producer, worker, scrape):
    producer.create_id("audio")
    worker.claim("audio")
    other = create_app({"TESTING": True, "INSTANCE_PATH": str(tmp_path / "other")})
    other.config["METRICS_PUBLIC"] = True
    samples = parse_samples(other.test_client().get("/metrics").get_data(as_text=True))
    assert values_of(samples, "morag_remote_job_claims_total") == {}
    assert value(scrape(), "morag_remote_job_claims_total", content_type="audio") == 1


# -- robustness --------------------------------------------------------------------------------

class _BrokenObserver:
    def job_changed(self, action, job):
        raise RuntimeError("observer bug")


def test_a_failing_observer_never_fails_the_transition(service, producer, worker, scrape):
    service.hooks.observers.insert(0, _BrokenObserver())
    producer.create_id("audio")
    with capture_logs() as logs:
        job = worker.claim("audio")
    assert service.get(job["job_id"]).status == "processing"
    assert any(e["event"] == "job.observer_failed" and e["action"] == Action.CLAIM.value for e in logs)
    assert value(scrape(), "morag_remote_job_claims_total", content_type="audio") == 1


def test_multiprocess_dir_set_after_import_falls_back_to_counting_in_process(monkeypatch, instance_path, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "prom"))
    with capture_logs() as logs:
        app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "METRICS_PUBLIC": True})
    assert any(e["event"] == "metrics.multiprocess_unavailable" for e in logs)
    service = app.extensions[SERVICE]
    (instance_path / "sources" / "a.mp3").write_bytes(b"audio")
    service.create(source_file_path=str(instance_path / "sources" / "a.mp3"), content_type="audio",
                   ingestion_task_id="t")
    service.poll("w", ["audio"])
    samples = parse_samples(app.test_client().get("/metrics").get_data(as_text=True))
    assert value(samples, "morag_remote_job_claims_total", content_type="audio") == 1
