"""``flask remote-jobs fsck [--repair]`` against planted damage of each kind, and the server serving
every other job while one file is corrupt."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from support.jobs import claimed_job, directories_of, new_job
from morag_remote import create_app
from morag_remote.fileio import stage
from morag_remote.context import SERVICE
from morag_remote.service import Caller

pytestmark = pytest.mark.files_only  # damage and crashes of the JSON files themselves


@pytest.fixture
def root(service) -> Path:
    return Path(service.store.root)


def fsck(runner, *flags: str) -> tuple[int, list[dict]]:
    result = runner.invoke(args=["remote-jobs", "fsck", "--json", *flags])
    assert "Traceback" not in result.stdout
    return result.exit_code, json.loads(result.stdout)


def kinds(findings: list[dict]) -> list[str]:
    return sorted(f["kind"] for f in findings)


# -- a clean store ----------------------------------------------------------------------------

def test_fsck_of_a_clean_store_exits_0(service, runner):
    claimed_job(service)
    new_job(service)
    result = runner.invoke(args=["remote-jobs", "fsck"])
    assert result.exit_code == 0
    assert result.stdout.strip() == "store is clean"


# -- leftover temp files ----------------------------------------------------------------------

def test_fsck_finds_a_leftover_temp_file_and_exits_1(service, runner, root):
    job = new_job(service)
    (root / "pending" / f".tmp-{job.id}.json.4242.deadbeef").write_bytes(b'{"half": ')

    code, findings = fsck(runner)

    assert code == 1
    assert findings == [{"kind": "temp", "path": f"pending/.tmp-{job.id}.json.4242.deadbeef", "job_id": None,
                         "detail": "leftover temp file of an interrupted write", "repaired": False}]
    assert (root / "pending" / f".tmp-{job.id}.json.4242.deadbeef").exists()


def test_fsck_repair_removes_the_temp_file_and_exits_0(service, runner, root):
    job = new_job(service)
    temp = root / "processing" / f".tmp-{job.id}.json.4242.deadbeef"
    temp.write_bytes(b"")

    code, findings = fsck(runner, "--repair")

    assert code == 0 and [f["repaired"] for f in findings] == [True]
    assert not temp.exists()
    assert service.get(job.id).status == "pending"
    assert fsck(runner) == (0, [])


def test_fsck_finds_and_removes_a_key_file_temp_left_by_a_killed_writer(runner, keys, client, instance_path):
    # what a process killed between staging the key file and renaming it leaves (fileio.write_atomic)
    temp = Path(stage(instance_path, "api_keys.json", b'{"keys": [')).name
    assert temp.startswith(".tmp-api_keys.json.")

    code, findings = fsck(runner)
    assert code == 1
    assert findings == [{"kind": "temp", "path": temp, "job_id": None, "repaired": False,
                         "detail": "leftover temp file of an interrupted API key write (instance folder)"}]

    code, findings = fsck(runner, "--repair")
    assert code == 0 and [f["repaired"] for f in findings] == [True]
    assert not (instance_path / temp).exists()
    assert fsck(runner) == (0, [])
    assert client.get("/api/v1/remote-jobs/stats", headers={"Authorization": f"Bearer {keys['admin']}"}).status_code == 200


# -- one job in two directories ---------------------------------------------------------------

def _plant_old_copy(root: Path, status: str, job_id: str, data: bytes) -> Path:
    path = root / status / f"{job_id}.json"
    path.write_bytes(data)
    return path


def test_fsck_finds_a_job_in_two_directories(service, runner, root):
    job = new_job(service)
    pending_bytes = (root / "pending" / f"{job.id}.json").read_bytes()
    service.poll("w1", ["audio"])
    _plant_old_copy(root, "pending", job.id, pending_bytes)  # the move was cut short

    code, findings = fsck(runner)

    assert code == 1
    assert [(f["kind"], f["path"]) for f in findings] == [("duplicate", f"pending/{job.id}.json")]
    assert "kept version 2 in processing/" in findings[0]["detail"]


def test_reader_sees_the_higher_version_before_any_repair(service, root):
    job = new_job(service)
    pending_bytes = (root / "pending" / f"{job.id}.json").read_bytes()
    service.poll("w1", ["audio"])
    _plant_old_copy(root, "pending", job.id, pending_bytes)
    assert service.get(job.id).status == "processing"
    assert service.poll("w2", ["audio"]) == []


def test_fsck_repair_keeps_the_higher_version_of_a_duplicate(service, runner, root):
    job = claimed_job(service)
    processing_bytes = (root / "processing" / f"{job.id}.json").read_bytes()
    service.submit_result(job.id, Caller(job.lease_id), success=True, content="kept")
    _plant_old_copy(root, "processing", job.id, processing_bytes)

    code, findings = fsck(runner, "--repair")

    assert code == 0 and kinds(findings) == ["duplicate"]
    assert directories_of(root, job.id) == ["completed"]
    assert service.get(job.id).result_data["content"] == "kept"


def test_fsck_repair_keeps_the_higher_version_even_in_an_earlier_directory(service, runner, root):
    job = service.cancel(new_job(service).id)
    cancelled_bytes = (root / "cancelled" / f"{job.id}.json").read_bytes()
    service.retry(job.id)  # version 3, back in pending/
    _plant_old_copy(root, "cancelled", job.id, cancelled_bytes)

    code, _ = fsck(runner, "--repair")

    assert code == 0
    assert directories_of(root, job.id) == ["pending"]
    assert service.get(job.id).version == 3
    assert [j.id for j in service.poll("w1", ["audio"])] == [job.id]


# -- a file in the wrong directory ------------------------------------------------------------

def test_fsck_finds_a_file_whose_status_disagrees_with_its_directory(service, runner, root):
    job = claimed_job(service)
    service.submit_result(job.id, Caller(job.lease_id), success=True, content="done")
    os.replace(root / "completed" / f"{job.id}.json", root / "pending" / f"{job.id}.json")

    code, findings = fsck(runner)

    assert code == 1
    assert [(f["kind"], f["path"]) for f in findings] == [("misplaced", f"pending/{job.id}.json")]
    assert "status is 'completed'" in findings[0]["detail"]


def test_fsck_repair_moves_a_misplaced_file_where_its_status_says(service, runner, root):
    job = claimed_job(service)
    service.submit_result(job.id, Caller(job.lease_id), success=True, content="done")
    os.replace(root / "completed" / f"{job.id}.json", root / "failed" / f"{job.id}.json")

    code, findings = fsck(runner, "--repair")

    assert code == 0 and [f["repaired"] for f in findings] == [True]
    assert directories_of(root, job.id) == ["completed"]
    assert service.get(job.id).result_data["content"] == "done"
    assert fsck(runner) == (0, [])


# -- unreadable files -------------------------------------------------------------------------

CORRUPTIONS = {
    "truncated": b'{"id": "x", "status": "pen',
    "not_an_object": b"[1, 2, 3]",
    "wrong_type": None,        # a readable record with a string priority (filled in below)
    "unknown_status": None,    # a readable record with status "lost"
    "not_utf8": b'{"id": "\xff\xfe"}',
    "empty": b"",
}


def _damage(path: Path, kind: str) -> bytes:
    record = json.loads(path.read_bytes())
    if kind == "wrong_type":
        data = json.dumps({**record, "priority": "high"}).encode()
    elif kind == "unknown_status":
        data = json.dumps({**record, "status": "lost"}).encode()
    else:
        data = CORRUPTIONS[kind]
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_fsck_finds_an_unreadable_job_file(service, runner, root, kind):
    job = new_job(service)
    _damage(root / "pending" / f"{job.id}.json", kind)

    code, findings = fsck(runner)

    assert code == 1
    assert [(f["kind"], f["path"], f["job_id"]) for f in findings] == \
        [("corrupt", f"pending/{job.id}.json", job.id)]


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_fsck_repair_moves_an_unreadable_file_to_corrupt_intact(service, runner, root, kind):
    job = new_job(service)
    data = _damage(root / "pending" / f"{job.id}.json", kind)

    code, findings = fsck(runner, "--repair")

    assert code == 0 and [f["repaired"] for f in findings] == [True]
    moved = list((root / "corrupt").iterdir())
    assert [p.name.startswith(f"pending-{job.id}.json.") for p in moved] == [True]
    assert moved[0].read_bytes() == data
    assert directories_of(root, job.id) == []
    assert fsck(runner) == (0, [])


def test_fsck_repair_never_overwrites_an_earlier_quarantined_file(service, runner, root):
    job = new_job(service)
    path = root / "pending" / f"{job.id}.json"
    path.write_bytes(b"first damage")
    fsck(runner, "--repair")
    path.write_bytes(b"second damage")  # the same name again, within the same second or not
    fsck(runner, "--repair")
    assert sorted(p.read_bytes() for p in (root / "corrupt").iterdir()) == [b"first damage", b"second damage"]


def test_fsck_repair_moves_a_directory_in_place_of_a_job_file(service, runner, root):
    job = new_job(service)
    path = root / "pending" / f"{job.id}.json"
    path.unlink()
    path.mkdir()

    code, findings = fsck(runner, "--repair")

    assert code == 0 and kinds(findings) == ["corrupt"]
    assert not path.exists()
    assert [p.is_dir() for p in (root / "corrupt").iterdir()] == [True]


def test_fsck_repair_that_fails_exits_1_and_says_why(service, runner, root):
    job = new_job(service)
    (root / "pending" / f"{job.id}.json").write_bytes(b"garbage")
    corrupt = root / "corrupt"
    corrupt.rmdir()
    corrupt.write_bytes(b"not a directory")

    code, findings = fsck(runner, "--repair")

    assert code == 1
    assert findings[0]["repaired"] is False and "repair failed" in findings[0]["detail"]
    assert (root / "pending" / f"{job.id}.json").read_bytes() == b"garbage"


def test_fsck_for_people_lists_each_finding_on_a_line(service, runner, root):
    job = new_job(service)
    (root / "pending" / f".tmp-{job.id}.json.1.ab").write_bytes(b"")
    result = runner.invoke(args=["remote-jobs", "fsck", "--repair"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"temp       pending/.tmp-{job.id}.json.1.ab  " \
                                    "leftover temp file of an interrupted write  [repaired]"


# -- the server keeps serving ------------------------------------------------------------------

@pytest.fixture
def one_corrupt(service, root):
    """Three audio jobs; the oldest one's file damaged so that its fields have the wrong types."""
    bad, good1, good2 = (new_job(service) for _ in range(3))
    _damage(root / "pending" / f"{bad.id}.json", "wrong_type")
    return bad.id, [good1.id, good2.id]


def test_poll_hands_out_the_other_jobs_when_one_file_is_corrupt(one_corrupt, worker):
    bad, good = one_corrupt
    assert worker.claim("audio")["job_id"] == good[0]
    assert worker.claim("audio")["job_id"] == good[1]
    assert worker.poll("audio").json["job_id"] is None


def test_list_shows_the_other_jobs_when_one_file_is_corrupt(one_corrupt, producer):
    bad, good = one_corrupt
    response = producer.client.get("/api/v1/remote-jobs/", headers=producer.headers)
    assert response.status_code == 200
    assert [j["job_id"] for j in response.json["jobs"]] == good


def test_get_and_status_of_other_jobs_work_when_one_file_is_corrupt(one_corrupt, producer):
    bad, good = one_corrupt
    assert producer.get(good[0]).status_code == 200
    assert producer.status(good[1]).json["status"] == "pending"


def test_get_of_the_corrupt_job_says_its_record_is_damaged(one_corrupt, producer):
    bad, _ = one_corrupt
    response = producer.get(bad)
    assert response.status_code == 500
    assert response.mimetype == "application/problem+json"
    assert response.json["title"] == "Job record unreadable"
    assert "fsck" in response.json["detail"]


def test_cancel_of_the_corrupt_job_says_its_record_is_damaged(one_corrupt, producer):
    bad, _ = one_corrupt
    assert producer.cancel(bad).status_code == 500


def test_stats_work_when_one_file_is_corrupt(one_corrupt, client, keys):
    response = client.get("/api/v1/remote-jobs/stats", headers={"Authorization": f"Bearer {keys['admin']}"})
    assert response.status_code == 200


def test_stats_of_a_new_process_leave_the_corrupt_job_out(one_corrupt, instance_path):
    fresh = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True})
    assert fresh.extensions[SERVICE].stats().counts == {("pending", "audio"): 2}


def test_a_new_process_starts_and_serves_with_one_corrupt_file(one_corrupt, instance_path):
    """A fresh app indexes the store from the files: the damaged one must not stop it."""
    bad, good = one_corrupt
    fresh = create_app({"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True})
    service = fresh.extensions[SERVICE]
    assert [j.id for j in service.poll("w9", ["audio"], max_jobs=5)] == good


def test_the_job_is_gone_but_its_bytes_are_kept_after_repair(one_corrupt, producer, runner, root):
    bad, _ = one_corrupt
    fsck(runner, "--repair")
    assert producer.get(bad).status_code == 404
    assert len(list((root / "corrupt").iterdir())) == 1


def test_polls_keep_working_when_a_lapsed_jobs_file_is_damaged(service, clock, root):
    held = claimed_job(service, "w1")
    _damage(root / "processing" / f"{held.id}.json", "truncated")
    clock.advance(service.settings.lease_for("audio") + 1)
    waiting = new_job(service)

    assert [j.id for j in service.poll("w2", ["audio"])] == [waiting.id]
    assert service.store.lapsed(clock.now, 10) == []  # the damaged job is no longer retried


def test_cleanup_expired_skips_a_damaged_job(service, clock, root, runner):
    held = claimed_job(service, "w1")
    other = claimed_job(service, "w2")
    _damage(root / "processing" / f"{held.id}.json", "not_an_object")
    clock.advance(service.settings.lease_for("audio") + 1)

    result = runner.invoke(args=["remote-jobs", "cleanup-expired", "--json"])

    assert result.exit_code == 0 and json.loads(result.stdout) == {"expired": 1}
    assert service.get(other.id).status == "pending"
