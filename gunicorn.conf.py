"""gunicorn settings for morag-remote in production: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Worker class ``gthread``: most requests are short, but two kinds hold a connection for long while
doing little: long polls (up to POLL_MAX_WAIT_SECONDS, sleeping on a condition variable) and
source downloads (streamed for as long as a remote worker's network takes). A thread per request
is cheap for both; ``sync`` workers would let a handful of long polls starve the API, and the async
classes (gevent, eventlet) would stall a whole process whenever a thread waits on the store's
``flock``, which is a blocking system call that no event loop can interleave. Each process runs
THREADS threads; the app lets at most POLL_MAX_WAITERS of them wait in long polls, so short
requests and downloads always find one. gthread answers gunicorn's liveness check from its main
loop, so a long request never looks like a hung worker.

Capacity (defaults: WEB_CONCURRENCY processes x GUNICORN_THREADS=1056 threads), sized for a
thousand workers long-polling one host:
- each process runs at most GUNICORN_THREADS requests at once; of these, at most
  MORAG_REMOTE_POLL_MAX_WAITERS (default here: threads - POLL_RESERVED_THREADS = 1024) may be long
  polls that wait, so at least 32 threads per process are always free for everything else (creates,
  results, heartbeats, downloads, status); a long poll beyond the cap does not wait: it answers at
  once, empty, with ``X-Poll-Host-Full: true`` (logged as ``poll.waiters_full``, counted in
  ``morag_remote_poll_host_full_total``), and the project's worker backs off before it polls again;
- one process alone holds 1,024 waiting polls because the kernel does not spread connections
  between processes: they share one listening socket and whichever process is awake first accepts
  (measured: 1,000 long-polling connections on 2 processes landed 1,000 / 0). So 1,000 workers all
  wait however they land, and short requests still find a thread in each process;
- worker_connections (connections a process keeps open, idle keep-alive ones included) is the
  thread count plus 128, and the open-file limit is raised to fit it (the soft limit up to the
  hard one: a common default of 1,024 files would refuse connections first);
- an idle waiting poll costs a sleeping thread (about 45 KiB of RSS: 2 processes with 1,000 waiting
  used 165 MiB in all, 121 MiB before) and no wake-ups of its own: one dispatcher thread per process
  watches every waiter's socket for a hang-up (select.poll) and wakes only as many waiters as there
  are jobs they can take (service/polling.py). 1,000 idle waiters cost the host about 10% of a core,
  most of it their re-polls every 20 s (README, "Performance"); the rate of short requests is bounded by the job store (its lock and
  fsyncs) and by CPU, not by the thread count.
Raise GUNICORN_THREADS (and with it the waiter cap) with the number of workers that long-poll.

Worker count: WEB_CONCURRENCY, else one process per core (at least 2, so one process rebuilding
its catalog or paused never stops the service). Every write to the JSON store takes one lock, so
processes beyond the core count add memory (each keeps its own catalog) without adding throughput.
Measured on 2 cores (make bench's full cycles, 16 clients): 1 process 80-120 cycles/s (one GIL for
every request, whose threads then contend for it: twice the system time), 2 processes 160-171,
3 and 4 no better (112-154, each change being read again by every other process).

CPU placement (``morag_remote/cpu_placement.py``, the pre_fork and post_fork hooks): each worker
process runs on a CPU of its own (MORAG_REMOTE_PIN_WORKERS, default true), so that a process's
threads hand the GIL to each other on one core and the thread holding the store lock is not left
waiting for a core while its siblings run on both. Measured on 2 cores (make bench's full cycles,
4 runs each, alternated): 84 cycles/s unpinned (75-95, the machine 80% busy) -> 120 pinned
(111-141, 96-98% busy), and 13.3 instead of 16 ms of server CPU per cycle. With more workers than CPUs, workers share CPUs evenly. Turn it off where
the CPUs a process may use change under it (some container runtimes).

Logs: JSON lines through structlog (``morag_remote.gunicorn_log.JsonLogger``). gunicorn writes the
access line (``http.access``) after the last byte is sent, so a download's line has its real
duration and size (hence ``sendfile = False``), and the app adds its request id, worker id and
job id to it. The app's own per-request line is switched off (MORAG_REMOTE_REQUEST_LOG=false), so
each request is logged once, by the only party that knows when its body was fully sent.

Metrics: prometheus_client's multiprocess mode sums the counters of every worker process from
memory-mapped files in PROMETHEUS_MULTIPROC_DIR. Default: a private folder in a RAM file system
(``/dev/shm/morag-remote-<uid>-<hash of the instance folder>``, see ``morag_remote/metrics_location.py``),
not ``<instance>``: on a full disk a mapped page with no block behind it kills the worker that
touches it (SIGBUS). The variable is set here, before any worker imports prometheus_client (which
reads it once, on import); the directory is made (0700) and emptied when gunicorn starts, emptied
again when it exits, and a dead worker's files are marked in ``child_exit``.
"""
import os
import resource

from morag_remote import metrics_location
from morag_remote.cpu_placement import post_fork, pre_fork  # noqa: F401 (gunicorn hooks)


def _instance_path() -> str:
    """The app's instance folder, found without importing the app (see Metrics above)."""
    configured = os.environ.get("MORAG_REMOTE_INSTANCE_PATH")
    if configured:
        return os.path.abspath(configured)
    from flask import Flask

    return Flask("morag_remote").instance_path


_instance = _instance_path()
_metrics_default = metrics_location.default_dir(_instance)
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", _metrics_default)
os.environ.setdefault("MORAG_REMOTE_REQUEST_LOG", "false")

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY") or max(os.cpu_count() or 1, 2))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "1056"))
POLL_RESERVED_THREADS = 32  # threads per process that long polls may never take
# The app reads its waiter cap from the environment; derive it from the thread count unless set.
os.environ.setdefault("MORAG_REMOTE_POLL_MAX_WAITERS", str(max(threads - POLL_RESERVED_THREADS, 1)))
worker_connections = threads + 128  # every thread busy, and idle keep-alive connections still accepted


def _raise_open_files(needed: int) -> None:
    """The soft open-file limit up to ``needed`` (connections and every worker's files), within the
    hard limit; the workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


_raise_open_files(worker_connections + 1024)
timeout = 60            # a worker whose main loop is silent this long is restarted
# On SIGTERM/HUP, requests in flight get this long: more than the longest long poll (20 s); a
# download still running after it is cut, and the worker resumes it with a Range request.
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "30"))
keepalive = 5
max_requests = 0        # no recycling: a new process re-reads the whole store into its catalog
preload_app = False     # each worker builds its own app (and store catalog) after the fork
logger_class = "morag_remote.gunicorn_log.JsonLogger"
accesslog = "-"         # stdout; gunicorn's own messages go to stderr
errorlog = "-"
# gunicorn counts no bytes sent with sendfile(2), so a download cut short could not be told from a
# complete one in the access log. Downloads are bound by the remote worker's network, not the copy.
sendfile = False
# gunicornc's socket: one per instance (the default, in $HOME, is shared by every gunicorn of the user)
control_socket = os.path.join(_instance, "gunicorn.ctl")


def on_starting(server):
    """Make the metrics directory and empty it: files of a previous run would be added to this
    run's counts. Our default folder in shared memory must be ours alone; if it is not, the files
    go under the instance folder (the workers, forked after this, inherit the variable)."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    if path == _metrics_default and path != metrics_location.fallback_dir(_instance):
        refused = metrics_location.make_private_dir(path)
        if refused:
            path = os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_location.fallback_dir(_instance)
            server.log.warning("metrics files in %s instead: %s", path, refused)
    os.makedirs(path, exist_ok=True)
    metrics_location.remove_files(path)


_exited_workers: set[int] = set()


def child_exit(server, worker):
    """A worker is gone: drop its live gauges (its counters stay, summed into the totals)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    _exited_workers.add(worker.pid)


def on_exit(server):
    """The counters end with the server: remove its workers' files (they take memory in /dev/shm),
    and only theirs (during a binary upgrade, the new master's workers use the same folder)."""
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    metrics_location.remove_files(path, pids=_exited_workers | set(getattr(server, "WORKERS", ())))
    if path == _metrics_default:
        try:
            os.rmdir(path)
        except OSError:  # not empty (files of another master's workers) or already gone
            pass


def post_worker_init(worker):
    """Build the job store's catalog, its pending jobs ready to claim, before the worker takes its
    first request: with a large backlog that takes seconds, which the first poll after a (re)start
    would otherwise wait for.
    The build holds no lock that writers need (the folders are scanned without it, then the catalog
    catches up from the journal under a short hold), so the other workers' writes go on meanwhile,
    even when this one is stopped half-way (README, "Performance")."""
    from morag_remote.context import SERVICE

    try:
        worker.wsgi.extensions[SERVICE].warm_up()
    except Exception as exc:  # the app reports a broken store itself (/health answers 503)
        # with where it failed: the traceback is a field of this one JSON line (gunicorn_log.py)
        worker.log.warning("store warm-up failed: %s", exc, exc_info=True)
