"""What the JSON-file store calls corrupt: only a file whose content (or what sits at its path) is
not a job record. A job id is plain ASCII, so no id names a file the system cannot even look up;
and a failure of the system itself (too many open files, an I/O error) propagates: the job is not
reported corrupt, and no process's catalog silently leaves it out."""
from __future__ import annotations

import errno
import multiprocessing
import os
import resource
from datetime import datetime, timezone
from pathlib import Path

import pytest

from support.actions import auth
from morag_remote.exceptions import JobNotFound
from morag_remote.models import RemoteJob, new_job_id
from morag_remote.store.files.jobs import CorruptJobFile, FileJobStore, load_job_file

# Reading /proc/self/mem at offset 0 fails with EIO: a real I/O error from the kernel, made on
# demand by putting a symlink to it where a job file was.
IO_ERROR_FILE = "/proc/self/mem"
FOUR_BYTE_DIGITS = "\U0001d7ce" * 64  # isalnum(), and 256 bytes in UTF-8: too long for a file name


def make_job(store: FileJobStore) -> RemoteJob:
    now = datetime.now(timezone.utc)
    return store.create(RemoteJob(id=new_job_id(), ingestion_task_id="t", source_file_path="/src/a",
                                  content_type="audio", task_options={}, created_at=now, updated_at=now,
                                  available_at=now))


@pytest.fixture
def store(tmp_path: Path) -> FileJobStore:
    return FileJobStore(tmp_path / "remote_jobs")


# -- ids -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("job_id", [FOUR_BYTE_DIGITS, "\u0663" * 10, "caf\u00e9", "\uff11\uff12"])
def test_a_non_ascii_id_is_no_job_id(store, job_id):
    with pytest.raises(JobNotFound):
        store.get(job_id)
    with pytest.raises(JobNotFound):
        store.update(job_id, lambda job: job)
    with pytest.raises(JobNotFound):
        store.delete(job_id)


def test_an_id_of_64_four_byte_digits_is_404_without_a_corrupt_file_warning(client, keys, log_output):
    response = client.get(f"/api/v1/remote-jobs/{FOUR_BYTE_DIGITS}", headers=auth(keys["producer"]))
    assert response.status_code == 404
    assert "store.corrupt_file" not in log_output.getvalue()


# -- errors of the system, not of the file ---------------------------------------------------------

def _load_with_no_descriptor_left(path: str, out: str) -> None:
    """Runs in another process: fill the descriptor table, then load the job file."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    held = []
    try:
        for _ in range(64):  # bounded: the limit is 64
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        assert exc.errno == errno.EMFILE
    try:
        load_job_file(Path(path))
        outcome = "loaded"
    except CorruptJobFile as exc:
        outcome = f"corrupt: {exc.reason}"
    except OSError as exc:
        outcome = errno.errorcode[exc.errno]
    finally:
        for fd in held:
            os.close(fd)
    Path(out).write_text(outcome)


def test_too_many_open_files_is_not_a_corrupt_job_file(store, tmp_path):
    job = make_job(store)
    out = tmp_path / "outcome"
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_load_with_no_descriptor_left, args=(str(store.path("pending", job.id)), str(out)))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert out.read_text() == "EMFILE"


def _processing(job: RemoteJob) -> RemoteJob:
    job.status = "processing"
    return job


def _break(store: FileJobStore, job: RemoteJob) -> tuple[Path, bytes]:
    path = store.path(job.status, job.id)
    data = path.read_bytes()
    path.unlink()
    os.symlink(IO_ERROR_FILE, path)
    return path, data


def _mend(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def test_an_io_error_reading_a_job_file_propagates(store):
    job = make_job(store)
    _break(store, job)
    with pytest.raises(OSError) as raised:
        store.get(job.id)
    assert raised.value.errno == errno.EIO


def test_an_io_error_while_indexing_leaves_no_job_out_of_the_catalog(store):
    jobs = [make_job(store) for _ in range(3)]
    other = FileJobStore(store.root)  # another process's view, indexing the files afresh
    path, data = _break(store, jobs[1])
    with pytest.raises(OSError):
        other.stats()
    _mend(path, data)
    assert sum(other.stats().counts.values()) == 3
    assert len(other.claim(["audio"], 10, datetime.now(timezone.utc), _processing)) == 3


def test_an_io_error_while_catching_up_on_changes_leaves_no_job_out_of_the_catalog(store):
    other = FileJobStore(store.root)
    assert sum(other.stats().counts.values()) == 0  # indexed, now following the journal
    jobs = [make_job(store) for _ in range(3)]
    path, data = _break(store, jobs[1])
    with pytest.raises(OSError):
        other.stats()
    _mend(path, data)
    assert sum(other.stats().counts.values()) == 3


@pytest.mark.files_only
def test_fsck_stops_on_an_io_error_and_quarantines_nothing(service, runner):
    store = service.store
    job = make_job(store)
    path, _ = _break(store, job)
    result = runner.invoke(args=["remote-jobs", "fsck", "--repair", "--json"])
    assert result.exit_code == 1
    assert "Input/output error" in result.output and "Traceback" not in result.output
    assert path.is_symlink() and os.readlink(path) == IO_ERROR_FILE
    assert not list((store.root / "corrupt").iterdir())
