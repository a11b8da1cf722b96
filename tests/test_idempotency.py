"""``Idempotency-Key`` on create: a retried create answers with the job it already made, across
threads, gunicorn processes and a crash between the record and the job."""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import secrets
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from support.gunicorn import gunicorn as serve, wait_for

from morag_remote import create_app, idempotency
from morag_remote.context import KEYS, SERVICE
from morag_remote.context import IDEMPOTENCY
from morag_remote.idempotency import IdempotencyRecord, fingerprint_of, key_id_of
from morag_remote.models import new_job_id, utcnow
from morag_remote.schemas import CreateJobRequest


def keyed(producer, key: str, **body: Any):
    path = producer.source("talk.mp3")
    payload = {"source_file_path": str(path), "content_type": "audio", "ingestion_task_id": "ingest-1", **body}
    return producer.client.post("/api/v1/remote-jobs/", json=payload,
                                headers={**producer.headers, "Idempotency-Key": key})


def job_count(producer) -> int:
    return len(producer.client.get("/api/v1/remote-jobs/", headers=producer.headers).json["jobs"])


def validated(app, body: dict) -> dict:
    """``body`` as the create view passes it on (defaults filled in)."""
    return CreateJobRequest(content_types=app.extensions[SERVICE].settings.content_types).load(body)


def _rows(pg_database) -> dict[str, str]:
    """``key_id -> state`` of every row of the PostgreSQL records table."""
    with pg_database.connect() as conn:
        return dict(conn.execute("SELECT key_id, state FROM idempotency_keys ORDER BY key_id").fetchall())


def test_same_key_and_body_answers_200_with_the_original_job(producer):
    first = keyed(producer, "req-1")
    again = keyed(producer, "req-1")
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json == first.json
    assert again.headers["Location"] == first.headers["Location"]
    assert job_count(producer) == 1


def test_same_key_with_a_different_body_is_422_and_makes_nothing(producer):
    keyed(producer, "req-1")
    response = keyed(producer, "req-1", priority=5)
    assert response.status_code == 422
    assert response.headers["Content-Type"] == "application/problem+json"
    assert "Idempotency-Key" in response.json["errors"]
    assert job_count(producer) == 1


def test_replay_answers_with_the_jobs_current_status(producer, worker):
    first = keyed(producer, "req-1")
    worker.claim()
    again = keyed(producer, "req-1")
    assert again.status_code == 200
    assert again.json["job_id"] == first.json["job_id"]
    assert again.json["status"] == "processing"


def test_different_keys_make_different_jobs(producer):
    assert keyed(producer, "a").json["job_id"] != keyed(producer, "b").json["job_id"]
    assert job_count(producer) == 2


def test_keys_are_scoped_to_the_api_key_that_sent_them(producer, app, client, instance_path):
    from support.actions import ProducerActions

    _, other_secret = app.extensions[KEYS].create("producer-2", "producer")
    other = ProducerActions(client, other_secret, instance_path / "sources")
    assert keyed(producer, "shared").json["job_id"] != keyed(other, "shared").json["job_id"]


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "naïve", "tab\there"])
def test_a_malformed_key_is_422_and_makes_nothing(producer, key):
    response = producer.client.post("/api/v1/remote-jobs/", headers={**producer.headers, "Idempotency-Key": key},
                                    json={"source_file_path": str(producer.source()), "content_type": "audio",
                                          "ingestion_task_id": "i"})
    assert response.status_code == 422
    assert "Idempotency-Key" in response.json["errors"]
    assert job_count(producer) == 0


def test_an_invalid_body_does_not_use_up_the_key(producer):
    assert keyed(producer, "req-1", content_type="hologram").status_code == 422
    assert keyed(producer, "req-1").status_code == 201


def test_a_refused_source_does_not_use_up_the_key(producer):
    refused = keyed(producer, "req-1", source_file_path="/etc/passwd")
    assert refused.status_code == 422
    assert keyed(producer, "req-1").status_code == 201
    assert job_count(producer) == 1


def test_a_key_is_kept_a_day_then_names_a_new_request(producer, clock, app):
    first = keyed(producer, "req-1").json["job_id"]
    clock.advance(23 * 3600)
    assert keyed(producer, "req-1").json["job_id"] == first
    clock.advance(2 * 3600)
    second = keyed(producer, "req-1")
    assert second.status_code == 201
    assert second.json["job_id"] != first


@pytest.mark.files_only
def test_expired_records_are_purged(producer, clock, app):
    keyed(producer, "old")
    records_dir = Path(app.config["JOBS_DATA_DIR"]) / "idempotency"
    assert len(list(records_dir.glob("*.json"))) == 1
    clock.advance(25 * 3600)
    creates = app.extensions[IDEMPOTENCY]
    creates._next_purge = 0.0
    keyed(producer, "new")
    assert len(list(records_dir.glob("*.json"))) == 1


@pytest.mark.postgres
def test_expired_rows_are_purged_from_the_table(producer, clock, app, pg_database):
    keyed(producer, "old")
    assert _rows(pg_database) == {key_id_of("producer-key", "old"): "done"}
    clock.advance(25 * 3600)
    app.extensions[IDEMPOTENCY]._next_purge = 0.0
    keyed(producer, "new")
    assert _rows(pg_database) == {key_id_of("producer-key", "new"): "done"}


def test_a_full_purge_batch_is_followed_by_another_at_the_next_create(producer, clock, app, monkeypatch):
    for n in range(3):
        keyed(producer, f"old-{n}")
    clock.advance(25 * 3600)
    monkeypatch.setattr(idempotency, "PURGE_BATCH", 2)
    records = app.extensions[IDEMPOTENCY].records
    app.extensions[IDEMPOTENCY]._next_purge = 0.0
    keyed(producer, "new-1")  # purges two, the batch was full: the next create purges again
    assert [records.get(key_id_of("producer-key", f"old-{n}")) is None for n in range(3)].count(True) == 2
    keyed(producer, "new-2")
    assert all(records.get(key_id_of("producer-key", f"old-{n}")) is None for n in range(3))
    assert records.get(key_id_of("producer-key", "new-1")) is not None


@pytest.mark.postgres
def test_purge_deletes_one_batch_of_expired_rows_per_call(app, pg_database):
    records = app.extensions[IDEMPOTENCY].records
    now = utcnow()
    for n in range(5):
        records.put(IdempotencyRecord(f"old-{n}", "f", new_job_id(), {}, now - timedelta(days=2), "done"))
    records.put(IdempotencyRecord("fresh", "f", new_job_id(), {}, now, "done"))
    cutoff = now - timedelta(days=1)
    assert [records.purge(cutoff, 2) for _ in range(4)] == [2, 2, 1, 0]
    assert list(_rows(pg_database)) == ["fresh"]


def test_a_key_whose_job_was_deleted_is_409(producer, admin_headers):
    job_id = keyed(producer, "req-1").json["job_id"]
    producer.client.delete(f"/api/v1/remote-jobs/{job_id}", headers=admin_headers)
    response = keyed(producer, "req-1")
    assert response.status_code == 409
    assert response.json["job_id"] == job_id


def test_eight_threads_with_one_key_make_one_job(app, producer):
    barrier = threading.Barrier(8)
    answers: list[tuple[int, str]] = []

    def create() -> None:
        client = app.test_client()
        body = {"source_file_path": str(producer.sources / "talk.mp3"), "content_type": "audio",
                "ingestion_task_id": "ingest-1"}
        barrier.wait(30)
        r = client.post("/api/v1/remote-jobs/", json=body, headers={**producer.headers, "Idempotency-Key": "k8"})
        answers.append((r.status_code, r.json["job_id"]))

    producer.source("talk.mp3")
    _run_together(create, 8)
    _assert_one_job_made(answers, 8)
    assert job_count(producer) == 1


def _run_together(target, n: int) -> None:
    """Run ``target`` in ``n`` threads (they meet at their own barrier) and wait for all of them."""
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def _assert_one_job_made(answers: list[tuple[int, str]], n: int) -> None:
    """Of ``n`` creates with one key, one made the job (201) and the rest got it back (200)."""
    assert sorted(code for code, _ in answers) == [200] * (n - 1) + [201]
    assert len({job_id for _, job_id in answers}) == 1


def test_a_file_name_postgresql_cannot_store_is_refused_there_and_leaves_the_key_free(producer, backend):
    raw = os.fsencode(producer.sources) + b"/caf\xe9.mp3"
    with open(raw, "wb") as fh:
        fh.write(b"RIFF")
    response = keyed(producer, "req-1", source_file_path=os.fsdecode(raw))
    if backend == "files":
        assert response.status_code == 201
        return
    assert response.status_code == 422
    assert "UTF-8" in response.json["detail"]  # not a 500
    assert keyed(producer, "req-1").status_code == 201
    assert job_count(producer) == 1


# -- the PostgreSQL records' lock ---------------------------------------------------------------------

@pytest.mark.postgres
def test_the_key_lock_is_held_for_the_block_and_released_when_it_raises(app, pg_database):
    records = app.extensions[IDEMPOTENCY].records
    lock_id = records.lock_id("k")
    with pg_database.connect() as other_host:
        with pytest.raises(RuntimeError):
            with records.locked("k"):
                assert other_host.execute("SELECT pg_try_advisory_lock(%s)", (lock_id,)).fetchone()[0] is False
                raise RuntimeError("the block failed")
        assert other_host.execute("SELECT pg_try_advisory_lock(%s)", (lock_id,)).fetchone()[0] is True


@contextlib.contextmanager
def _key_held(records, pg_database, key_id: str, holder: str):
    """The key held by another host (a session of its own) or by another thread of this process."""
    if holder == "another host":
        with pg_database.connect() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (records.lock_id(key_id),))
            yield
        return
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with records.locked(key_id):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(30)
        yield
    finally:
        release.set()
        thread.join(30)


@pytest.mark.postgres
@pytest.mark.parametrize("holder", ["another host", "another thread"])
def test_a_key_held_past_the_wait_answers_409_and_makes_nothing(app, producer, pg_database, holder):
    records = app.extensions[IDEMPOTENCY].records
    records.lock_wait_s = 0.2
    with _key_held(records, pg_database, key_id_of("producer-key", "req-1"), holder):
        refused = keyed(producer, "req-1")
    assert refused.status_code == 409, refused.json
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert "Idempotency-Key" in refused.json["errors"]
    assert job_count(producer) == 0
    assert keyed(producer, "req-1").status_code == 201


def _advisory_waits(conn, application_name: str) -> int:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                        "AND wait_event_type = 'Lock' AND wait_event = 'advisory'", (application_name,)).fetchone()[0]


@pytest.mark.postgres
def test_threads_waiting_for_a_key_hold_no_connection(pg_url, pg_database, instance_path):
    """Six threads of a process with two connections wait for a key another host holds: one waits in
    PostgreSQL, the others in the process; when the key is free all six are answered, one job made."""
    name = f"mr-idem-{secrets.token_hex(3)}"
    app = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True,
                      "DATABASE_URL": f"{pg_url}&application_name={name}", "DATABASE_POOL_SIZE": 2})
    creates = app.extensions[IDEMPOTENCY]
    (instance_path / "sources" / "talk.mp3").write_bytes(b"RIFF")
    request = validated(app, {"source_file_path": str(instance_path / "sources" / "talk.mp3"),
                              "content_type": "audio", "ingestion_task_id": "ingest-1"})
    lock_id = creates.records.lock_id(key_id_of("producer-key", "busy"))
    answers: list[Any] = []

    def create() -> None:
        try:
            answers.append(creates.create("producer-key", "busy", request))
        except Exception as exc:  # a 503 for want of a connection: reported by the assertion below
            answers.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    try:
        with pg_database.connect() as other_host:
            other_host.execute("SELECT pg_advisory_lock(%s)", (lock_id,))
            for t in threads:
                t.start()
            wait_for(lambda: _advisory_waits(other_host, name), 30, "a thread to wait for the key in PostgreSQL")
            waiting_in_postgresql = _advisory_waits(other_host, name)
        for t in threads:
            t.join(60)
    finally:
        creates.records.db.close()
    assert waiting_in_postgresql == 1
    assert sorted(created for _, created in answers) == [False] * 5 + [True], answers
    assert len({job.id for job, _ in answers}) == 1


# -- a crash between the record and the job ---------------------------------------------------------

def _reserve_and_die(instance_path: str, backend_config: dict, key: str, body: dict, create_job: bool,
                     producer_name: str) -> None:
    """Child: take the key as a create would, then die before (or right after) making the job."""
    app = create_app({"TESTING": True, "INSTANCE_PATH": instance_path, "LOG_JSON": True, **backend_config})
    creates = app.extensions[IDEMPOTENCY]
    service = app.extensions[SERVICE]
    request = validated(app, body)
    record = IdempotencyRecord(key_id_of(producer_name, key), fingerprint_of(request), new_job_id(), request,
                               utcnow())
    creates.records.put(record)
    if create_job:
        service.create(**request, job_id=record.job_id)
    os._exit(0)


@pytest.mark.parametrize("job_made", [False, True])
def test_a_create_that_died_after_taking_the_key_is_completed_by_the_retry(producer, instance_path, backend_config,
                                                                          job_made):
    body = {"source_file_path": str(producer.source("talk.mp3")), "content_type": "audio",
            "ingestion_task_id": "ingest-1"}
    child = multiprocessing.get_context("fork").Process(
        target=_reserve_and_die, args=(str(instance_path), backend_config, "req-1", body, job_made, "producer-key"))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    assert job_count(producer) == (1 if job_made else 0)
    retried = keyed(producer, "req-1")
    assert retried.status_code == (200 if job_made else 201)
    assert keyed(producer, "req-1").json["job_id"] == retried.json["job_id"]
    assert job_count(producer) == 1


@pytest.mark.postgres
@pytest.mark.parametrize("job_made", [False, True])
def test_a_reserved_row_left_in_the_table_is_completed_by_the_retry(producer, app, service, pg_database, job_made):
    request = validated(app, {"source_file_path": str(producer.source("talk.mp3")), "content_type": "audio",
                              "ingestion_task_id": "ingest-1"})
    key_id, job_id = key_id_of("producer-key", "req-1"), new_job_id()
    with pg_database.connect() as conn:
        conn.execute("INSERT INTO idempotency_keys (key_id, fingerprint, job_id, request, created_at, state) "
                     "VALUES (%s, %s, %s, %s::jsonb, now(), 'reserved')",
                     (key_id, fingerprint_of(request), job_id, json.dumps(request)))
    if job_made:
        service.create(**request, job_id=job_id)
    retried = keyed(producer, "req-1")
    assert (retried.status_code, retried.json["job_id"]) == (200 if job_made else 201, job_id)
    assert _rows(pg_database) == {key_id: "done"}
    assert keyed(producer, "req-1").status_code == 200
    assert job_count(producer) == 1


# -- across processes --------------------------------------------------------------------------------

def _create_in_threads(instance_path: str, backend_config: dict, body: dict, barrier, results) -> None:
    """Child process: two threads race to create with one key, as two requests of a gunicorn worker."""
    app = create_app({"TESTING": True, "INSTANCE_PATH": instance_path, "LOG_JSON": True, **backend_config})
    creates = app.extensions[IDEMPOTENCY]
    request = validated(app, body)

    def create() -> None:
        barrier.wait(60)
        job, created = creates.create("producer-key", "cross-process", request)
        results.put((job.id, created))

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


@pytest.mark.slow
def test_four_processes_of_two_threads_with_one_key_make_one_job(producer, instance_path, backend_config):
    ctx = multiprocessing.get_context("fork")
    body = {"source_file_path": str(producer.source("talk.mp3")), "content_type": "audio",
            "ingestion_task_id": "ingest-1"}
    barrier, results = ctx.Barrier(8), ctx.Queue()
    children = [ctx.Process(target=_create_in_threads, args=(str(instance_path), backend_config, body, barrier,
                                                              results))
                for _ in range(4)]
    for child in children:
        child.start()
    answers = [results.get(timeout=60) for _ in range(8)]
    for child in children:
        child.join(60)
    assert len({job_id for job_id, _ in answers}) == 1
    assert sorted(created for _, created in answers) == [False] * 7 + [True]
    assert job_count(producer) == 1


# -- across gunicorn processes and hosts -----------------------------------------------------------------

def _host_env(backend_config: dict) -> dict[str, str]:
    """A host on the test's database with two connections per process: a request waiting for a key
    another holds must not take one (three waiting would leave the key's holder none)."""
    if not backend_config:
        return {}
    return {"MORAG_REMOTE_DATABASE_URL": backend_config["DATABASE_URL"], "MORAG_REMOTE_DATABASE_POOL_SIZE": "2"}


@pytest.fixture
def gunicorn(instance_path, backend_config):
    """Two worker processes of four threads, each taking at most four connections: eight requests at
    once reach both processes."""
    with serve(instance_path, env=_host_env(backend_config)) as base:
        yield base


def _create_together(bases: list[str], producer_key: str, source: Path, key: str) -> list[tuple[int, str]]:
    """Eight threads create with one key at once, thread ``i`` through ``bases[i % len(bases)]``."""
    body = {"source_file_path": str(source), "content_type": "audio", "ingestion_task_id": "ingest-1"}
    headers = {"Authorization": f"Bearer {producer_key}", "Idempotency-Key": key}
    barrier = threading.Barrier(8)
    answers: list[tuple[int, str]] = []
    turns = iter(range(8))

    def create() -> None:
        base = bases[next(turns) % len(bases)]
        barrier.wait(30)
        r = requests.post(f"{base}/api/v1/remote-jobs/", json=body, headers=headers, timeout=30)
        answers.append((r.status_code, r.json().get("job_id")))

    _run_together(create, 8)
    return answers


def _listed(base: str, producer_key: str) -> list[str]:
    r = requests.get(f"{base}/api/v1/remote-jobs/", headers={"Authorization": f"Bearer {producer_key}"}, timeout=10)
    return [j["id"] for j in r.json()["jobs"]]


@pytest.mark.slow
def test_eight_threads_against_two_gunicorn_processes_with_one_key_make_one_job(gunicorn, app, keys, producer):
    answers = _create_together([gunicorn], keys["producer"], producer.source("talk.mp3"), "gunicorn-8")
    _assert_one_job_made(answers, 8)
    assert _listed(gunicorn, keys["producer"]) == [answers[0][1]]


@pytest.mark.postgres
@pytest.mark.slow
def test_eight_threads_over_two_hosts_sharing_one_database_with_one_key_make_one_job(app, keys, producer,
                                                                                     backend_config, tmp_path):
    """Each host has its own instance folder: only the database is shared."""
    source = producer.source("talk.mp3")
    env = {**_host_env(backend_config), "MORAG_REMOTE_SOURCE_ROOTS": json.dumps([str(producer.sources)])}
    with serve(tmp_path / "host-a", env=env) as host_a, \
            serve(tmp_path / "host-b", env=env) as host_b:
        answers = _create_together([host_a, host_b], keys["producer"], source, "two-hosts")
        _assert_one_job_made(answers, 8)
        assert _listed(host_a, keys["producer"]) == _listed(host_b, keys["producer"]) == [answers[0][1]]
