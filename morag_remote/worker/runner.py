"""The worker's loop: long polls for as many jobs as it has free slots, one :class:`JobRun` per job
(download, handler, heartbeats, result), and the drain on SIGTERM.

Threads: the main thread waits for signals and runs the drain; one thread polls; each job has a
thread that runs it and one that sends its heartbeats; one thread sends the results a previous
run left in the state folder. Every wait is on an event with a timeout, so every signal is seen
within a fraction of a second.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any

import structlog

from ..version import __version__
from ..client import (ApiError, BadRequest, Client, ClaimedJob, ConfigError, ConnectionFailed, DownloadError,
                      DownloadStopped, Forbidden, InvalidRequest, LeaseLost, NotFound, PayloadTooLarge,
                      ReleaseUnsupported, RetryPolicy, Unauthorized, result_body)
from .config import WorkerConfig
from .handlers import HANDLER_MARK, Handler, HandlerError, HandlerProcess, Outcome
from .metrics import WorkerMetrics
from .state import PendingResult, StateDir

EX_TEMPFAIL = 75  # sysexits.h: results are left in the state folder for the next start
EX_CONFIG = 2
HANDBACK_RETRY = RetryPolicy(attempts=5, base=0.25, cap=2.0)
POLL_BACKOFF = RetryPolicy(attempts=None, base=0.5, cap=15.0)
# a poll answered X-Poll-Host-Full: the server had no room to let it wait; a random 1-30 s (doubling
# while it stays full) so that the workers it turned away together do not come back together
HOST_FULL_BACKOFF = RetryPolicy(attempts=None, base=2.0, cap=30.0)
MIN_HEARTBEAT = 0.1
MIN_LEASE = 1.0  # the least lease a heartbeat interval assumes is left (a third of it)
MIN_POLL_INTERVAL = 1.0  # between the starts of two polls answered empty (a --poll-wait 0 short poll)


class Fatal(Exception):
    """The server refused this worker for good (its key, its poll): one line and stop."""


def heartbeat_interval(timeout_at: datetime | None, default: float = 60.0,
                       server_now: datetime | None = None) -> float:
    """A third of what is left of the lease (the server sets ``timeout_at`` on the claim and on
    each heartbeat), so two heartbeats may be lost before it lapses. What is left is measured on
    the server's clock: ``timeout_at`` minus the answer's ``Date`` (less a second, the header's
    resolution), so a worker whose clock is off neither spins nor lets its leases lapse; the
    worker's own clock only when the answer had no Date. Never less than MIN_LEASE."""
    if timeout_at is None:
        return default
    if server_now is not None:
        remaining = (timeout_at - server_now).total_seconds() - 1.0
    else:
        remaining = (timeout_at - datetime.now(timezone.utc)).total_seconds()
    return min(max(remaining, MIN_LEASE) / 3, 600.0)


class Worker:
    def __init__(self, config: WorkerConfig, handler: Handler, state: StateDir,
                 metrics: WorkerMetrics | None = None) -> None:
        self.config = config
        self.handler = handler
        self.state = state
        self.metrics = metrics or WorkerMetrics()
        agent = f"morag-remote-worker/{__version__}"
        self.client = Client(config.url, config.key, timeout=config.timeout, on_retry=self.metrics.on_retry,
                             user_agent=agent)
        self.poll_client = Client(config.url, config.key, timeout=config.timeout, on_retry=self.metrics.on_retry,
                                  user_agent=agent)
        self.log = structlog.get_logger("morag_remote.worker").bind(worker_id=config.worker_id)
        self.draining = threading.Event()
        self.forced = threading.Event()
        self.results_stop = threading.Event()
        self.changed = threading.Condition()
        # by (job id, lease id): a job whose lease was lost may be handed to this worker again
        # while the old run is still winding down
        self.runs: dict[tuple[str, str | None], JobRun] = {}
        self.fatal: str | None = None
        self.poll_wait = config.poll_wait
        self.max_jobs = 10
        self.announce: dict[str, Any] | None = None
        self.capabilities = config.capabilities()  # what jobs' requires may ask of this worker
        self.release_supported = True
        self.undelivered = 0
        self._lock = threading.Lock()

    # -- start ----------------------------------------------------------------------------------

    def preflight(self) -> None:
        """Checks at start, before any job is claimed: the key (any key may read the stats; a
        worker key is then checked by the first poll, which claims nothing when refused) and what
        the server's OpenAPI document says it accepts. ConfigError for what cannot work; a server
        that does not answer yet is only logged (the poll loop waits for it)."""
        try:
            self.client.stats()
        except (Unauthorized, Forbidden) as exc:
            raise ConfigError(f"the server at {self.config.url} refused the key ({exc.status}): {exc.detail}") from None
        except NotFound:
            raise ConfigError(f"{self.config.url} does not serve the morag-remote API "
                              "(no /api/v1/remote-jobs/stats)") from None
        except (ConnectionFailed, ApiError) as exc:
            self.log.warning("worker.server_unreachable", url=self.config.url, error=str(exc))
            return
        try:
            schemas = self.client.openapi().get("components", {}).get("schemas", {})
        except (ConnectionFailed, ApiError, ValueError, AttributeError):
            return
        accepted = schemas.get("CreateJobRequest", {}).get("properties", {}).get("content_type", {}).get("enum")
        if accepted:
            refused = [t for t in self.config.content_types if t not in accepted]
            if refused:
                raise ConfigError(f"the server does not accept the content type {refused[0]!r}; it accepts "
                                  + ", ".join(accepted))
        poll = schemas.get("PollRequest", {}).get("properties", {})
        max_wait = poll.get("wait", {}).get("maximum")
        if isinstance(max_wait, (int, float)) and self.poll_wait > max_wait:
            self.log.info("worker.poll_wait_capped", asked=self.poll_wait, server_max=max_wait)
            self.poll_wait = float(max_wait)
        max_jobs = poll.get("max_jobs", {}).get("maximum")
        if isinstance(max_jobs, int) and max_jobs >= 1:
            self.max_jobs = max_jobs
        if "worker" in poll:
            self.announce = {"hostname": socket.gethostname(), "version": __version__,
                             "concurrency": self.config.concurrency, "labels": dict(self.config.labels)}

    # -- the main thread ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (then drain) or a fatal refusal; the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        if self.config.metrics_port:
            self.metrics.serve(self.config.metrics_port, self.config.metrics_host)
        self.log.info("worker.started", url=self.config.url, content_types=self.config.content_types,
                      concurrency=self.config.concurrency, poll_wait=self.poll_wait)
        # results a previous run left come first: a poll (ours or another worker's) could hand
        # their jobs on once their leases lapsed, and the work would be done twice
        poller = threading.Thread(target=self._serve, name="poll", daemon=True)
        poller.start()
        while not self.draining.is_set() and self.fatal is None:
            self.draining.wait(0.5)
        code = self._drain(poller)
        if self.fatal is not None:
            print(f"morag-remote-worker: {self.fatal}", file=sys.stderr, flush=True)
            return EX_CONFIG
        return code

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.draining.is_set():
            self.forced.set()
        self.draining.set()
        with self.changed:
            self.changed.notify_all()

    def _drain(self, poller: threading.Thread) -> int:
        self.log.info("worker.draining", running=len(self.runs), grace=self.config.grace,
                      reason="fatal" if self.fatal else "signal")
        self.draining.set()
        while poller.is_alive():
            self.poll_client.abort()
            poller.join(timeout=0.2)
        deadline = time.monotonic() + self.config.grace
        with self.changed:
            while self.runs and not self.forced.is_set() and time.monotonic() < deadline:
                self.changed.wait(min(0.2, max(deadline - time.monotonic(), 0.01)))
            runs = list(self.runs.values())
        for run in runs:
            run.hand_back(at_once=self.forced.is_set())
        # handlers get their kill grace, hand-backs a few tries; a result still being sent after
        # that (or at a second signal) stays in the state folder for the next start
        end = time.monotonic() + self.config.kill_grace + 10
        with self.changed:
            while self.runs and time.monotonic() < end and not self.forced.is_set():
                self.changed.wait(0.2)
        if self.forced.is_set():  # a second signal: the handlers die now, from this thread
            for run in list(self.runs.values()):
                run.kill_handler()
                run.hand_back(at_once=True)
        self.results_stop.set()
        end = time.monotonic() + 15
        with self.changed:
            while self.runs and time.monotonic() < end:
                self.changed.wait(0.2)
        # the process is about to exit: no handler may outlive it (their threads are daemons)
        for run in list(self.runs.values()):
            run.kill_handler()
        self.client.close()
        self.poll_client.close()
        if self.undelivered:
            self.log.warning("worker.stopped", undelivered=self.undelivered, state_dir=self.state.root)
            return EX_TEMPFAIL
        self.log.info("worker.stopped", clean=True)
        return 0

    # -- polling --------------------------------------------------------------------------------

    def _free_slots(self) -> int:
        with self.changed:
            while len(self.runs) >= self.config.concurrency and not self.draining.is_set():
                self.changed.wait(0.5)
            return self.config.concurrency - len(self.runs)

    def _serve(self) -> None:
        try:
            self._resend_pending()
        except Exception as exc:  # noqa: BLE001 - the poll must start anyway; the files stay for the next start
            self.log.exception("result.resend_crashed", error=f"{type(exc).__name__}: {exc}")
        self._poll_loop()

    def _poll_loop(self) -> None:
        """Poll until the drain. An unexpected error (a bug, an answer that is not JSON) is
        logged and backed off like a failed poll, and the loop goes on: a worker whose poll
        thread died would stay up doing nothing, which systemd cannot see."""
        failures = early = full = 0
        while not self.draining.is_set():
            free = self._free_slots()
            if self.draining.is_set() or free <= 0:
                break
            started = time.monotonic()
            try:
                claimed = self.poll_client.poll(self.config.worker_id, self.config.content_types,
                                                max_jobs=min(free, self.max_jobs), wait=self.poll_wait,
                                                worker=self.announce, stop=self.draining,
                                                capabilities=self.capabilities)
            except (Unauthorized, Forbidden) as exc:
                self._set_fatal(f"the server refused this key's poll ({exc.status}): {exc.detail}")
                return
            except InvalidRequest as exc:
                if "worker" in exc.errors and self.announce:
                    self.log.warning("worker.announce_unsupported", detail=exc.detail)
                    self.announce = None
                    continue
                if self._ask_less(exc, min(free, self.max_jobs)):
                    continue
                self._set_fatal(f"the server refused the poll (422): {exc.detail} {json.dumps(exc.errors)}")
                return
            except (ConnectionFailed, ApiError) as exc:
                if self.draining.is_set():
                    return
                failures += 1
                self.log.warning("poll.failed", error=str(exc), failures=failures)
                self.draining.wait(POLL_BACKOFF.delay(failures))
                continue
            except Exception as exc:  # noqa: BLE001 - see the docstring
                failures += 1
                self.log.exception("poll.crashed", error=f"{type(exc).__name__}: {exc}", failures=failures)
                self.draining.wait(POLL_BACKOFF.delay(failures))
                continue
            failures = 0
            for job in claimed:
                self._start(job, hand_back=self.draining.is_set())
            if claimed:
                early = full = 0
                continue
            if claimed.host_full:
                full += 1
                delay = HOST_FULL_BACKOFF.delay(full)
                self.log.info("poll.host_full", times=full, retry_in_s=round(delay, 2),
                              detail="the server has its most waiting polls: polling again later")
                self.draining.wait(delay)
                continue
            full = 0
            elapsed = time.monotonic() - started
            if self.poll_wait > 0 and elapsed < self.poll_wait / 2:
                early += 1  # answered well before the wait was up: the server is busy or refusing waiters
                self.draining.wait(POLL_BACKOFF.delay(early))
            else:
                early = 0
                if elapsed < MIN_POLL_INTERVAL:  # a short poll (--poll-wait 0) must not spin
                    self.draining.wait(MIN_POLL_INTERVAL - elapsed)

    def _ask_less(self, refused: InvalidRequest, asked_jobs: int) -> bool:
        """A poll refused (422) for its ``wait`` or ``max_jobs``: the server's maxima are lower
        than the worker knew (preflight could not read them). Halve what was refused and go on;
        False when there is nothing left to halve."""
        changed = False
        if "wait" in refused.errors and self.poll_wait >= 1:
            self.poll_wait = float(int(self.poll_wait / 2)) if self.poll_wait >= 2 else 0.0
            changed = True
        if "max_jobs" in refused.errors and asked_jobs > 1:
            self.max_jobs = asked_jobs // 2
            changed = True
        if changed:
            self.log.warning("poll.asking_less", poll_wait=self.poll_wait, max_jobs=self.max_jobs,
                             detail=refused.detail, errors=refused.errors)
        return changed

    def _set_fatal(self, message: str) -> None:
        self.fatal = message
        self.draining.set()

    def track(self, run: "JobRun") -> None:
        with self.changed:
            self.runs[(run.job.job_id, run.job.lease_id)] = run
            self.metrics.running.set(len(self.runs))

    def _start(self, job: ClaimedJob, hand_back: bool = False) -> None:
        run = JobRun(self, job)
        self.track(run)
        if hand_back:  # claimed by a poll that was in flight when the drain began
            run.hand_back(at_once=True)
        threading.Thread(target=run.run, name=f"job-{job.job_id}", daemon=True).start()

    def finished(self, run: "JobRun") -> None:
        key = (run.job.job_id, run.job.lease_id)
        with self.changed:
            if self.runs.get(key) is run:
                del self.runs[key]
            self.metrics.running.set(len(self.runs))
            self.changed.notify_all()

    # -- results --------------------------------------------------------------------------------

    def _resend_pending(self) -> None:
        for pending in list(self.state.pending()):
            if self.draining.is_set():
                return
            log = self.log.bind(job_id=pending.job_id)
            log.info("result.resending", path=os.path.basename(pending.path or ""))
            self.deliver(pending, log, stop=self.draining)

    def deliver(self, pending: PendingResult, log: Any, stop: threading.Event | None = None,
                replacement: bool = False) -> bool:
        """Send a saved result until the server answers; True when it is settled (accepted, or
        refused for good: the job moved on). Server errors are retried (the heartbeats go on
        meanwhile). A result the server cannot take (413 too large, 400/422 refused) is replaced
        by a failure result that says why, so the job does not wait out its lease and run again
        elsewhere for nothing. A result still unsent when the worker stops stays in the state
        folder."""
        path = os.path.basename(pending.path) if pending.path else None
        try:
            answer = self.client.send_result(pending.job_id, pending.body, stop=stop or self.results_stop)
        except (PayloadTooLarge, BadRequest, InvalidRequest) as exc:
            log.warning("result.refused", status=exc.status, detail=exc.detail)
            self.state.done(pending)
            if replacement:
                return True  # the failure result sent instead was refused too: nothing else to try
            return self._replace_refused(pending, exc, log, stop)
        except (LeaseLost, NotFound) as exc:
            log.warning("result.refused", status=exc.status, detail=exc.detail)
            self.state.done(pending)
            return True
        except (ConnectionFailed, ApiError) as exc:
            with self._lock:
                self.undelivered += 1
            log.error("result.undelivered", error=str(exc), kept=path)
            return False
        self.state.done(pending)
        log.info("result.sent", success=pending.body.get("success"), status=answer.status)
        return True

    def _replace_refused(self, pending: PendingResult, refused: ApiError, log: Any,
                         stop: threading.Event | None) -> bool:
        size = len(json.dumps(pending.body, ensure_ascii=False).encode())
        if isinstance(refused, PayloadTooLarge):
            message = (f"the server refused the result (413): its {size} bytes are more than the server "
                       f"accepts; make the handler's output smaller")
        else:
            message = f"the server refused the result ({refused.status}): {refused.detail}"[:4000]
        body = result_body(success=False, error_message=message, retryable=not isinstance(refused, PayloadTooLarge),
                           lease_id=pending.lease_id, processing_time=pending.body.get("processing_time"))
        return self.deliver(self.save_result(pending.job_id, pending.lease_id, body, log), log, stop, replacement=True)

    def save_result(self, job_id: str, lease_id: str | None, body: dict[str, Any], log: Any) -> PendingResult:
        """The result written to the state folder; when that fails (a full disk), logged, and
        kept in memory only: it is still sent."""
        try:
            return self.state.save(job_id, lease_id, body)
        except OSError as exc:
            log.error("result.not_saved", error=f"{exc.strerror or exc}", state_dir=self.state.root)
            return PendingResult(job_id, lease_id, body, None)

    def release_fallback_noted(self) -> None:
        with self._lock:
            first, self.release_supported = self.release_supported, False
        if first:
            self.log.warning("release.unsupported", detail="this server has no release endpoint; jobs are handed "
                             "back with a retryable failure result instead (they count a retry)")


class JobRun:
    """One claimed job, from download to delivered result, in a thread of its own."""

    def __init__(self, worker: Worker, job: ClaimedJob) -> None:
        self.w = worker
        self.job = job
        self.log = worker.log.bind(job_id=job.job_id, attempt=job.retry_count + 1)
        self.lost = threading.Event()       # 409/404 to a heartbeat: stop, send nothing
        self.release = threading.Event()    # the drain's grace is over: stop and hand the job back
        self.at_once = threading.Event()    # a second signal: no grace for the handler either
        self.halt = threading.Event()       # lost or release: what a download in progress watches
        self.hb_stop = threading.Event()
        self.progress: tuple[float | None, str | None] = (None, None)
        self.proc: HandlerProcess | None = None
        self.claimed_at = time.monotonic()
        self.submitting = False  # a result went to deliver(): from then on it is the result that hands it on
        self.folder = os.path.join(worker.state.work, f"{_safe(job.job_id)}-{random.randrange(16**6):06x}")

    def kill_handler(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def hand_back(self, at_once: bool) -> None:
        if at_once:
            self.at_once.set()
        self.release.set()
        self.halt.set()

    def run(self) -> None:
        heartbeats = threading.Thread(target=self._heartbeats, name=f"hb-{self.job.job_id}", daemon=True)
        try:
            self.log.info("job.claimed", content_type=self.job.content_type, retry_count=self.job.retry_count)
            heartbeats.start()
            outcome = self._work()
            if outcome is not None:
                self._submit(outcome)
        except Exception:
            self.log.exception("job.crashed")
            self._after_crash()
        finally:
            self.hb_stop.set()
            self.w.client.forget_connection()  # one thread per job: its connection goes with it
            shutil.rmtree(self.folder, ignore_errors=True)
            self.w.finished(self)

    def _after_crash(self) -> None:
        """An unexpected error (a full disk, a bug): stop the handler if it still runs and hand
        the job back, so that it does not wait out its lease (unless the lease is gone already,
        or a result was on its way)."""
        try:
            if self.proc is not None and self.proc.running():
                self.proc.stop(0.0 if self.at_once.is_set() else self.w.config.kill_grace)
            if not self.lost.is_set() and not self.submitting:
                self._hand_back()
        except Exception:  # noqa: BLE001 - nothing more can be done here; the lease will lapse
            self.log.exception("job.hand_back_crashed")

    def _stop_reason(self) -> str | None:
        if self.lost.is_set():
            return "lost"
        if self.release.is_set():
            return "release"
        return None

    def _work(self) -> Outcome | None:
        """Download and run the handler; the outcome to send, or None when nothing must be sent."""
        inputs, output = os.path.join(self.folder, "input"), os.path.join(self.folder, "output")
        os.makedirs(inputs)
        os.makedirs(output)
        if self.release.is_set():
            self._hand_back()
            return None
        try:
            source = self.w.client.download(self.job, inputs, stop=self.halt,
                                            on_bytes=self.w.metrics.download_bytes.inc)
        except LeaseLost as exc:
            self.log.warning("job.lease_lost", during="download", detail=exc.detail)
            return None
        except (DownloadStopped, DownloadError, ConnectionFailed, ApiError, OSError) as exc:
            if self._stop_reason():
                self.log.info("job.download_stopped", reason=self._stop_reason(), error=str(exc))
                return self._after_stop()
            self.log.warning("job.download_failed", error=str(exc))
            return Outcome(False, error_message=f"the worker could not download the source: {exc}", retryable=True)
        self.log.info("job.downloaded", bytes=source.size, resumed=source.resumed, digest_checked=source.digest_checked)
        if self._stop_reason():
            return self._after_stop()
        argv = self.w.handler.command(source.path, output, self.job.job_id, self.job.content_type)
        env = dict(os.environ, MORAG_REMOTE_TASK_OPTIONS=json.dumps(self.job.task_options),
                   MORAG_REMOTE_JOB_ID=self.job.job_id, MORAG_REMOTE_CONTENT_TYPE=self.job.content_type,
                   **{HANDLER_MARK: self.w.state.root})
        for secret in ("MORAG_REMOTE_WORKER_KEY",):
            env.pop(secret, None)
        proc = self.proc = HandlerProcess(argv, self.folder, env, self.w.config.max_output, self._on_progress)
        try:
            proc.start()
        except HandlerError as exc:
            self.log.error("handler.start_failed", error=exc.message)
            return Outcome(False, error_message=exc.message, retryable=True)
        self.log.info("handler.started", pid=proc.proc.pid)
        limit = self.w.config.runtime_limit(self.job.content_type)
        code = None
        while code is None:
            code = proc.wait(0.1)
            if code is not None:
                break
            if self._stop_reason():
                grace = 0.0 if self.at_once.is_set() else self.w.config.kill_grace
                code = proc.stop(grace)
                self.log.info("handler.stopped", reason=self._stop_reason(), exit=code)
                return self._after_stop()
            if limit is not None and time.monotonic() - proc.started > limit:
                code = proc.stop(self.w.config.kill_grace)
                self.log.warning("handler.max_runtime", limit=limit)
                return Outcome(False, error_message=f"the handler ran longer than the --max-runtime of "
                               f"{limit:g} s for {self.job.content_type} and was stopped", retryable=True)
        code = proc.finish()
        elapsed = time.monotonic() - proc.started
        self.w.metrics.handler_seconds.labels(content_type=self.job.content_type).observe(elapsed)
        if self.lost.is_set():
            return None
        outcome = proc.outcome(code, output)
        outcome.processing_time = round(elapsed, 3)
        self.log.info("handler.finished", exit=code, success=outcome.success, seconds=round(elapsed, 3))
        return outcome

    def _after_stop(self) -> None:
        if not self.lost.is_set():
            self._hand_back()
        return None

    def _submit(self, outcome: Outcome) -> None:
        self.submitting = True
        body = result_body(success=outcome.success, content=outcome.content, metadata=outcome.metadata,
                           error_message=outcome.error_message, processing_time=outcome.processing_time,
                           retryable=None if outcome.success else outcome.retryable, lease_id=self.job.lease_id)
        pending = self.w.save_result(self.job.job_id, self.job.lease_id, body, self.log)
        if self.w.deliver(pending, self.log):
            self.w.metrics.finished.labels(outcome="success" if outcome.success else "failure").inc()

    def _hand_back(self) -> None:
        """Give the job back so another worker takes it now: release, or on a server without the
        release endpoint a retryable failure (which counts a retry and waits out the backoff)."""
        lease = self.job.lease_id
        if self.w.release_supported:
            try:
                self.w.client.release(self.job.job_id, lease_id=lease)
                self.log.info("job.released")
                self.w.metrics.finished.labels(outcome="released").inc()
                return
            except ReleaseUnsupported:
                self.w.release_fallback_noted()
            except (LeaseLost, NotFound) as exc:
                self.log.info("job.release_refused", detail=exc.detail)
                return
            except (ConnectionFailed, ApiError) as exc:
                self.log.warning("job.release_failed", error=str(exc))
                return
        try:
            self.w.client.result(self.job.job_id, success=False, retryable=True, lease_id=lease,
                                 error_message="handed back: the worker stopped before the job finished",
                                 retry=HANDBACK_RETRY)
            self.log.info("job.released", via="failure_result")
            self.w.metrics.finished.labels(outcome="released").inc()
        except (LeaseLost, NotFound) as exc:
            self.log.info("job.release_refused", detail=exc.detail)
        except (ConnectionFailed, ApiError) as exc:
            self.log.warning("job.release_failed", error=str(exc))

    def _on_progress(self, fraction: float, message: str | None) -> None:
        self.progress = (fraction, message)

    def _heartbeats(self) -> None:
        try:
            self._heartbeat_loop()
        finally:
            self.w.client.forget_connection()

    def _heartbeat_loop(self) -> None:
        # on the monotonic clock: the first from the claim, each next from when the heartbeat
        # before it was sent, by a third of the lease the server's clock says is left
        next_at = self.claimed_at + heartbeat_interval(self.job.timeout_at, server_now=self.job.server_date)
        interval = next_at - self.claimed_at
        while not self.hb_stop.wait(max(0.0, next_at - time.monotonic())):
            sent = time.monotonic()
            fraction, message = self.progress
            try:
                answer = self.w.client.heartbeat(self.job.job_id, lease_id=self.job.lease_id, progress=fraction,
                                                 message=message, worker=self.w.announce, stop=self.hb_stop)
                interval = heartbeat_interval(answer.timeout_at, interval, server_now=answer.server_date)
                next_at = sent + interval
            except (LeaseLost, NotFound) as exc:
                if not self.hb_stop.is_set():
                    self.log.warning("job.lease_lost", during="heartbeat", detail=exc.detail)
                    self.lost.set()
                    self.halt.set()
                return
            except (ConnectionFailed, ApiError) as exc:
                if self.hb_stop.is_set():
                    return
                self.log.warning("heartbeat.failed", error=str(exc))
                interval = max(MIN_HEARTBEAT, interval / 2)
                next_at = time.monotonic() + interval


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:64]
