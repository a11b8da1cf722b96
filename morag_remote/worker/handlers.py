"""Handlers: what runs for one job, always as a process of its own (in its own process group, so
that stopping it stops whatever it started), with its output captured within fixed bounds.

Two kinds, one protocol:

- ``--exec TEMPLATE``: the template is split like a shell line, then each word is filled in with
  ``{input}``, ``{output_dir}``, ``{job_id}`` and ``{content_type}`` (so a path with spaces stays one
  argument); the task options are JSON in ``MORAG_REMOTE_TASK_OPTIONS``.
- ``--handler package.module:function``: ``python -m morag_remote.worker.pyhandler`` runs the
  callable with a :class:`~morag_remote.worker.job.Job` and writes what it returns the same way.

The process's exit says what happened: 0 success, with the content in ``<output_dir>/content.txt``
(else its stdout) and ``<output_dir>/metadata.json``; 65 (``EX_DATAERR``) this input cannot be
converted (no retry); anything else a failure worth retrying, the last lines of stderr its message.
A stdout line ``progress 0.42 transcribing`` reports progress.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import string
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

from ..client.errors import ConfigError

PLACEHOLDERS = ("input", "output_dir", "job_id", "content_type")
EX_DATAERR = 65
LINE_LIMIT = 64 * 1024
STDERR_TAIL = 64 * 1024
MAX_ERROR_MESSAGE = 4000
HANDLER_MARK = "MORAG_REMOTE_HANDLER_OF"  # in each handler's environment: the state folder it belongs to
_PROGRESS = re.compile(rb"^progress\s+([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)(?:\s+(.*?))?\s*$")


# Run before the handler (Linux): the kernel SIGKILLs it when the worker thread that started it
# dies, so that ``kill -9`` of the worker takes its handlers' leaders along (the rest of their groups
# are killed at the worker's next start, see StateDir.open); then it becomes the handler (exec: the
# same pid). A small interpreter rather than a preexec_fn: Python code run between fork and exec in
# a threaded process can deadlock (it did, with four jobs starting at once). The thread that starts
# a handler waits for it to end, so it outlives it in every other case.
_DEATHSIG_STUB = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)\n"  # PR_SET_PDEATHSIG, SIGKILL
    "if os.getppid() != int(sys.argv[1]):\n"   # the worker died before the line above
    "    os._exit(1)\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as exc:\n"
    "    sys.stderr.write(f'cannot run {sys.argv[2]}: {exc.strerror}\\n')\n"
    "    os._exit(127)\n")
DIES_WITH_WORKER = sys.platform.startswith("linux")


def _runnable(program: str, cwd: str, env: dict[str, str]) -> bool:
    if "/" in program:
        path = os.path.join(cwd, program)
        return os.path.isfile(path) and os.access(path, os.X_OK)
    return shutil.which(program, path=env.get("PATH", os.defpath)) is not None


def kill_leftovers(mark: str) -> list[int]:
    """SIGKILL every process whose environment carries ``HANDLER_MARK=mark``: what the handlers of
    a worker that was killed left running (Linux; nothing elsewhere). The pids killed."""
    needle = f"{HANDLER_MARK}={mark}".encode() + b"\0"
    killed: list[int] = []
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return killed
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:
            continue
        if environ.startswith(needle) or b"\0" + needle in environ:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
    return killed


def signal_name(number: int) -> str:
    """``SIGKILL``; ``signal 34`` for one Python has no name for (the real-time signals)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class HandlerError(Exception):
    """The handler could not run or its output is unusable; ``retryable`` says whether another try
    may do better."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


@dataclass
class Outcome:
    """What a finished handler produced: a success with content, or a failure."""

    success: bool
    content: str | None = None
    metadata: dict[str, Any] | None = None
    error_message: str | None = None
    retryable: bool | None = None
    processing_time: float | None = None


class Handler:
    """Builds the command line of one job; checked once at start (``check``)."""

    def check(self) -> None:
        raise NotImplementedError

    def command(self, input_path: str, output_dir: str, job_id: str, content_type: str) -> list[str]:
        raise NotImplementedError


class ExecHandler(Handler):
    def __init__(self, template: str) -> None:
        self.template = template
        try:
            self.words = shlex.split(template)
        except ValueError as exc:
            raise ConfigError(f"--exec {template!r} cannot be split into words: {exc}") from None
        if not self.words:
            raise ConfigError("--exec is empty")
        for word in self.words:
            try:
                fields = [f for _, f, spec, conv in string.Formatter().parse(word) if f is not None]
            except ValueError as exc:
                raise ConfigError(f"--exec: {exc} in {word!r} (write {{{{ and }}}} for literal braces)") from None
            unknown = [f for f in fields if f not in PLACEHOLDERS]
            if unknown:
                raise ConfigError(f"--exec names the unknown placeholder {{{unknown[0]}}}; it knows "
                                  + ", ".join("{" + p + "}" for p in PLACEHOLDERS))

    def check(self) -> None:
        program = self.words[0]
        if "{" in program:
            return  # chosen per job; its start failure fails the job
        found = shutil.which(program)
        if found is None:
            raise ConfigError(f"--exec: cannot run {program!r}: not found or not executable")
        self.words[0] = os.path.abspath(found)  # the job runs in its own folder

    def command(self, input_path: str, output_dir: str, job_id: str, content_type: str) -> list[str]:
        values = {"input": input_path, "output_dir": output_dir, "job_id": job_id, "content_type": content_type}
        return [word.format_map(values) for word in self.words]


class PythonHandler(Handler):
    def __init__(self, spec: str) -> None:
        module, sep, func = spec.partition(":")
        if not sep or not module or not func:
            raise ConfigError(f"--handler {spec!r} must be package.module:function")
        self.spec = spec

    def check(self) -> None:
        """Import the callable in a child process (the worker itself need not load a model)."""
        try:
            done = subprocess.run([sys.executable, "-m", "morag_remote.worker.pyhandler", "--check", self.spec],
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise ConfigError(f"--handler {self.spec}: importing it took more than 120 s") from None
        if done.returncode != 0:
            lines = done.stderr.decode("utf-8", "replace").strip().splitlines() or ["it cannot be imported"]
            raise ConfigError(f"--handler {self.spec}: {lines[-1]}")

    def command(self, input_path: str, output_dir: str, job_id: str, content_type: str) -> list[str]:
        return [sys.executable, "-m", "morag_remote.worker.pyhandler", self.spec, input_path, output_dir,
                job_id, content_type]


def build_handler(exec_template: str | None, handler_spec: str | None) -> Handler:
    return ExecHandler(exec_template) if exec_template else PythonHandler(handler_spec or "")


class HandlerProcess:
    """One running handler: its process group, bounded captures, its latest progress."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], max_output: int,
                 on_progress: Callable[[float, str | None], None]) -> None:
        self.argv = argv
        self.cwd = cwd
        self.env = env
        self.max_output = max_output
        self.on_progress = on_progress
        self.stdout = bytearray()
        self.stdout_overflow = False
        self._stderr: deque[bytes] = deque()
        self._stderr_size = 0
        self.proc: subprocess.Popen | None = None
        self._readers: list[threading.Thread] = []
        self.started = 0.0

    def start(self) -> None:
        argv = self.argv
        if DIES_WITH_WORKER:
            if not _runnable(argv[0], self.cwd, self.env):
                raise HandlerError(f"the handler cannot be started: {argv[0]}: not found or not executable")
            argv = [sys.executable, "-S", "-I", "-c", _DEATHSIG_STUB, str(os.getpid()), *argv]
        try:
            self.proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise HandlerError(f"the handler cannot be started: {self.argv[0]}: {exc.strerror or exc}") from None
        self.started = time.monotonic()
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_stdout(self) -> None:
        for line in iter(lambda: self.proc.stdout.readline(LINE_LIMIT), b""):
            match = _PROGRESS.match(line)
            if match:
                try:
                    fraction = float(match.group(1))
                except ValueError:
                    fraction = None
                if fraction is not None:
                    message = match.group(2).decode("utf-8", "replace") if match.group(2) else None
                    self.on_progress(min(max(fraction, 0.0), 1.0), message)
                    continue
            if len(self.stdout) + len(line) <= self.max_output:
                self.stdout += line
            else:
                self.stdout_overflow = True

    def _read_stderr(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(8192), b""):
            self._stderr.append(chunk)
            self._stderr_size += len(chunk)
            while self._stderr_size > STDERR_TAIL and len(self._stderr) > 1:
                self._stderr_size -= len(self._stderr.popleft())

    def stderr_tail(self, lines: int = 20) -> str:
        text = b"".join(self._stderr).decode("utf-8", "replace")
        return "\n".join(text.strip().splitlines()[-lines:])

    def exit_code(self) -> int | None:
        """The handler's exit code once it ended, without reaping it: until :meth:`finish` reaps
        it, its pid (and so its group id) cannot be given to a new process."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def running(self) -> bool:
        return self.proc is not None and self.exit_code() is None

    def wait(self, timeout: float) -> int | None:
        """The exit code once the handler ended within ``timeout`` seconds (not reaped), else None."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.exit_code()
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(min(0.02, max(deadline - time.monotonic(), 0)))

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """SIGKILL the whole group now (from any thread: a worker that stops at once)."""
        if self.running():
            self._signal_group(signal.SIGKILL)

    def stop(self, grace: float) -> int:
        """SIGTERM to the whole group, SIGKILL after ``grace`` seconds; the exit code."""
        if self.running():
            self._signal_group(signal.SIGTERM)
            if self.wait(grace) is None:
                self._signal_group(signal.SIGKILL)
        return self.finish()

    def finish(self) -> int:
        """Wait for the process, kill what it left behind in its group (before reaping it, so that
        the group id is still its own), reap it, collect the readers."""
        while self.exit_code() is None:
            self.wait(1.0)
        if self.proc.returncode is None:
            self._signal_group(signal.SIGKILL)
        code = self.proc.wait()
        for t in self._readers:
            t.join(timeout=5)
        return code

    def outcome(self, code: int, output_dir: str) -> Outcome:
        """Read a finished handler's result (see the module docstring)."""
        if code == 0:
            try:
                content = self._content(output_dir)
                metadata = self._metadata(output_dir)
            except HandlerError as exc:
                return Outcome(False, error_message=exc.message, retryable=exc.retryable)
            return Outcome(True, content=content, metadata=metadata)
        tail = self.stderr_tail()
        if code < 0:
            reason = f"the handler was killed by {signal_name(-code)}"
        else:
            reason = f"the handler exited with {code}"
        message = f"{reason}: {tail}" if tail else reason
        return Outcome(False, error_message=message[-MAX_ERROR_MESSAGE:], retryable=code != EX_DATAERR)

    def _content(self, output_dir: str) -> str:
        path = os.path.join(output_dir, "content.txt")
        if os.path.exists(path):
            size = os.path.getsize(path)
            if size > self.max_output:
                raise HandlerError(f"content.txt is {size} bytes, more than --max-output {self.max_output}", False)
            with open(path, "rb") as fh:
                data = fh.read()
            where = "content.txt"
        else:
            if self.stdout_overflow:
                raise HandlerError(f"the handler wrote more than --max-output {self.max_output} bytes to "
                                   "stdout and no content.txt", False)
            data = bytes(self.stdout)
            where = "the handler's stdout"
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HandlerError(f"{where} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r})",
                               False) from None

    def _metadata(self, output_dir: str) -> dict[str, Any] | None:
        path = os.path.join(output_dir, "metadata.json")
        if not os.path.exists(path):
            return None
        if os.path.getsize(path) > min(self.max_output, 1024 * 1024):
            raise HandlerError("metadata.json is larger than 1 MiB", False)
        try:
            with open(path, "rb") as fh:
                data = json.loads(fh.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise HandlerError(f"metadata.json is not valid JSON: {exc}", False) from None
        if not isinstance(data, dict):
            raise HandlerError("metadata.json must hold a JSON object", False)
        return data
