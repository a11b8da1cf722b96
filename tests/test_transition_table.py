"""The transition table: every status x every action, legal and illegal, through the table, through
the service (a real store, a fake clock) and, for the ones callers trigger, through the API."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from support.jobs import directories_of, disk_snapshot, job_in, lease_of
from morag_remote.exceptions import InvalidTransition
from morag_remote.models import TRANSITIONS, Action, RemoteJob, Status, next_status
from morag_remote.service import Caller, JobService

PAIRS = [(status, action) for status in Status for action in Action]
LEGAL = [pair for pair in PAIRS if pair in TRANSITIONS]
ILLEGAL = [pair for pair in PAIRS if pair not in TRANSITIONS]
CALLER_ACTIONS = {Action.HEARTBEAT, Action.COMPLETE, Action.FAIL_RETRY, Action.FAIL, Action.CANCEL, Action.RETRY,
                  Action.RELEASE}
PENDING_TTL = 10.0


def _id(pair) -> str:
    return f"{pair[0].value}-{pair[1].value}"


# -- the table ---------------------------------------------------------------------------------

@pytest.mark.parametrize("status, action", LEGAL, ids=map(_id, LEGAL))
def test_table_legal_transition_leads_to_its_status(status, action):
    assert next_status(status, action) is TRANSITIONS[(status, action)]
    assert next_status(status.value, action) is TRANSITIONS[(status, action)]


@pytest.mark.parametrize("status, action", ILLEGAL, ids=map(_id, ILLEGAL))
def test_table_illegal_transition_raises_invalid_transition_naming_both(status, action):
    with pytest.raises(InvalidTransition) as caught:
        next_status(status, action)
    assert caught.value.status_code == 409
    assert status.value in caught.value.detail
    assert action.value.replace("_", " ") in caught.value.detail
    assert caught.value.extra == {"job_status": status.value, "action": action.value}


def test_table_terminal_statuses_leave_only_by_retry():
    for (status, action), _ in TRANSITIONS.items():
        if status.is_terminal:
            assert action is Action.RETRY


def test_table_every_status_is_reachable():
    assert set(TRANSITIONS.values()) == set(Status)


def test_table_retry_reopens_exactly_failed_timeout_cancelled_and_held_into_pending():
    reopened = {s for (s, a), target in TRANSITIONS.items() if a is Action.RETRY and target is Status.PENDING}
    assert reopened == {Status.FAILED, Status.TIMEOUT, Status.CANCELLED, Status.HELD}


def test_table_held_is_not_terminal_and_leaves_only_by_retry_or_cancel():
    assert not Status.HELD.is_terminal and Status.HELD.is_announced
    assert {a for (s, a) in TRANSITIONS if s is Status.HELD} == {Action.RETRY, Action.CANCEL}
    assert {s for (s, a), target in TRANSITIONS.items() if target is Status.HELD} == {Status.PROCESSING}
    assert next_status(Status.PROCESSING, Action.LAPSE_HOLD) is Status.HELD


# -- the service: each pair acted out on a real store -------------------------------------------

def _act(service: JobService, clock, job: RemoteJob, action: Action) -> RemoteJob | None:
    """Perform ``action`` on ``job`` the way it happens in production; None when nothing happened."""
    caller = Caller(lease_id=job.lease_id)
    if action is Action.CLAIM:
        got = service.poll("w-next", [job.content_type])
        return got[0] if got else None
    if action is Action.HEARTBEAT:
        return service.heartbeat(job.id, caller, progress=0.5, message="half way")
    if action is Action.COMPLETE:
        return service.submit_result(job.id, caller, success=True, content="a late transcript").job
    if action is Action.FAIL_RETRY:
        return service.submit_result(job.id, caller, success=False, error_message="GPU out of memory").job
    if action is Action.FAIL:
        return service.submit_result(job.id, caller, success=False, error_message="corrupt media",
                                     retryable=False).job
    if action in (Action.LAPSE_RETRY, Action.LAPSE, Action.LAPSE_HOLD):
        clock.advance(lease_of(service) + 1)
        return service.get(job.id) if service.expire_due() else None
    if action is Action.EXPIRE:
        service.settings = dataclasses.replace(service.settings, pending_ttl_seconds=PENDING_TTL)
        clock.advance(PENDING_TTL + 1)
        return service.get(job.id) if service.expire_due() else None
    if action is Action.CANCEL:
        return service.cancel(job.id)
    if action is Action.RELEASE:
        return service.release(job.id, caller)
    assert action is Action.RETRY
    return service.retry(job.id)


def _setup(service: JobService, clock, status: Status, action: Action) -> RemoteJob:
    # A lease that lapses goes to timeout only when no retry is left, to held only when on_lapse is hold.
    extra = {"on_lapse": "hold"} if action is Action.LAPSE_HOLD else {}
    return job_in(service, clock, status, max_retries=0 if action is Action.LAPSE else 3, **extra)


@pytest.mark.files_only
@pytest.mark.parametrize("status, action", LEGAL, ids=map(_id, LEGAL))
def test_service_legal_transition_moves_the_job_to_its_one_new_directory(service, clock, status, action):
    job = _setup(service, clock, status, action)
    assert job.status == status.value

    after = _act(service, clock, job, action)

    expected = TRANSITIONS[(status, action)]
    assert after is not None
    assert after.status == expected.value
    assert service.get(job.id).status == expected.value
    assert directories_of(Path(service.store.root), job.id) == [expected.value]
    assert service.get(job.id).version > job.version


@pytest.mark.files_only
@pytest.mark.parametrize("status, action", ILLEGAL, ids=map(_id, ILLEGAL))
def test_service_illegal_transition_is_refused_and_changes_nothing_on_disk(service, clock, status, action):
    job = _setup(service, clock, status, action)
    root = Path(service.store.root)
    before = disk_snapshot(root)

    if action in CALLER_ACTIONS:
        with pytest.raises(InvalidTransition) as caught:
            _act(service, clock, job, action)
        assert caught.value.status_code == 409
        assert status.value in caught.value.detail
    else:  # claims and time-driven actions skip a job they do not apply to
        assert _act(service, clock, job, action) is None

    assert disk_snapshot(root) == before
    assert service.get(job.id).status == status.value


# -- the API: the transitions callers trigger -------------------------------------------------

def _problem(response, status: int = 409) -> dict:
    assert response.status_code == status, response.json
    assert response.mimetype == "application/problem+json"
    return response.json


def test_api_cancel_pending_job_answers_200_cancelled(producer):
    job_id = producer.create_id()
    response = producer.cancel(job_id)
    assert response.status_code == 200
    assert response.json["status"] == "cancelled"
    assert producer.status(job_id).json["status"] == "cancelled"
    again = producer.cancel(job_id)  # a second cancel is an illegal one
    assert again.status_code == 409
    assert again.content_type == "application/problem+json"


def test_api_cancel_processing_job_answers_200_cancelled(producer, worker):
    job_id = producer.create_id()
    worker.claim()
    assert producer.cancel(job_id).json["status"] == "cancelled"


@pytest.mark.files_only
def test_api_cancel_completed_job_is_409_and_keeps_the_result(producer, worker, service):
    job_id = producer.create_id()
    worker.claim()
    assert worker.result(job_id).status_code == 200
    before = disk_snapshot(Path(service.store.root))

    body = _problem(producer.cancel(job_id))

    assert body["title"] == "Invalid state transition"
    assert body["detail"] == "cannot cancel a job that is completed"
    assert body["job_status"] == "completed"
    assert body["action"] == "cancel"
    assert disk_snapshot(Path(service.store.root)) == before


@pytest.mark.files_only
def test_api_retry_pending_job_is_409(producer, service):
    job_id = producer.create_id()
    before = disk_snapshot(Path(service.store.root))
    body = _problem(producer.retry(job_id))
    assert body["detail"] == "cannot retry a job that is pending"
    assert disk_snapshot(Path(service.store.root)) == before


def test_api_retry_cancelled_job_puts_it_back_in_the_queue(producer, worker):
    job_id = producer.create_id()
    producer.cancel(job_id)
    response = producer.retry(job_id)
    assert response.status_code == 200
    assert response.json["status"] == "pending"
    assert worker.claim()["job_id"] == job_id


def _stored(service, backend: str):
    """What the store holds: every file's bytes on the file store, every job's version on PostgreSQL."""
    if backend == "files":
        return disk_snapshot(Path(service.store.root))
    return sorted((job.id, job.version) for job in service.store.iter_all())


def test_api_heartbeat_on_cancelled_job_is_409_telling_the_worker_to_stop(producer, worker, service, backend):
    job_id = producer.create_id()
    claimed = worker.claim()
    producer.cancel(job_id)
    before = _stored(service, backend)

    body = _problem(worker.heartbeat(job_id, lease_id=claimed["lease_id"], progress=0.3))

    assert "cancelled" in body["detail"]
    assert "stop" in body["detail"]
    without_lease = _problem(worker.heartbeat(job_id))  # the seed worker sends no lease id
    assert "cancelled" in without_lease["detail"]
    assert _stored(service, backend) == before


@pytest.mark.files_only
def test_api_result_for_cancelled_job_is_409_and_changes_nothing(producer, worker, service):
    job_id = producer.create_id()
    claimed = worker.claim()
    producer.cancel(job_id)
    before = disk_snapshot(Path(service.store.root))

    body = _problem(worker.result(job_id, lease_id=claimed["lease_id"]))

    assert body["detail"] == "cannot complete a job that is cancelled"
    assert disk_snapshot(Path(service.store.root)) == before


@pytest.mark.files_only
def test_api_different_result_for_completed_job_is_409_and_keeps_the_first(producer, worker, service):
    job_id = producer.create_id()
    worker.claim()
    worker.result(job_id, content="first")
    before = disk_snapshot(Path(service.store.root))

    body = _problem(worker.result(job_id, success=False, error_message="late failure"))

    assert body["detail"] == "cannot fail a job that is completed"
    assert disk_snapshot(Path(service.store.root)) == before
    assert producer.get(job_id).json["result_data"]["content"] == "first"


def test_api_heartbeat_on_pending_job_is_409(producer, worker):
    job_id = producer.create_id()
    body = _problem(worker.heartbeat(job_id))
    assert body["detail"] == "cannot heartbeat a job that is pending"


def test_api_result_for_pending_job_is_409(producer, worker):
    job_id = producer.create_id()
    body = _problem(worker.result(job_id))
    assert body["detail"] == "cannot complete a job that is pending"


def test_api_transition_on_unknown_job_is_404(producer, worker):
    unknown = "0190a0a0-0000-7000-8000-000000000000"
    assert _problem(producer.cancel(unknown), 404)["title"] == "Job not found"
    assert _problem(worker.heartbeat(unknown), 404)["title"] == "Job not found"
    assert _problem(worker.result(unknown), 404)["title"] == "Job not found"
