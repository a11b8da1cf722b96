"""Where gunicorn's workers keep prometheus_client's multiprocess files: in memory, off the store's disk.

prometheus_client memory-maps those files (``PROMETHEUS_MULTIPROC_DIR``) and writes a counter by
storing into the mapping. On a full file system, touching a page that has no block behind it
raises SIGBUS and kills the gunicorn worker, whatever request it was serving. So by default the
files live in a RAM file system (``/dev/shm``, else ``$XDG_RUNTIME_DIR``), never on the instance
folder's disk, which the job store fills; and their pages are allocated before they are mapped
(``metrics.PreallocatedMmapedDict``), so that even a full RAM file system refuses a new counter
instead of killing the worker.

The folder is ``morag-remote-<uid>-<hash of the instance folder>``: one per instance and user, made
mode 0700 by gunicorn's master at start (``gunicorn.conf.py``'s ``on_starting``), which also
empties it of a previous run's files (and removes its workers' files on exit: they take memory). A folder of that
name that is not a directory of ours, private to us, is not used (another user could have made it
in the world-writable ``/dev/shm``): the files then go to ``<instance>/prometheus``, as before, and
the master says so in its log.

Imported by ``gunicorn.conf.py`` in the master before any worker exists: it must not import
prometheus_client (which reads ``PROMETHEUS_MULTIPROC_DIR`` once, on import).
"""
from __future__ import annotations

import glob
import hashlib
import os
import stat

MEMORY_BASES = ("/dev/shm",)  # then $XDG_RUNTIME_DIR
PREFIX = "morag-remote"


def fallback_dir(instance: str) -> str:
    return os.path.join(instance, "prometheus")


def _memory_base() -> str | None:
    for base in (*MEMORY_BASES, os.environ.get("XDG_RUNTIME_DIR") or ""):
        if base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
            return base
    return None


def default_dir(instance: str) -> str:
    """The folder for ``instance``'s metrics files: in a RAM file system when there is one."""
    base = _memory_base()
    if base is None:
        return fallback_dir(instance)
    digest = hashlib.sha256(os.path.abspath(instance).encode()).hexdigest()[:16]
    return os.path.join(base, f"{PREFIX}-{os.getuid()}-{digest}")


def make_private_dir(path: str) -> str | None:
    """Create ``path`` mode 0700, or accept it if it is already a directory of ours that no one else
    may enter; else the reason it cannot be used."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot create {path}: {exc.strerror}"
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        return f"{path} exists and is not a directory"
    if info.st_uid != os.getuid():
        return f"{path} belongs to uid {info.st_uid}"
    if info.st_mode & 0o077:
        return f"{path} is open to other users (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def remove_files(path: str, pids: set[int] | None = None) -> None:
    """Remove the metrics files (``<kind>_<pid>.db``) in ``path``, and nothing else; only those of
    ``pids`` when given."""
    for name in glob.glob(os.path.join(glob.escape(path), "*.db")):
        if pids is not None and os.path.basename(name)[:-3].rsplit("_", 1)[-1] not in {str(p) for p in pids}:
            continue
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
