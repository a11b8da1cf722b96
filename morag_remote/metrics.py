"""Prometheus metrics: what the queue holds, read from the store at scrape time, and what happened
to jobs, counted where it happens.

- Queue depth by status and content type, the age of the oldest pending job and the number of
  active workers are computed from the store on every scrape (:class:`QueueCollector`), so they are
  right however many gunicorn processes serve the store.
- Counters of claims, completions, failures, re-queues and lease expiries and a histogram of job
  durations are kept by :class:`JobMetrics`, an observer the factory registers on the service
  (``JobService.hooks.observers``): the service says which transition it committed; this module alone
  decides what to count.

Under gunicorn the counters must add up across worker processes: prometheus_client's multiprocess
mode keeps each process's values in memory-mapped files under ``PROMETHEUS_MULTIPROC_DIR`` and the
scrape sums them. That mode is chosen when prometheus_client is first imported, so the variable is
set by ``gunicorn.conf.py`` (default: a folder in ``/dev/shm``) before the app is loaded; without it
(the development server, ``flask`` commands, tests) each app keeps its own registry in memory.

Those files are memory-mapped, and prometheus_client grows them sparse (``truncate``): on a full file
system the first store into a new page raises SIGBUS, which kills the worker. Their default folder
is in shared memory, off the store's disk (``metrics_location.py``), and their pages are allocated
before they are mapped (:class:`PreallocatedMmapedDict`): a full file system then makes a new label
set fail with ENOSPC, which the observer logs (once a minute) and drops; the worker lives on.
"""
from __future__ import annotations

import mmap
import os
import struct
import time
from typing import Any, Iterator

import structlog
from flask import Flask
from prometheus_client import CollectorRegistry, Counter, Histogram, exposition, mmap_dict, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from .context import ARTIFACTS, METRICS, SERVICE, UPLOADS, service
from .exceptions import StoreUnavailable
from .models import STATUSES, Action, RemoteJob

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "morag_remote"

# Jobs are GPU conversions: seconds for a short document, hours for a long video.
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 2700, 3600, 5400, 7200, 14400)

log = structlog.get_logger(__name__)
NOT_RECORDED_LOG_INTERVAL = 60.0  # seconds between two "metrics.not_recorded" warnings of a process


def _allocate(filename: str, length: int) -> None:
    """Give the first ``length`` bytes of the file their blocks (extending it as needed), or raise
    OSError with the file as it was (and no file, if it was new and empty): nothing mapped may lack
    its blocks. Through a descriptor of its own, without O_APPEND, so that where the file system
    cannot fallocate, glibc's emulation (writing each block) can."""
    fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            os.posix_fallocate(fd, 0, max(length, size))
        except OSError:
            if size == 0:  # an empty file is one the scrape cannot read: leave none
                os.unlink(filename)
            else:
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


class PreallocatedMmapedDict(mmap_dict.MmapedDict):
    """prometheus_client's per-process file of values, whose pages all have blocks before they are
    mapped. The original makes room with ``truncate``, a hole a store into the mapping must fill:
    SIGBUS on a full file system. Here a file that cannot get its blocks raises OSError (ENOSPC)
    where room was needed, a new label set, and every value already in the file keeps working."""

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            _allocate(filename, mmap_dict._INITIAL_MMAP_SIZE)
        super().__init__(filename, read_mode)

    def _init_value(self, key: str) -> None:
        encoded = key.encode("utf-8")
        padded = len(encoded) + (8 - (len(encoded) + 4) % 8)  # as the original pads it
        needed = self._used + struct.calcsize(f"i{padded}sdd")
        capacity = self._capacity
        while needed > capacity:
            capacity *= 2
        if capacity > self._capacity:
            _allocate(self._fname, capacity)
            self._m = mmap.mmap(self._f.fileno(), capacity)
            self._capacity = capacity
        super()._init_value(key)  # now within capacity: writes only pages that have their blocks


# prometheus_client's multiprocess values open their files through this name (values.py).
values.MmapedDict = PreallocatedMmapedDict


class JobCounters:
    """The counters and the histogram; one set per registry (or per process in multiprocess mode)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.claims = Counter(f"{PREFIX}_job_claims", "Jobs handed to a worker (one per attempt).",
                              ["content_type"], registry=registry)
        self.completions = Counter(f"{PREFIX}_job_completions", "Success results accepted.",
                                   ["content_type"], registry=registry)
        self.failures = Counter(f"{PREFIX}_job_failures",
                                "Failure results accepted; outcome is requeued (a retry is left) or failed.",
                                ["content_type", "outcome"], registry=registry)
        self.requeues = Counter(f"{PREFIX}_job_requeues",
                                "Jobs put back in the queue; reason is failure, lease_expired, retry "
                                "(an explicit retry by a producer or an operator) or release (the holder "
                                "handed it back).",
                                ["content_type", "reason"], registry=registry)
        self.lease_expiries = Counter(f"{PREFIX}_lease_expiries",
                                      "Leases that lapsed (the worker went silent); outcome is requeued, "
                                      "timeout (no retry left, or on_lapse fail) or held (on_lapse hold).",
                                      ["content_type", "outcome"], registry=registry)
        self.upload_bytes = Counter(f"{PREFIX}_upload_bytes", "Bytes of upload chunks stored (tus PATCH).",
                                    registry=registry)
        self.artifact_bytes = Counter(f"{PREFIX}_artifact_bytes", "Bytes of result artifacts stored.",
                                      registry=registry)
        self.poll_wakeups = Counter(f"{PREFIX}_poll_wakeups", "Waiting long polls woken to claim (about one "
                                    "per claimable job and process that has a waiter for it).", registry=registry)
        self.poll_host_full = Counter(f"{PREFIX}_poll_host_full", "Long polls answered at once, empty, because "
                                      "their process already had its most waiters (X-Poll-Host-Full).",
                                      registry=registry)
        self.duration = Histogram(f"{PREFIX}_job_duration_seconds",
                                  "Time from the claim to the success result of an attempt.",
                                  ["content_type"], buckets=DURATION_BUCKETS, registry=registry)


_process_counters: JobCounters | None = None


def _multiprocess_counters() -> JobCounters:
    """One set per process: two sets would each cache a value and overwrite the other's file."""
    global _process_counters
    if _process_counters is None:
        _process_counters = JobCounters(registry=None)
    return _process_counters


class JobMetrics:
    """The service's observer: turns committed transitions into counter increments."""

    def __init__(self, counters: JobCounters) -> None:
        self.counters = counters
        self._warned_at: float | None = None

    def job_changed(self, action: Action, job: RemoteJob) -> None:
        try:
            self._count(action, job)
        except OSError as exc:  # a new label set's file could not grow (a full file system)
            now = time.monotonic()
            if self._warned_at is None or now - self._warned_at >= NOT_RECORDED_LOG_INTERVAL:
                self._warned_at = now
                log.warning("metrics.not_recorded", action=action.value, error=str(exc),
                            detail="the metrics files have no room; changes go uncounted until they do")

    def _count(self, action: Action, job: RemoteJob) -> None:
        c, ct = self.counters, job.content_type
        if action is Action.CLAIM:
            c.claims.labels(ct).inc()
        elif action is Action.COMPLETE:
            c.completions.labels(ct).inc()
            if job.started_at is not None and job.completed_at is not None:
                c.duration.labels(ct).observe(max((job.completed_at - job.started_at).total_seconds(), 0.0))
        elif action is Action.FAIL_RETRY:
            c.failures.labels(ct, "requeued").inc()
            c.requeues.labels(ct, "failure").inc()
        elif action is Action.FAIL:
            c.failures.labels(ct, "failed").inc()
        elif action is Action.LAPSE_RETRY:
            c.lease_expiries.labels(ct, "requeued").inc()
            c.requeues.labels(ct, "lease_expired").inc()
        elif action is Action.LAPSE:
            c.lease_expiries.labels(ct, "timeout").inc()
        elif action is Action.LAPSE_HOLD:
            c.lease_expiries.labels(ct, "held").inc()
        elif action is Action.RETRY:
            c.requeues.labels(ct, "retry").inc()
        elif action is Action.RELEASE:
            c.requeues.labels(ct, "release").inc()


class QueueCollector:
    """Gauges read from the store when scraped (the store is shared; a process's memory is not)."""

    def __init__(self, content_types: tuple[str, ...]) -> None:
        self.content_types = content_types

    def collect(self) -> Iterator[Metric]:
        body = service().estimates.queue_summary()
        types = sorted(set(self.content_types) | {ct for per in body["counts"].values() for ct in per})
        depth = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs in the store by status and content type.",
                                  labels=["status", "content_type"])
        for status in STATUSES:
            per = body["counts"].get(status, {})
            for ct in types:
                depth.add_metric([status, ct], per.get(ct, 0))
        yield depth
        paused = GaugeMetricFamily(f"{PREFIX}_type_paused",
                                   "1 while the content type is paused (not claimed on any host), else 0.",
                                   labels=["content_type"])
        limits = GaugeMetricFamily(f"{PREFIX}_type_max_processing",
                                   "The fleet-wide limit of the type's jobs processing at once (types with one).",
                                   labels=["content_type"])
        for ct, state in body["types"].items():
            paused.add_metric([ct], 1.0 if state["paused"] else 0.0)
            if state["max_processing"] is not None:
                limits.add_metric([ct], state["max_processing"])
        yield paused
        yield limits
        yield GaugeMetricFamily(f"{PREFIX}_oldest_pending_job_age_seconds",
                                "Age of the oldest pending job (0 when none is pending).",
                                value=body["oldest_pending_age_seconds"] or 0.0)
        yield GaugeMetricFamily(f"{PREFIX}_active_workers",
                                "Workers that claimed or heartbeated within the longest lease.",
                                value=len(body["active_workers"]))
        yield GaugeMetricFamily(f"{PREFIX}_store_writable",
                                "1 when the store takes writes (what /health checks), 0 when it does not "
                                "(a full disk, a read-only database).", value=_writable())


def _writable() -> float:
    try:
        service().store.check_writable()
    except (StoreUnavailable, OSError):
        return 0.0
    return 1.0


class MetricsExporter:
    """Builds the exposition of a scrape: the counters (this process's registry, or every process's
    files in multiprocess mode) and the queue gauges."""

    def __init__(self, content_types: tuple[str, ...], multiprocess_dir: str | None) -> None:
        self.queue = QueueCollector(content_types)
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is None:
            self.registry = CollectorRegistry()
            self.counters = JobCounters(self.registry)
            self.registry.register(self.queue)
        else:
            self.registry = None
            self.counters = _multiprocess_counters()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for, and its content type."""
        registry = self.registry
        if registry is None:  # read every process's files now: workers come and go
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)
            registry.register(self.queue)
        try:
            encoder, content_type = exposition.choose_encoder(accept or "")
        except (TypeError, ValueError):  # a version parameter it cannot compare ("version=abc")
            encoder, content_type = exposition.choose_encoder("")
        return encoder(registry), content_type


def multiprocess_dir() -> str | None:
    """The directory of multiprocess mode, when that mode is on (see the module docstring)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    if not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus_client was imported before the variable was set: its values live in memory
        # only, so the files would be empty. Count in this process rather than count nothing.
        log.warning("metrics.multiprocess_unavailable", detail=f"{MULTIPROC_ENV} was set after "
                    "prometheus_client was imported; counting in this process only")
        return None
    os.makedirs(path, exist_ok=True)
    return path


def init_metrics(app: Flask) -> MetricsExporter:
    """Build this app's exporter and register its counters on the service as an observer."""
    exporter = MetricsExporter(tuple(app.config["CONTENT_TYPES"]), multiprocess_dir())
    service = app.extensions[SERVICE]
    service.hooks.observers.append(JobMetrics(exporter.counters))
    service.polls.on_wake = exporter.counters.poll_wakeups.inc
    service.polls.on_full = exporter.counters.poll_host_full.inc
    if UPLOADS in app.extensions:
        app.extensions[UPLOADS].count_bytes = exporter.counters.upload_bytes.inc
        app.extensions[ARTIFACTS].count_bytes = exporter.counters.artifact_bytes.inc
    app.extensions[METRICS] = exporter
    return exporter


def is_public(value: Any) -> bool:
    """``METRICS_PUBLIC`` as a flag: only an explicit yes opens /metrics ("no" must not)."""
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return isinstance(value, (bool, int)) and bool(value)
