"""A job service in another OS process, driven from the test through a pipe: each agent is what one
gunicorn worker process is to the file store (its own catalog, its own view of the journal), so a
test can make one process fail in a chosen way and ask every process what it sees afterwards."""
from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import time
from typing import Any

from morag_remote.store.base import JobFilter

from .jobs import file_service, source_file

REPLY_TIMEOUT = 60.0


def _journal_fd(fd: int) -> bool:
    try:
        return "/journal/" in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


def _break_next_journal_write(mode: str) -> None:
    """The next write to the change journal writes the first half of what it was given, then
    fails with ENOSPC (``mode`` "enospc", a disk that filled up in the middle of the line) or kills
    the process (``mode`` "kill", a writer killed in the middle of its write)."""
    real = os.write

    def write(fd: int, data) -> int:
        if not _journal_fd(fd):
            return real(fd, data)
        os.write = real  # once
        data = bytes(data)
        real(fd, data[: len(data) // 2])
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.write = write


def _stop_in_build(store, after: int) -> None:
    """The process stops itself (SIGSTOP) in the middle of its next catalog build, once it has
    read ``after`` job files: what a worker stopped while it boots is."""
    real = store._read_in
    reads = [0]

    def read_in(folder, job_id):
        reads[0] += 1
        if reads[0] == after:
            store._read_in = real
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(folder, job_id)

    store._read_in = read_in


def _serve(data_dir: str, source_root: str, conn, config: dict) -> None:
    service = file_service(data_dir, source_root, **config)
    source = source_file(service)
    while True:
        command, *args = conn.recv()
        try:
            if command == "stop":
                return
            if command == "break_journal":
                _break_next_journal_write(*args)
                result: Any = None
            elif command == "stop_in_build":  # SIGSTOP itself after reading args[0] files of a build
                _stop_in_build(service.store, args[0])
                result = None
            elif command == "create":
                result = service.create(source_file_path=source, content_type=args[0],
                                        ingestion_task_id="ingest-1").id
            elif command == "pending":
                jobs, _ = service.list(JobFilter(status="pending"), None, 100_000)
                result = sorted(job.id for job in jobs)
            elif command == "counts":
                result = {f"{status}/{ct}": n for (status, ct), n in service.stats().counts.items()}
            elif command == "poll":
                result = [job.id for job in service.poll(args[0], args[1], max_jobs=args[2] if len(args) > 2 else 1)]
            elif command == "timed":  # ("timed", command, *args): (result, seconds)
                started = time.monotonic()
                inner = _call(service, source, args)
                result = (inner, time.monotonic() - started)
            else:
                raise ValueError(command)
            conn.send(("ok", result))
        except Exception as exc:  # the test asserts on it
            conn.send(("error", f"{type(exc).__name__}: {exc}",
                       getattr(exc, "errno", None), getattr(exc, "status_code", None)))


def _call(service, source: str, args: tuple) -> Any:
    command, *rest = args
    if command == "create":
        return service.create(source_file_path=source, content_type=rest[0], ingestion_task_id="ingest-1").id
    if command == "poll":
        return [job.id for job in service.poll(rest[0], rest[1])]
    raise ValueError(command)


class Agent:
    """One service process; ``call`` sends a command and returns its answer (an error answer is
    returned as ``("error", message, errno, status_code)``)."""

    def __init__(self, data_dir, source_root, **config: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(str(data_dir), str(source_root), child, config), daemon=True)
        self.proc.start()
        child.close()

    def call(self, *command: Any, timeout: float = REPLY_TIMEOUT) -> Any:
        self.conn.send(command)
        if not self.conn.poll(timeout):
            raise AssertionError(f"agent {self.proc.pid} did not answer {command!r} within {timeout} s")
        status, *answer = self.conn.recv()
        return answer[0] if status == "ok" else ("error", *answer)

    def send(self, *command: Any) -> None:
        """Send without waiting (the answer is read by :meth:`reply`)."""
        self.conn.send(command)

    def reply(self, timeout: float = REPLY_TIMEOUT) -> Any:
        if not self.conn.poll(timeout):
            raise AssertionError(f"agent {self.proc.pid} did not answer within {timeout} s")
        status, *answer = self.conn.recv()
        return answer[0] if status == "ok" else ("error", *answer)

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except OSError:
                pass
            self.proc.join(10)
        if self.proc.is_alive():  # pragma: no cover - a stuck agent
            self.proc.kill()
            self.proc.join(10)
