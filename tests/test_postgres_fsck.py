"""``remote-jobs fsck`` on PostgreSQL: what can drift between a row's columns and its document."""
from __future__ import annotations

import json

import pytest
from psycopg.types.json import Jsonb

from morag_remote.context import SERVICE

pytestmark = pytest.mark.postgres


@pytest.fixture
def backend() -> str:
    return "postgres"


@pytest.fixture
def backend_config(pg_url) -> dict:
    return {"DATABASE_URL": pg_url}


@pytest.fixture
def app_config() -> dict:
    """A receiver that refuses at once (nothing listens on the discard port): events stay pending."""
    return {"CALLBACK_URL": "http://127.0.0.1:9/hook"}


def _create(app, instance_path, content_type="audio"):
    source = instance_path / "sources" / "a.mp3"
    source.write_bytes(b"a")
    return app.extensions[SERVICE].create(source_file_path=str(source), content_type=content_type,
                                          ingestion_task_id="t")


def _fsck(app, *args):
    out = app.test_cli_runner().invoke(args=["remote-jobs", "fsck", "--json", *args])
    return out.exit_code, json.loads(out.output)


def test_a_clean_database_has_no_findings(app, instance_path):
    _create(app, instance_path)
    assert _fsck(app) == (0, [])


def test_a_column_that_disagrees_with_the_document_is_found_and_rewritten(app, instance_path, pg_database):
    job = _create(app, instance_path)
    with pg_database.connect() as conn:
        conn.execute("UPDATE remote_jobs SET status = 'failed', priority = 7 WHERE id = %s", (job.id,))
    code, findings = _fsck(app)
    assert code == 1 and [f["kind"] for f in findings] == ["drift"]
    assert "status" in findings[0]["detail"] and "priority" in findings[0]["detail"] and not findings[0]["repaired"]
    code, findings = _fsck(app, "--repair")
    assert code == 0 and findings[0]["repaired"]
    assert _fsck(app) == (0, [])
    service = app.extensions[SERVICE]
    assert [j.id for j in service.poll("w1", ["audio"])] == [job.id]  # claimable again: the status column is back


def test_a_processing_job_without_a_lease_is_lapsed_by_the_repair(app, instance_path, pg_database):
    job = _create(app, instance_path)
    service = app.extensions[SERVICE]
    claimed = service.poll("w1", ["audio"])[0]
    doc = claimed.to_dict()
    doc["lease_id"] = None
    with pg_database.connect() as conn:
        conn.execute("UPDATE remote_jobs SET doc = %s WHERE id = %s", (Jsonb(doc), job.id))
    code, findings = _fsck(app)
    assert code == 1 and [f["kind"] for f in findings] == ["lease"]
    code, findings = _fsck(app, "--repair")
    assert code == 0 and findings[0]["repaired"]
    assert service.expire_due() == 1
    again = service.get(job.id)
    assert again.status == "pending" and again.retry_count == 1


def test_an_unreadable_document_is_reported_and_left_alone(app, instance_path, pg_database):
    job = _create(app, instance_path)
    with pg_database.connect() as conn:
        conn.execute("UPDATE remote_jobs SET doc = %s WHERE id = %s", (Jsonb({"id": 1}), job.id))
    code, findings = _fsck(app, "--repair")
    assert code == 1 and [(f["kind"], f["repaired"]) for f in findings] == [("corrupt", False)]


def test_an_event_row_whose_state_disagrees_with_its_document_is_repaired(app, instance_path, pg_database):
    service = app.extensions[SERVICE]
    job = _create(app, instance_path)
    service.cancel(job.id)  # a terminal state: its completion event is recorded
    with pg_database.connect() as conn:
        assert conn.execute("SELECT count(*) FROM event_outbox WHERE state = 'pending'").fetchone() == (1,)
        conn.execute("UPDATE event_outbox SET state = 'delivered', delivered_at = now()")
    code, findings = _fsck(app)
    assert code == 1 and {f["kind"] for f in findings} == {"event"}
    code, findings = _fsck(app, "--repair")
    assert code == 0 and all(f["repaired"] for f in findings)
    assert _fsck(app) == (0, [])
