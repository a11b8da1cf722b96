"""Routing and policies (issue 18), in one process on both backends: requirements against
capabilities, scheduling and expiry at create, pause and resume per content type, the limit per
type, what a lapsed lease does (requeue, fail, hold), and the bad inputs that are refused with a 422
naming the field. The real-process tests (several pollers, hosts, a killed worker) are in
``test_routing_processes.py``."""
from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from typing import Any

import pytest

from support.actions import WorkerActions, auth
from support.jobs import claimed_job, lease_of, new_job
from support.metrics_text import parse_samples, value
from test_events import SECRET, Receiver
from morag_remote.models import to_iso
from morag_remote.routing import Capabilities, Requirements
from morag_remote.service import Caller
from morag_remote.store.base import JobFilter

J = "/api/v1/remote-jobs"

BIG = {"labels": ["cuda12", "whisper-large-v3"], "min": {"gpu_memory_gb": 24}}


# -- requirements x capabilities ------------------------------------------------------------------

# (requires at create, the poll's query parameters, claimed?)
MATRIX = [
    ("none-none", None, {}, True),
    ("none-capable", None, {"labels": "cuda12", "resources": "gpu_memory_gb:48"}, True),
    ("labels-subset", {"labels": ["cuda12"]}, {"labels": "cuda12,whisper-large-v3"}, True),
    ("labels-equal", BIG, {"labels": "whisper-large-v3,cuda12", "resources": "gpu_memory_gb:24"}, True),
    ("label-missing", BIG, {"labels": "cuda12", "resources": "gpu_memory_gb:48"}, False),
    ("min-met", {"min": {"gpu_memory_gb": 24}}, {"resources": "gpu_memory_gb:48"}, True),
    ("min-met-exactly", {"min": {"gpu_memory_gb": 24.5}}, {"resources": "gpu_memory_gb:24.5"}, True),
    ("min-unmet", {"min": {"gpu_memory_gb": 80}}, {"resources": "gpu_memory_gb:24"}, False),
    ("min-resource-missing", {"min": {"gpu_memory_gb": 8}}, {"resources": "cpus:64"}, False),
    ("one-min-of-two-unmet", {"min": {"gpu_memory_gb": 8, "cpus": 16}},
     {"resources": "gpu_memory_gb:48,cpus:8"}, False),
    ("requires-no-capabilities", {"labels": ["cuda12"]}, {}, False),
    ("requires-empty-capabilities", {"labels": ["cuda12"]}, {"labels": ""}, False),
    ("empty-requires-is-none", {"labels": [], "min": {}}, {}, True),
]


@pytest.mark.parametrize("requires, params, claimed", [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_requirement_capability_matrix_get_and_post(requires, params, claimed, producer, worker, client, keys):
    extra = {} if requires is None else {"requires": requires}
    job_id = producer.create_id("audio", **extra)

    got = worker.poll("audio", **params).json
    assert (got["job_id"] == job_id) is claimed

    if claimed:  # the same poll in its JSON form takes the same jobs
        second = producer.create_id("audio", **extra)
        body: dict[str, Any] = {"worker_id": "w2", "content_types": ["audio"]}
        if params:
            resources = dict(p.split(":") for p in params.get("resources", "").split(",") if p)
            body["capabilities"] = {"labels": [x for x in params.get("labels", "").split(",") if x],
                                    "resources": {k: float(v) for k, v in resources.items()}}
        response = client.post(f"{J}/poll", json=body, headers=auth(keys["worker"]))
        assert response.status_code == 200, response.json
        assert response.json["job_id"] == second


def test_claim_order_among_the_claimable_stays_priority_then_age(producer, worker):
    old_plain = producer.create_id("audio")
    routed = producer.create_id("audio", requires={"labels": ["cuda12"]})
    urgent = producer.create_id("audio", priority=5, requires={"min": {"gpu_memory_gb": 80}})
    unreachable = producer.create_id("audio", priority=9, requires={"labels": ["tpu"]})
    got = worker.poll("audio", max_jobs=10, labels="cuda12", resources="gpu_memory_gb:80").json
    assert [j["job_id"] for j in got["jobs"]] == [urgent, old_plain, routed]
    assert producer.status(unreachable).json["status"] == "pending"


def test_a_seed_worker_poll_never_takes_a_job_with_requirements(producer, worker):
    routed = producer.create_id("audio", requires=BIG)
    plain = producer.create_id("audio")
    assert worker.claim("audio")["job_id"] == plain
    assert worker.poll("audio").json["job_id"] is None
    assert producer.get(routed).json["requires"] == {"labels": ["cuda12", "whisper-large-v3"],
                                                      "min": {"gpu_memory_gb": 24}}


def test_requirements_are_stored_normalized_and_grouped_by_set(service):
    a = new_job(service, requires={"labels": ["b", "a", "a"], "min": {"z": 1, "gpu": 24}})
    b = new_job(service, requires={"min": {"gpu": 24, "z": 1}, "labels": ["a", "b"]})
    assert a.requires == b.requires == {"labels": ["a", "b"], "min": {"gpu": 24, "z": 1}}
    assert Requirements.of(a.requires).key == Requirements.of(b.requires).key
    assert new_job(service, requires={"labels": [], "min": {}}).requires is None


def test_service_poll_with_capabilities_and_many_unclaimable_jobs_of_one_set(service):
    for _ in range(300):
        new_job(service, requires={"min": {"gpu_memory_gb": 80}})
    small = [new_job(service).id for _ in range(3)]
    caps = Capabilities(resources={"gpu_memory_gb": 24})
    got = service.poll("w", ["audio"], max_jobs=10, capabilities=caps)
    assert [j.id for j in got] == small
    assert len(service.poll("w", ["audio"], 10, capabilities=Capabilities(resources={"gpu_memory_gb": 80}))) == 10


@pytest.mark.files_only
def test_file_claim_tests_each_requirement_set_once_per_claim(service, monkeypatch):
    for gb in (80, 40):
        for _ in range(50):
            new_job(service, requires={"min": {"gpu_memory_gb": gb}})
    new_job(service)
    calls = []
    real = Requirements.met_by

    def counting(self, caps):
        calls.append(self.key)
        return real(self, caps)

    monkeypatch.setattr(Requirements, "met_by", counting)
    got = service.poll("w", ["audio"], 5, capabilities=Capabilities(resources={"gpu_memory_gb": 24}))
    assert len(got) == 1
    assert sorted(calls) == sorted(set(calls)) and len(calls) == 2  # two sets, each tested once


# -- available_at and expires_at ------------------------------------------------------------------

def test_available_at_delays_the_job_until_then(producer, worker, clock):
    later = clock() + timedelta(minutes=10)
    job_id = producer.create_id("audio", available_at=to_iso(later))
    assert producer.get(job_id).json["available_at"] == to_iso(later).replace("Z", "+00:00")
    assert worker.poll("audio").json["job_id"] is None
    clock.advance(601)
    assert worker.claim("audio")["job_id"] == job_id


def test_available_at_in_the_past_means_now(producer, worker, clock):
    job_id = producer.create_id("audio", available_at=to_iso(clock() - timedelta(days=1)))
    assert worker.claim("audio")["job_id"] == job_id


def test_expires_at_times_the_pending_job_out_instead_of_claiming_it(producer, worker, clock, runner):
    job_id = producer.create_id("audio", expires_at=to_iso(clock() + timedelta(seconds=30)))
    other = producer.create_id("audio", expires_at=to_iso(clock() + timedelta(seconds=30)))
    assert worker.claim("audio")["job_id"] == job_id  # in time: claimed as usual
    clock.advance(31)
    assert worker.poll("audio").json["job_id"] is None
    status = producer.status(other).json
    assert status["status"] == "timeout"
    assert "expired at" in status["error_message"] and "before a worker took it" in status["error_message"]
    assert producer.status(job_id).json["status"] == "processing"  # expiry is about pending jobs only


def test_expired_job_is_never_claimed_even_before_the_sweep(service, clock):
    job = new_job(service, expires_at=clock() + timedelta(seconds=5))
    clock.advance(6)
    route_now = clock()
    assert service.store.claim(["audio"], 5, route_now, lambda j: j) == []
    assert service.expire_due() == 1
    assert service.get(job.id).status == "timeout"


def test_cleanup_expired_expires_pending_jobs_past_expires_at(producer, clock, runner):
    job_id = producer.create_id("audio", expires_at=to_iso(clock() + timedelta(seconds=5)))
    clock.advance(10)
    out = runner.invoke(args=["remote-jobs", "cleanup-expired", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout) == {"expired": 1}
    assert producer.status(job_id).json["status"] == "timeout"


# -- bad input: 422 naming the field, nothing changed ------------------------------------------------

def _bad(clock) -> list[tuple[str, dict, str]]:
    now = clock()
    return [
        ("unknown shape", {"requires": {"gpu": 24}}, "requires.gpu"),
        ("not an object", {"requires": ["cuda12"]}, "requires._schema"),
        ("non-numeric minimum", {"requires": {"min": {"gpu_memory_gb": "24"}}}, "requires.min.gpu_memory_gb.value"),
        ("boolean minimum", {"requires": {"min": {"gpu_memory_gb": True}}}, "requires.min.gpu_memory_gb.value"),
        ("33 labels", {"requires": {"labels": [f"l{i}" for i in range(33)]}}, "requires.labels"),
        ("label over 64", {"requires": {"labels": ["x" * 65]}}, "requires.labels.0"),
        ("empty label", {"requires": {"labels": [""]}}, "requires.labels.0"),
        ("expires in the past", {"expires_at": to_iso(now - timedelta(seconds=1))}, "expires_at"),
        ("expires before available", {"available_at": to_iso(now + timedelta(hours=2)),
                                      "expires_at": to_iso(now + timedelta(hours=1))}, "expires_at"),
        ("naive timestamp", {"available_at": "2030-01-01T00:00:00"}, "available_at"),
        ("unknown on_lapse", {"on_lapse": "retry-forever"}, "on_lapse"),
    ]


def test_bad_routing_input_at_create_is_422_naming_the_field(producer, client, clock, service):
    for what, extra, field in _bad(clock):
        response = producer.create("audio", **extra)
        assert response.status_code == 422, (what, response.json)
        assert response.mimetype == "application/problem+json"
        assert field in response.json["errors"], (what, response.json["errors"])
    assert service.list(JobFilter(), None, 10)[0] == []  # nothing was made


@pytest.mark.parametrize("params, field", [
    ({"resources": "gpu_memory_gb:lots"}, "resources"),
    ({"resources": "gpu_memory_gb"}, "resources"),
    ({"labels": ",".join(f"l{i}" for i in range(33))}, "labels"),
    ({"labels": "x" * 65}, "labels"),
])
def test_bad_capabilities_in_a_poll_are_422_naming_the_field(params, field, worker):
    response = worker.poll("audio", **params)
    assert response.status_code == 422
    assert field in response.json["errors"]


def test_bad_capabilities_in_a_post_poll_are_422(client, keys):
    for caps, field in (({"labels": "cuda12"}, "capabilities.labels"),
                        ({"resources": {"gpu": "48"}}, "capabilities.resources.gpu.value"),
                        ({"gpus": 1}, "capabilities.gpus")):
        response = client.post(f"{J}/poll", json={"worker_id": "w", "content_types": ["audio"], "capabilities": caps},
                               headers=auth(keys["worker"]))
        assert response.status_code == 422, response.json
        assert field in response.json["errors"], response.json["errors"]


def test_bad_type_controls_are_422_naming_the_field_and_change_nothing(client, admin_headers):
    assert client.post(f"{J}/types/hologram/pause", headers=admin_headers).json["errors"] == {
        "content_type": ["must be one of: audio, video, document, image, web, youtube"]}
    for body in ({"max_processing": -1}, {"max_processing": 2.5}, {"max_processing": "3"}, {}, {"limit": 3}):
        response = client.post(f"{J}/types/video/limit", json=body, headers=admin_headers)
        assert response.status_code == 422, (body, response.json)
    stats = client.get(f"{J}/stats", headers=admin_headers).json
    assert stats["types"]["video"] == {"content_type": "video", "paused": False, "max_processing": None,
                                       "limit_source": None, "processing": 0, "updated_at": None}
    assert "hologram" not in stats["types"]


# -- pause and resume ---------------------------------------------------------------------------------

def test_pause_stops_claims_of_the_type_only_and_resume_lets_them_drain(producer, worker, client, admin_headers):
    video = [producer.create_id("video") for _ in range(3)]
    audio = producer.create_id("audio")
    running = worker.claim("video")
    response = client.post(f"{J}/types/video/pause", headers=admin_headers)
    assert response.status_code == 200
    assert response.json["paused"] is True and response.json["processing"] == 1

    assert worker.claim("video,audio")["job_id"] == audio  # other types keep flowing
    assert worker.poll("video", max_jobs=5).json["jobs"] == []
    later = producer.create_id("video")  # creates are still accepted
    assert worker.result(running["job_id"]).json["status"] == "completed"  # a running job completes

    stats = client.get(f"{J}/stats", headers=admin_headers).json
    assert stats["types"]["video"]["paused"] is True and stats["types"]["audio"]["paused"] is False

    assert client.post(f"{J}/types/video/resume", headers=admin_headers).json["paused"] is False
    drained = worker.poll("video", max_jobs=10).json["jobs"]
    assert sorted(j["job_id"] for j in drained) == sorted(video[1:] + [later])


def test_pause_is_shared_by_every_app_on_the_store_and_survives_a_restart(app, producer, worker, client,
                                                                          admin_headers, backend_config, instance_path):
    from morag_remote import create_app

    producer.create_id("video")
    client.post(f"{J}/types/video/pause", headers=admin_headers)
    restarted = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True,
                            **backend_config})
    other = WorkerActions(restarted.test_client(), worker.headers["Authorization"].split()[1], "w9")
    assert other.poll("video").json["job_id"] is None
    assert restarted.test_client().get(f"{J}/stats", headers=admin_headers).json["types"]["video"]["paused"]
    other.client.post(f"{J}/types/video/resume", headers=admin_headers)
    assert worker.claim("video")  # the first app sees the other's resume


def test_pause_in_metrics_and_cli(client, runner, admin_headers, keys):
    assert runner.invoke(args=["remote-jobs", "pause", "web"]).exit_code == 0
    samples = parse_samples(client.get("/metrics", headers=auth(keys["worker"])).get_data(as_text=True))
    assert value(samples, "morag_remote_type_paused", content_type="web") == 1
    assert value(samples, "morag_remote_type_paused", content_type="audio") == 0
    listed = runner.invoke(args=["remote-jobs", "types"]).stdout
    assert [line.split()[:2] for line in listed.splitlines() if line.startswith("web")] == [["web", "paused"]]
    stats = runner.invoke(args=["remote-jobs", "stats"]).stdout
    assert "paused: web" in stats
    resumed = runner.invoke(args=["remote-jobs", "resume", "web", "--json"])
    assert json.loads(resumed.stdout)["paused"] is False
    bad = runner.invoke(args=["remote-jobs", "pause", "hologram"])
    assert bad.exit_code == 2 and "hologram" in bad.output


# -- the limit per type -------------------------------------------------------------------------------

@pytest.fixture
def app_config(request) -> dict[str, Any]:
    return getattr(request, "param", {})


@pytest.mark.parametrize("app_config", [{"MAX_PROCESSING": {"video": 2}}], indirect=True)
def test_configured_limit_caps_processing_and_frees_a_slot_on_each_result(producer, worker, worker2, client,
                                                                          admin_headers):
    ids = [producer.create_id("video") for _ in range(4)]
    first = worker.poll("video", max_jobs=10).json["jobs"]
    assert [j["job_id"] for j in first] == ids[:2]
    assert worker2.poll("video", max_jobs=10).json["jobs"] == []
    assert client.get(f"{J}/stats", headers=admin_headers).json["types"]["video"]["limit_source"] == "config"
    worker.result(first[0]["job_id"])
    assert [j["job_id"] for j in worker2.poll("video", max_jobs=10).json["jobs"]] == [ids[2]]


@pytest.mark.parametrize("app_config", [{"MAX_PROCESSING": {"video": 1}}], indirect=True)
def test_limit_changed_at_run_time_through_the_admin_endpoint_and_back(producer, worker, client, admin_headers,
                                                                       runner, service):
    for _ in range(5):
        producer.create_id("video")
    response = client.post(f"{J}/types/video/limit", json={"max_processing": 3}, headers=admin_headers)
    assert response.status_code == 200
    assert (response.json["max_processing"], response.json["limit_source"]) == (3, "runtime")
    assert len(worker.poll("video", max_jobs=10).json["jobs"]) == 3
    client.post(f"{J}/types/video/limit", json={"max_processing": 0}, headers=admin_headers)
    assert worker.poll("video").json["jobs"] == []
    back = client.post(f"{J}/types/video/limit", json={"max_processing": None}, headers=admin_headers).json
    assert (back["max_processing"], back["limit_source"]) == (1, "config")
    assert worker.poll("video").json["jobs"] == []  # 3 processing, configured limit 1
    out = runner.invoke(args=["remote-jobs", "limit", "video", "4", "--json"])
    assert json.loads(out.stdout)["max_processing"] == 4
    assert len(worker.poll("video", max_jobs=10).json["jobs"]) == 1
    assert runner.invoke(args=["remote-jobs", "limit", "video", "-1"]).exit_code == 2
    assert service.type_states()["video"]["processing"] == 4


def test_limit_counts_across_a_poll_of_several_types_and_requirement_sets(service):
    service.set_limit("video", 2)
    for gb in (None, 8, 16):
        for _ in range(2):
            new_job(service, "video", **({} if gb is None else {"requires": {"min": {"gpu_memory_gb": gb}}}))
    new_job(service, "audio")
    got = service.poll("w", ["video", "audio"], 10, capabilities=Capabilities(resources={"gpu_memory_gb": 24}))
    assert sorted(j.content_type for j in got) == ["audio", "video", "video"]


# -- on_lapse: requeue, fail, hold ---------------------------------------------------------------------

def test_on_lapse_requeue_is_todays_behaviour(service, clock):
    job = claimed_job(service, on_lapse="requeue")
    clock.advance(lease_of(service) + 1)
    service.expire_due()
    assert (service.get(job.id).status, service.get(job.id).retry_count) == ("pending", 1)


def test_on_lapse_fail_times_the_job_out_without_a_retry(service, clock):
    job = claimed_job(service, on_lapse="fail", max_retries=5)
    clock.advance(lease_of(service) + 1)
    service.expire_due()
    stored = service.get(job.id)
    assert (stored.status, stored.retry_count) == ("timeout", 0)
    assert "on_lapse is fail" in stored.error_message


@pytest.mark.parametrize("app_config", [{"ON_LAPSE": {"default": "requeue", "web": "hold"}}], indirect=True)
def test_on_lapse_per_type_from_config_and_the_job_overrides_it(service, clock):
    held = claimed_job(service, content_type="web")
    requeued = claimed_job(service, content_type="web", worker_id="w2", on_lapse="requeue")
    audio = claimed_job(service, content_type="audio", worker_id="w3")
    clock.advance(max(lease_of(service, "web"), lease_of(service, "audio")) + 1)
    assert service.expire_due() == 3
    assert [service.get(j.id).status for j in (held, requeued, audio)] == ["held", "pending", "pending"]


def test_held_job_is_shown_everywhere_claimed_by_no_one_and_left_by_retry(producer, worker, worker2, client,
                                                                          admin_headers, clock, runner, service, keys):
    job_id = producer.create_id("audio", on_lapse="hold")
    claimed = worker.claim("audio")
    clock.advance(lease_of(service) + 1)
    assert worker2.poll("audio").json["job_id"] is None  # the poll hands the lapse on: held, not claimed
    status = producer.status(job_id).json
    assert status["status"] == "held" and "on_lapse is hold" in status["error_message"]
    assert client.get(f"{J}/stats", headers=admin_headers).json["counts"]["held"] == {"audio": 1}
    assert [j["id"] for j in client.get(f"{J}/?status=held", headers=admin_headers).json["jobs"]] == [job_id]
    assert json.loads(runner.invoke(args=["remote-jobs", "list", "--status", "held", "--json"]).stdout)["jobs"]
    samples = parse_samples(client.get("/metrics", headers=auth(keys["worker"])).get_data(as_text=True))
    assert value(samples, "morag_remote_jobs", status="held", content_type="audio") == 1
    assert value(samples, "morag_remote_lease_expiries_total", content_type="audio", outcome="held") == 1

    # the vanished worker is fenced; a heartbeat or a result is a 409 and changes nothing
    assert worker.heartbeat(job_id, lease_id=claimed["lease_id"]).status_code == 409
    assert worker.result(job_id, lease_id=claimed["lease_id"]).status_code == 409
    for _ in range(3):
        assert worker2.poll("audio").json["job_id"] is None

    assert producer.retry(job_id).json["status"] == "pending"
    assert worker2.claim("audio")["job_id"] == job_id
    assert worker.poll("audio").json["job_id"] is None  # to one worker


def test_held_job_can_be_cancelled_but_not_held_again(producer, worker, clock, service, runner):
    job_id = producer.create_id("audio", on_lapse="hold")
    worker.claim("audio")
    clock.advance(lease_of(service) + 1)
    service.expire_due()
    out = runner.invoke(args=["remote-jobs", "cancel", job_id])
    assert out.exit_code == 0 and out.stdout.strip() == f"{job_id} cancelled"
    assert producer.cancel(job_id).status_code == 409


def test_held_job_is_kept_by_cleanup_old(service, clock):
    job = claimed_job(service, on_lapse="hold")
    clock.advance(lease_of(service) + 1)
    service.expire_due()
    clock.advance(86400 * 60)
    assert service.cleanup_old(30) == 0
    assert service.get(job.id).status == "held"


# -- job.held through the outbox ---------------------------------------------------------------------

@pytest.fixture
def receiver():
    server = Receiver().start()
    yield server
    server.stop()


@pytest.mark.parametrize("app_config", [{}], indirect=True)
def test_job_held_event_is_sent_then_retry_and_the_next_outcome_send_their_own(app, receiver, producer, worker,
                                                                                clock, service):
    events = app.extensions["morag_remote.events"]
    events.settings = dataclasses.replace(events.settings, callback_url=f"{receiver.url}/morag/events", secret=SECRET)
    job_id = producer.create_id("audio", on_lapse="hold")
    worker.claim("audio")
    clock.advance(lease_of(service) + 1)
    service.expire_due()
    assert receiver.wait_for_accepted(1)
    [held] = receiver.events_of(job_id)
    assert (held["type"], held["status"]) == ("job.held", "held")
    assert "on_lapse is hold" in held["error"]
    assert producer.status(job_id).json["event_delivery"]["state"] == "delivered"

    producer.retry(job_id)
    again = worker.claim("audio")
    worker.result(again["job_id"])
    assert receiver.wait_for_accepted(2)
    assert [e["type"] for e in receiver.events_of(job_id)] == ["job.held", "job.completed"]


def test_held_event_is_reconciled_when_its_recording_was_lost(app, producer, worker, clock, service, runner,
                                                              monkeypatch):
    events = app.extensions["morag_remote.events"]
    events.settings = dataclasses.replace(events.settings, callback_url="http://127.0.0.1:9/none")
    monkeypatch.setattr(events, "job_finished", lambda job: False)  # as if the process died right after the write
    job_id = producer.create_id("audio", on_lapse="hold")
    worker.claim("audio")
    clock.advance(lease_of(service) + 1)
    service.expire_due()
    monkeypatch.undo()
    assert events.outbox.counts()["pending"] == 0
    assert events.reconcile() == 1
    state = events.delivery_state(service.get(job_id))
    assert state is not None and state["state"] == "pending"


def test_the_routing_fields_round_trip_through_get_and_export(producer, clock, runner):
    expires = clock() + timedelta(hours=1)
    job_id = producer.create_id("audio", requires=BIG, expires_at=to_iso(expires), on_lapse="fail")
    body = producer.get(job_id).json
    assert (body["requires"], body["on_lapse"]) == (BIG, "fail")
    assert body["expires_at"].startswith(to_iso(expires)[:19])
    exported = runner.invoke(args=["remote-jobs", "export"]).stdout
    [line] = [json.loads(x) for x in exported.splitlines() if x.strip()]
    assert line["requires"] == BIG and line["on_lapse"] == "fail"


def test_caller_of_a_held_job_gets_409(service, clock):
    job = claimed_job(service, on_lapse="hold")
    clock.advance(lease_of(service) + 1)
    service.expire_due()
    with pytest.raises(Exception) as caught:
        service.release(job.id, Caller(lease_id=job.lease_id))
    assert getattr(caught.value, "status_code", None) == 409


@pytest.mark.files_only
def test_a_damaged_controls_file_pauses_nothing_and_the_next_change_rewrites_it(service, log_output):
    job = new_job(service, "video")
    service.pause("video")
    path = service.store.root / "types.json"
    path.write_text('{"video": {"paused": true, "max_processing": "four"}}')
    assert [j.id for j in service.poll("w", ["video"])] == [job.id]
    assert "store.controls_unreadable" in log_output.getvalue()
    service.pause("audio")
    assert json.loads(path.read_text())["audio"]["paused"] is True


@pytest.mark.parametrize("name, value, message", [
    ("MAX_PROCESSING", {"video": -1}, "MAX_PROCESSING['video'] must be a whole number"),
    ("MAX_PROCESSING", {"video": 2.5}, "MAX_PROCESSING['video'] must be a whole number"),
    ("MAX_PROCESSING", [4], "MAX_PROCESSING must be an object"),
    ("ON_LAPSE", {"web": "retry"}, "ON_LAPSE['web'] must be requeue, fail or hold"),
])
def test_a_bad_routing_setting_refuses_to_start_naming_it(name, value, message, instance_path):
    from morag_remote import create_app

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True, name: value})
