"""One PostgreSQL database as a process uses it: a connection pool and one LISTEN thread.

gunicorn loads the app in each worker after the fork, but the test suite, the CLI and
``multiprocessing`` may build an app and then fork: so the pool and the listener are created on
first use and again whenever ``os.getpid()`` changes. A connection inherited from a parent is never
closed by the child (closing it would end the parent's session on the server); the child only lets
go of it.

Every app built in a process for the same URL shares one :class:`Database` (:func:`database`), so a
process holds one pool and one listener connection however many apps it builds.

Long polls: a change that makes a job claimable runs ``NOTIFY`` in its own transaction; the
process's listener thread receives it and wakes every waiting request of the process at once. A
waiting request holds no connection.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
import time
from typing import Any, Iterator
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
import structlog
from psycopg import sql
from psycopg_pool import ConnectionPool, PoolTimeout

from ...exceptions import InvalidRequest, StoreUnavailable
from . import migrate

log = structlog.get_logger(__name__)

CHANNEL = "morag_remote_jobs"
_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_INSTANCES: dict[tuple[int, str, int, float], "Database"] = {}
_INSTANCES_LOCK = threading.Lock()
_INHERITED: list[Any] = []  # pools and connections from a parent process: kept, never closed


def parse_url(url: str) -> tuple[str, str | None]:
    """The libpq URL to connect with, and the schema named by ``?schema=`` (None: the default).

    ``schema`` is this project's parameter (libpq has none): the tables live in that schema, which
    ``db upgrade`` creates. It becomes ``options=-csearch_path=<schema>`` on every connection.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("MORAG_REMOTE_DATABASE_URL must start with postgresql://")
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = None
    kept = []
    for key, value in query:
        if key == "schema":
            schema = value
        else:
            kept.append((key, value))
    if schema is not None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError("the schema parameter must be a plain SQL identifier")
        options = [v for k, v in kept if k == "options"]
        kept = [(k, v) for k, v in kept if k != "options"]
        kept.append(("options", " ".join(options + [f"-csearch_path={schema}"])))
    return urlunsplit(parts._replace(query=urlencode(kept, quote_via=quote))), schema


def url_from_env(env: str, connect_timeout: int = 3) -> tuple[str | None, str]:
    """The URL in the environment variable ``env`` when a server answers there, else None and why
    (never the URL itself: it may hold a password). For the tests and the benchmark, which leave
    PostgreSQL out when it is absent."""
    url = os.environ.get(env)
    if not url:
        return None, f"{env} is not set"
    try:
        psycopg.connect(url, connect_timeout=connect_timeout).close()
    except psycopg.Error as exc:
        return None, f"no PostgreSQL at {env} ({(str(exc).strip().splitlines() or ['unreachable'])[0]})"
    return url, ""


def database(url: str, pool_size: int = 10, timeout: float = 5.0) -> "Database":
    """The process's :class:`Database` for ``url`` (one per process and setting)."""
    key = (os.getpid(), url, pool_size, timeout)
    with _INSTANCES_LOCK:
        db = _INSTANCES.get(key)
        if db is None:
            db = _INSTANCES[key] = Database(url, pool_size, timeout)
        return db


class Database:
    def __init__(self, url: str, pool_size: int = 10, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.conninfo, self.schema = parse_url(url)
        # one channel per schema: deployments (or test runs) sharing a database do not wake each other
        self.channel = CHANNEL if self.schema is None else \
            f"{CHANNEL}_{hashlib.sha256(self.schema.encode()).hexdigest()[:16]}"
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._pool: ConnectionPool | None = None
        self._schema_checked = False
        self._listener: threading.Thread | None = None
        self._changed = threading.Condition()
        self._generation = 0
        self._local = threading.local()
        self._listening = threading.Event()

    # -- connections -------------------------------------------------------------------------------

    def _connect_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"connect_timeout": max(round(self.connect_timeout), 1)}
        if "application_name=" not in self.conninfo:
            kwargs["application_name"] = "morag-remote"
        return kwargs

    def connect(self, autocommit: bool = False) -> psycopg.Connection:
        """A connection of its own (CLI migrations, the listener), not from the pool."""
        return psycopg.connect(self.conninfo, autocommit=autocommit, **self._connect_kwargs())

    def _pool_here(self) -> ConnectionPool:
        pid = os.getpid()
        if self._pool is not None and self._pid == pid:
            return self._pool
        with self._lock:
            if self._pool is not None and self._pid != pid:
                _INHERITED.append(self._pool)  # the parent's: closing it would close its sessions
                self._pool = None
                self._listener = None
                self._listening = threading.Event()
                self._changed = threading.Condition()
                self._schema_checked = False
            if self._pool is None:
                self._pool = ConnectionPool(self.conninfo, kwargs=self._connect_kwargs(), min_size=1,
                                            max_size=self.pool_size, timeout=self.connect_timeout,
                                            name=f"morag-remote-{pid}", open=True,
                                            reconnect_timeout=max(self.connect_timeout * 12, 60.0))
                self._pid = pid
            return self._pool

    def close(self) -> None:
        """Close this process's pool (the listener thread ends with the process)."""
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.close()
            self._pool = None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        """A pooled connection in a transaction: committed when the block ends, rolled back when it
        raises (whatever it raises, which then propagates). Database trouble is StoreUnavailable; text
        that is not UTF-8 (a lone surrogate, which no UTF-8 text holds) is InvalidRequest."""
        try:
            pool = self._pool_here()
            with pool.connection() as conn:
                if not self._schema_checked:
                    self._check_schema(conn)
                yield conn
        except PoolTimeout:
            raise StoreUnavailable("the job database did not answer in time") from None
        except psycopg.errors.ReadOnlySqlTransaction:
            raise StoreUnavailable("the job database is read-only") from None
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no UTF-8 text holds it
            raise InvalidRequest("a value is not valid UTF-8 text, which the database cannot hold") from None
        except psycopg.OperationalError as exc:
            log.error("db.unavailable", error=str(exc).strip().splitlines()[0] if str(exc).strip() else "")
            raise StoreUnavailable("the job database is unavailable") from None

    def _check_schema(self, conn: psycopg.Connection) -> None:
        version = migrate.current_version(conn)
        conn.commit()
        if version < migrate.latest_version():
            raise StoreUnavailable(f"the job database schema is at version {version}, this code needs "
                                   f"{migrate.latest_version()}: run 'flask --app morag_remote db upgrade'")
        self._schema_checked = True

    # -- change notification -----------------------------------------------------------------------

    def notify(self, conn: psycopg.Connection, payload: str) -> None:
        """Queue a wake-up for every host's long polls; sent when ``conn``'s transaction commits."""
        conn.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))

    def mark_seen(self) -> None:
        """Remember, for this thread, the changes it has already looked at (see :meth:`wait`)."""
        self._local.seen = (self._pid, self._generation)

    def wake_local(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def wait(self, timeout: float) -> bool:
        """Block until a change is announced or ``timeout`` passes; True on a change.

        A change announced after this thread last looked (``mark_seen``, called by claims and
        availability checks) but before it started waiting returns at once: no wake-up is lost in
        between.
        """
        self._ensure_listener()
        with self._changed:
            seen = getattr(self._local, "seen", None)
            changed = seen not in (None, (self._pid, self._generation)) or self._changed.wait(timeout)
            self._local.seen = (self._pid, self._generation)
            return changed

    def _ensure_listener(self) -> threading.Event:
        self._pool_here()
        with self._lock:
            if self._listener is None or not self._listener.is_alive():
                self._listener = threading.Thread(target=self._listen, args=(os.getpid(), self._listening),
                                                  name="pg-listener", daemon=True)
                self._listener.start()
            return self._listening

    def ensure_listening(self, timeout: float) -> bool:
        """Start this process's listener if needed and wait until it listens; False if it could not."""
        return self._ensure_listener().wait(timeout)

    def _listen(self, pid: int, listening: threading.Event) -> None:
        delay = 0.1
        while os.getpid() == pid:
            try:
                with self.connect(autocommit=True) as conn:
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    listening.set()
                    self.wake_local()  # whatever happened while not listening: look again
                    delay = 0.1
                    for _ in conn.notifies():
                        self.wake_local()
            except psycopg.Error as exc:
                listening.clear()
                log.warning("db.listener_lost", error=str(exc).strip()[:200], retry_in_s=delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


# -- the schema, for `flask db upgrade` / `db current` ------------------------------------------

def _connect(url: str) -> psycopg.Connection:
    try:
        return Database(url).connect(autocommit=True)
    except psycopg.OperationalError as exc:
        reason = (str(exc).strip().splitlines() or ["no answer"])[-1]
        raise StoreUnavailable(f"cannot connect to the database: {reason}") from None


def upgrade_database(url: str) -> tuple[list[migrate.Migration], int]:
    """``flask db upgrade``: the migrations applied now, and the version the database is at."""
    with _connect(url) as conn:
        applied = migrate.upgrade(conn, parse_url(url)[1])
        return applied, migrate.current_version(conn)


def database_version(url: str) -> int:
    """``flask db current``."""
    with _connect(url) as conn:
        return migrate.current_version(conn)
