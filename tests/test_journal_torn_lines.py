"""A torn line in the change journal (a full disk in the middle of a line, a writer killed in the
middle of its write) never hides a job from another process: an append writes its whole line or
cuts the file back, an append after a fragment cuts the fragment off, a line that does not parse
makes its reader rebuild from the folders, and fsck finds and repairs both."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from morag_remote.store.files.fsck import fsck
from morag_remote.store.files.jobs import FileJobStore
from morag_remote.store.files.journal import Journal, JournalDamaged, encode_line

from support import small_fs
from support.agents import Agent
from support.jobs import file_service, source_file

pytestmark = pytest.mark.files_only


def segment_bytes(root: Path) -> bytes:
    (segment,) = sorted((root / "journal").glob("*.log"))
    return segment.read_bytes()


def fail_half_way(monkeypatch, mode: str = "enospc") -> None:
    """The next os.write writes half its bytes, then fails with ENOSPC."""
    real = os.write

    def write(fd, data):
        monkeypatch.setattr(os, "write", real)
        real(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", write)


# -- the journal alone ------------------------------------------------------------------------

def test_an_append_cut_short_by_a_full_disk_leaves_the_journal_as_it_was(tmp_path, monkeypatch):
    journal = Journal(tmp_path / "journal")
    start = journal.head()
    end = journal.append(["a"], where=("pending", 1))
    before = segment_bytes(tmp_path)
    fail_half_way(monkeypatch)
    with pytest.raises(OSError) as caught:
        journal.append(["b"], where=("processing", 2))
    assert caught.value.errno == errno.ENOSPC
    assert segment_bytes(tmp_path) == before
    assert journal.changes_since(end) == ([], end)
    assert journal.append(["c"])[1] == len(before) + len(encode_line("c"))
    assert journal.changes_since(start)[0] == [("a", ("pending", 1)), ("c", None)]


def test_an_append_after_a_fragment_cuts_the_fragment_off(tmp_path):
    """A writer killed in the middle of its line left a fragment: it announced nothing (the line
    comes before the change) and no reader read it; the next line must not be glued to it."""
    journal = Journal(tmp_path / "journal")
    start = journal.head()
    journal.append(["a"], where=("pending", 1))
    segment = next((tmp_path / "journal").glob("*.log"))
    with open(segment, "ab") as f:
        f.write(encode_line("01a2310d-24b7", ("pending", 1)).encode()[:5])
    assert journal.changes_since(start)[0] == [("a", ("pending", 1))]  # a reader skips the fragment
    journal.append(["b"], where=("pending", 1))
    assert journal.changes_since(start)[0] == [("a", ("pending", 1)), ("b", ("pending", 1))]
    assert segment_bytes(tmp_path).endswith(b"\n")


def test_a_line_glued_to_a_fragment_is_damaged_not_another_id(tmp_path):
    journal = Journal(tmp_path / "journal")
    start = journal.head()
    segment = next((tmp_path / "journal").glob("*.log"))
    segment.write_bytes(b"01a23" + encode_line("01a2310d-24b7-4c3a", ("pending", 1)).encode())
    with pytest.raises(JournalDamaged):
        journal.changes_since(start)


def test_lines_without_a_checksum_are_read_as_before(tmp_path):
    """What the previous version wrote (read during a rolling restart)."""
    journal = Journal(tmp_path / "journal")
    start = journal.head()
    next((tmp_path / "journal").glob("*.log")).write_bytes(b"a pending 3\nb\n")
    assert journal.changes_since(start)[0] == [("a", ("pending", 3)), ("b", None)]


# -- the store and fsck -----------------------------------------------------------------------

@pytest.fixture
def stores(tmp_path):
    data = tmp_path / "remote_jobs"
    writer, reader = file_service(str(data), str(tmp_path / "sources")), file_service(str(data), str(tmp_path / "sources"))
    return data, writer, reader


def create(service, content_type="audio"):
    return service.create(source_file_path=source_file(service), content_type=content_type,
                          ingestion_task_id="ingest-1").id


def pending_ids(service) -> list[str]:
    from morag_remote.store.base import JobFilter

    return sorted(job.id for job in service.list(JobFilter(status="pending"), None, 1000)[0])


def test_a_reader_rebuilds_past_a_line_that_does_not_parse(stores):
    data, writer, reader = stores
    first = create(writer)
    assert pending_ids(reader) == [first]  # the reader follows the journal from here
    segment = next((data / "journal").glob("*.log"))
    with open(segment, "ab") as f:  # what the version before could leave: a glued line
        f.write(b"01a23" + encode_line("01a2301a2310d-24b7", ("pending", 1)).encode())
    second = create(writer)
    assert pending_ids(reader) == sorted([first, second])
    assert reader.stats().counts == writer.stats().counts == {("pending", "audio"): 2}


def test_fsck_finds_and_repairs_a_torn_end_of_the_journal(stores):
    data, writer, reader = stores
    create(writer)
    segment = next((data / "journal").glob("*.log"))
    with open(segment, "ab") as f:
        f.write(b"01a23")
    findings = fsck(writer.store)
    assert [(f.kind, f.repaired) for f in findings] == [("journal", False)]
    assert "torn line" in findings[0].detail
    assert [(f.kind, f.repaired) for f in fsck(writer.store, repair=True)] == [("journal", True)]
    assert fsck(writer.store) == []
    assert segment.read_bytes().endswith(b"\n")


def test_fsck_finds_a_damaged_line_and_starts_a_new_segment_past_it(stores):
    data, writer, reader = stores
    first = create(writer)
    assert pending_ids(reader) == [first]
    segment = next((data / "journal").glob("*.log"))
    with open(segment, "ab") as f:
        f.write(b"\x00\x00garbage\n")
    findings = fsck(writer.store)
    assert [f.kind for f in findings] == ["journal"] and "do not parse" in findings[0].detail
    assert [(f.kind, f.repaired) for f in fsck(writer.store, repair=True)] == [("journal", True)]
    assert fsck(writer.store) == []
    second = create(writer)
    assert pending_ids(reader) == pending_ids(writer) == sorted([first, second])


def test_fsck_from_the_cli_exits_1_on_a_torn_journal(service, runner):
    data = Path(service.store.root)
    create(service)
    with open(next((data / "journal").glob("*.log")), "ab") as f:
        f.write(b"partial")
    assert runner.invoke(args=["remote-jobs", "fsck"]).exit_code == 1
    assert runner.invoke(args=["remote-jobs", "fsck", "--repair"]).exit_code == 0
    assert runner.invoke(args=["remote-jobs", "fsck"]).exit_code == 0


# -- real processes ---------------------------------------------------------------------------

@pytest.fixture
def agents(tmp_path):
    started: list[Agent] = []

    def start(data_dir=None) -> Agent:
        agent = Agent(data_dir or tmp_path / "remote_jobs", tmp_path / "sources")
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def assert_agree(processes, expected_pending: list[str], audio_job: str) -> None:
    """Every process lists the same pending jobs, counts the same, and the first to poll for
    audio claims ``audio_job``."""
    assert [p.call("pending") for p in processes] == [sorted(expected_pending)] * len(processes)
    counts = [p.call("counts") for p in processes]
    assert counts == [counts[0]] * len(processes) and sum(counts[0].values()) == len(expected_pending)
    assert processes[0].call("poll", "w1", ["audio"]) == [audio_job]
    assert [p.call("poll", "w2", ["audio"]) for p in processes] == [[]] * len(processes)


def test_two_processes_agree_on_every_job_after_a_journal_write_cut_short(agents, tmp_path):
    first, second = agents(), agents()
    older = [first.call("create", "video") for _ in range(3)]
    assert second.call("pending") == sorted(older)  # both follow the journal from here
    first.call("break_journal", "enospc")
    failed = first.call("create", "audio")
    assert failed[0] == "error" and failed[2] == errno.ENOSPC
    job = second.call("create", "audio")  # appended right after the failed line's place
    assert_agree([first, second, agents()], older + [job], job)
    assert fsck(FileJobStore(tmp_path / "remote_jobs")) == []


def test_two_processes_agree_after_a_writer_is_killed_in_the_middle_of_its_line(agents, tmp_path):
    doomed, first, second = agents(), agents(), agents()
    older = [first.call("create", "video") for _ in range(2)]
    assert second.call("pending") == sorted(older)
    doomed.call("break_journal", "kill")
    doomed.send("create", "audio")
    doomed.proc.join(30)
    assert doomed.proc.exitcode == -9
    torn = segment_bytes(tmp_path / "remote_jobs")
    assert not torn.endswith(b"\n")  # the fragment the killed writer left
    job = first.call("create", "audio")
    assert_agree([second, first], older + [job], job)
    assert fsck(FileJobStore(tmp_path / "remote_jobs")) == []


# -- a real full disk -------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs at ``tmp_path/disk`` (support.small_fs), unmounted at the end."""
    with small_fs.mounted(tmp_path / "disk", size="2m") as disk:
        yield disk


def test_polls_on_a_full_disk_leave_only_whole_lines_for_the_other_process(small_disk, agents):
    """The issue's scenario on a real file system: polls fail on a full disk (their journal lines
    go in while the journal's last page has room, then one is cut short), the other process creates
    once space is back, and both agree on every job."""
    data = small_disk / "remote_jobs"
    first, second = agents(data), agents(data)
    older = [first.call("create", "video") for _ in range(3)]
    assert second.call("pending") == sorted(older)
    filler = small_fs.fill_space(small_disk)  # to the last byte
    journal = next((data / "journal").glob("*.log"))
    sizes = set()
    for _ in range(200):  # until a line no longer fits in the journal's last page
        answer = first.call("poll", "w9", ["video"])
        assert answer[0] == "error" and answer[2] == errno.ENOSPC, answer
        size = journal.stat().st_size
        if size in sizes:
            break
        sizes.add(size)
    else:
        pytest.fail("the journal kept growing on a full disk")
    assert journal.read_bytes().endswith(b"\n")
    filler.unlink()
    job = second.call("create", "audio")
    assert_agree([first, second], older + [job], job)
    assert fsck(FileJobStore(data)) == []
