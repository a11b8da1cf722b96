"""``remote-jobs export`` / ``import``: JSON lines that move a store between backends, idempotently."""
from __future__ import annotations

import io
import json

import pytest

from morag_remote import create_app
from morag_remote.context import KEYS, SERVICE
from morag_remote.models import RemoteJob
from morag_remote.store.files.jobs import FileJobStore
from morag_remote.transfer import export_jobs, import_jobs
from test_store_contract import NOW, claim_as, finish, job


@pytest.fixture
def target(backend, tmp_path, request):
    """The store an export is imported into (each backend in turn)."""
    if backend == "files":
        return FileJobStore(tmp_path / "target")
    from morag_remote.store.postgres.db import database
    from morag_remote.store.postgres.jobs import PostgresJobStore

    return PostgresJobStore(database(request.getfixturevalue("pg_url")))


@pytest.fixture
def source(tmp_path) -> FileJobStore:
    store = FileJobStore(tmp_path / "source")
    done = store.create(job())
    store.update(done.id, claim_as("w1"))
    store.update(done.id, finish("completed", NOW))
    store.create(job("video", priority=4))
    return store


def _export(store) -> str:
    out = io.StringIO()
    export_jobs(store, out)
    return out.getvalue()


def test_import_of_an_export_reproduces_every_job(source, target):
    report = import_jobs(target, _export(source).splitlines())
    assert report.as_dict() == {"created": 2, "updated": 0, "unchanged": 0, "kept": 0, "invalid": 0}
    assert sorted(j.to_dict()["id"] for j in target.iter_all()) == sorted(j.id for j in source.iter_all())
    for original in source.iter_all():
        assert target.get(original.id).to_dict() == original.to_dict()


def test_importing_the_same_export_twice_changes_nothing(source, target):
    lines = _export(source).splitlines()
    import_jobs(target, lines)
    before = {j.id: j.to_dict() for j in target.iter_all()}
    assert import_jobs(target, lines).as_dict()["unchanged"] == 2
    assert {j.id: j.to_dict() for j in target.iter_all()} == before


def test_a_newer_export_updates_and_an_older_one_does_not_undo(source, target):
    old_lines = _export(source).splitlines()
    import_jobs(target, old_lines)
    pending = next(j for j in source.iter_all() if j.status == "pending")
    source.update(pending.id, claim_as("w9"))
    report = import_jobs(target, _export(source).splitlines())
    assert (report.updated, report.unchanged) == (1, 1)
    assert target.get(pending.id).worker_id == "w9"
    assert import_jobs(target, old_lines).kept == 1  # the older copy does not replace the newer one
    assert target.get(pending.id).status == "processing"


@pytest.mark.parametrize("line, reason", [
    ("not json", "not a job"),
    ("[1, 2]", "not a JSON object"),
    ('{"id": "x"}', "content_type is missing"),
    (json.dumps(job().to_dict() | {"id": "../../etc/passwd"}), "id must be"),
    (json.dumps(job().to_dict() | {"status": "lost"}), "not a job"),
    (json.dumps(job().to_dict() | {"priority": "high"}), "priority must be an integer"),
    (json.dumps(job().to_dict() | {"task_options": []}), "task_options must be an object"),
    (json.dumps(job().to_dict() | {"id": "\u00e91"}), "id must be"),  # no store can name it
    (json.dumps(job().to_dict()).replace('"priority": 0', '"priority": NaN'), "NaN is not valid JSON"),
    (json.dumps(job().to_dict() | {"task_options": {"x": 1}}).replace('"x": 1}', '"x": Infinity}'), "Infinity"),
    (json.dumps(job().to_dict() | {"priority": 2**31}), "at most 32 bits"),
    (json.dumps(job().to_dict() | {"version": 10**20}), "at most 32 bits"),
    (json.dumps(job().to_dict() | {"created_at": "0001-01-01T00:00:00+01:00"}), "not a job"),
    (json.dumps(job().to_dict() | {"status": "completed", "result_data": {"content": 5}}), "content is text"),
    (json.dumps(job().to_dict() | {"ingestion_task_id": "a\x00b"}), "NUL"),
    (json.dumps(job().to_dict() | {"task_options": {"k\x00": 1}}), "NUL"),
    (json.dumps(job().to_dict() | {"ingestion_task_id": "x" * 8001}), "longer than 128"),
    (json.dumps(job().to_dict() | {"task_options": {"x": "X"}}).replace('"X"', "[" * 100_000 + "]" * 100_000),
     "nested too deeply"),
    (json.dumps(job().to_dict() | {"task_options": {"x": "X"}}).replace('"X"', "[" * 70 + "]" * 70),
     "nested deeper than 64 levels"),
])
def test_a_bad_line_is_reported_by_number_and_skipped(target, line, reason):
    good = json.dumps(job().to_dict())
    report = import_jobs(target, [good, line, ""])
    assert report.created == 1
    assert len(report.errors) == 1 and report.errors[0].startswith("line 2:") and reason in report.errors[0]


def test_a_line_that_is_not_utf8_is_reported_and_the_next_imported(target):
    good = json.dumps(job().to_dict()).encode()
    report = import_jobs(target, [b'{"id": "\xff\xfe"}\n', good])
    assert report.created == 1 and report.errors == ["line 1: not UTF-8 text"]


def test_a_job_the_store_cannot_hold_is_reported_and_the_rest_imported(target, backend):
    """A file name that is not UTF-8 is a job on the files, and text PostgreSQL cannot store."""
    odd = json.dumps(job().to_dict() | {"source_file_path": "/sources/caf\udce9.bin"})
    report = import_jobs(target, [odd, json.dumps(job().to_dict())])
    if backend == "files":
        assert report.created == 2 and report.errors == []
    else:
        assert report.created == 1 and report.errors[0].startswith("line 1: not stored (")


def _app(instance, **config):
    (instance / "sources").mkdir(parents=True, exist_ok=True)
    return create_app({"TESTING": True, "INSTANCE_PATH": str(instance), "LOG_JSON": True, **config})


@pytest.mark.postgres
def test_files_to_postgres_and_back_through_the_cli_keeps_jobs_states_and_results(tmp_path, pg_url):
    files_app = _app(tmp_path / "files")
    svc = files_app.extensions[SERVICE]
    source = tmp_path / "files" / "sources" / "a.mp3"
    source.write_bytes(b"a")
    done = svc.create(source_file_path=str(source), content_type="audio", ingestion_task_id="t1")
    failed = svc.create(source_file_path=str(source), content_type="audio", ingestion_task_id="t2", max_retries=0)
    waiting = svc.create(source_file_path=str(source), content_type="video", ingestion_task_id="t3", priority=2)
    for claimed in svc.poll("w1", ["audio"], max_jobs=2):
        if claimed.id == done.id:
            svc.submit_result(done.id, _lease(claimed), success=True, content="hello", metadata={"k": 1},
                              processing_time=2.0)
        else:
            svc.submit_result(failed.id, _lease(claimed), success=False, error_message="decoder crashed")
    export_file = tmp_path / "jobs.jsonl"
    out = files_app.test_cli_runner().invoke(args=["remote-jobs", "export", "--output", str(export_file)])
    assert out.exit_code == 0, out.output
    assert len(export_file.read_text().splitlines()) == 3

    pg_app = _app(tmp_path / "pg", DATABASE_URL=pg_url)
    out = pg_app.test_cli_runner().invoke(args=["remote-jobs", "import", "--input", str(export_file), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.splitlines()[-1])["created"] == 3

    key = pg_app.extensions[KEYS].create("p", "producer")[1]
    client = pg_app.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    got = {j: client.get(f"/api/v1/remote-jobs/{j}", headers=headers).json for j in (done.id, failed.id, waiting.id)}
    assert got[done.id]["status"] == "completed"
    assert got[done.id]["result_data"] == {"content": "hello", "metadata": {"k": 1}, "processing_time": 2.0}
    assert got[failed.id]["status"] == "failed" and got[failed.id]["error_message"] == "decoder crashed"
    assert got[waiting.id]["status"] == "pending"
    files_key = files_app.extensions[KEYS].create("p", "producer")[1]
    for job_id, body in got.items():
        assert body == files_app.test_client().get(f"/api/v1/remote-jobs/{job_id}",
                                                   headers={"Authorization": f"Bearer {files_key}"}).json

    back = tmp_path / "back.jsonl"
    assert pg_app.test_cli_runner().invoke(args=["remote-jobs", "export", "--output", str(back)]).exit_code == 0
    fresh = _app(tmp_path / "files2")
    out = fresh.test_cli_runner().invoke(args=["remote-jobs", "import", "--input", str(back)])
    assert out.exit_code == 0 and "3 created" in out.output
    assert {j.to_dict()["id"]: j.status for j in fresh.extensions[SERVICE].store.iter_all()} == \
        {done.id: "completed", failed.id: "failed", waiting.id: "pending"}


def _lease(job: RemoteJob):
    from morag_remote.service import Caller

    return Caller(lease_id=job.lease_id)


def test_export_writes_to_stdout_and_import_reads_stdin(app):
    svc = app.extensions[SERVICE]
    svc.store.create(job())
    out = app.test_cli_runner().invoke(args=["remote-jobs", "export"])
    assert out.exit_code == 0
    line = out.stdout.splitlines()[0]
    assert json.loads(line)["status"] == "pending"
    again = app.test_cli_runner().invoke(args=["remote-jobs", "import"], input=out.stdout)
    assert again.exit_code == 0 and "1 unchanged" in again.stdout


def test_import_with_a_bad_line_exits_1_naming_the_line(app):
    out = app.test_cli_runner().invoke(args=["remote-jobs", "import"], input="{}\n")
    assert out.exit_code == 1
    assert "line 1: not a job" in out.output
