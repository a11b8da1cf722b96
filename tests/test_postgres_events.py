"""Completion events across API hosts sharing one database: an event recorded by one host's request
is delivered, exactly once, by another host's ``remote-jobs deliver``."""
from __future__ import annotations

import json
import secrets

import pytest
import requests

from support import postgres as pg_testing
from morag_remote.store.postgres.keys import PostgresKeyStore
from morag_remote.store.postgres.db import database
from test_events import SECRET, Receiver

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture
def receiver():
    r = Receiver().start()
    r.stop()  # its port is known; nothing listens on it until the test starts it again
    yield r
    r.stop()


def test_an_event_recorded_through_host_a_is_delivered_once_by_host_b(pg_database, tmp_path, receiver):
    pg_database.truncate()
    keys = PostgresKeyStore(database(pg_database.url))
    producer = {"Authorization": f"Bearer {keys.create('producer', 'producer')[1]}"}
    worker = {"Authorization": f"Bearer {keys.create('worker', 'worker')[1]}"}
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "talk.mp3").write_bytes(b"audio")
    env = {"MORAG_REMOTE_CALLBACK_URL": f"{receiver.url}/morag/events", "MORAG_REMOTE_CALLBACK_SECRET": SECRET,
           # a failed attempt waits an hour: host A's own retries after its requests stay out of the way
           "MORAG_REMOTE_CALLBACK_RETRY_SECONDS": "3600"}
    secret = secrets.token_hex(32)
    hosts = [pg_testing.Host(name, pg_database.url, str(tmp_path / name), str(sources), secret, env=env)
             for name in "ab"]
    try:
        for host in hosts:
            host.wait_ready()
        a, b = (host.base for host in hosts)
        job_id = requests.post(f"{a}/api/v1/remote-jobs/", headers=producer, timeout=10, json={
            "source_file_path": str(sources / "talk.mp3"), "content_type": "audio",
            "ingestion_task_id": "ingest-9"}).json()["job_id"]
        claimed = requests.get(f"{a}/api/v1/remote-jobs/poll", headers=worker, timeout=10,
                               params={"worker_id": "w1", "content_types": "audio"}).json()
        assert claimed["job_id"] == job_id
        result = requests.put(f"{a}/api/v1/remote-jobs/{job_id}/result", headers=worker, timeout=30,
                              json={"success": True, "content": "text", "lease_id": claimed["jobs"][0]["lease_id"]})
        assert result.json() == {"status": "completed", "ingestion_continued": False}  # the receiver is down
        seen_by_b = requests.get(f"{b}/api/v1/remote-jobs/{job_id}", headers=producer, timeout=10).json()
        assert seen_by_b["event_delivery"]["state"] == "retrying"
        assert seen_by_b["event_delivery"]["attempts"] == 1

        receiver.start()  # back on the same port
        run_b = hosts[1].cli("remote-jobs", "deliver", "--json")
        assert run_b.returncode == 0, run_b.stderr
        assert json.loads(run_b.stdout)["delivered"] == 1
        run_a = hosts[0].cli("remote-jobs", "deliver", "--json")
        assert json.loads(run_a.stdout) == {"delivered": 0, "failed": 0, "reconciled": 0, "purged": 0,
                                            "pending": 0}

        assert len(receiver.requests) == 1 and receiver.requests[0]["verified"]
        [event] = receiver.accepted.values()
        assert (event["job_id"], event["type"], event["ingestion_task_id"]) == (job_id, "job.completed", "ingest-9")
        state = requests.get(f"{a}/api/v1/remote-jobs/{job_id}", headers=producer, timeout=10).json()
        assert state["event_delivery"]["state"] == "delivered"
        assert state["event_delivery"]["event_id"] == event["event_id"]
    finally:
        for host in hosts:
            host.stop()
