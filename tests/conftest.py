"""Shared fixtures: an app on a ``tmp_path`` instance folder with a key per role, a movable clock,
and ``producer`` / ``worker`` helpers that speak the API the way real callers do."""
from __future__ import annotations

import io
import random
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import structlog

from morag_remote import create_app
from morag_remote.context import KEYS, SERVICE
from morag_remote.log import configure_logging
from support import browser as browser_testing
from support import postgres as pg_testing
from support.actions import FakeClock, ProducerActions, WorkerActions, auth
from support.loopback import Loopback


@pytest.fixture
def instance_path(tmp_path: Path) -> Path:
    path = tmp_path / "instance"
    (path / "sources").mkdir(parents=True)
    return path


@pytest.fixture
def app_config() -> dict[str, Any]:
    """Override in a test module to change settings."""
    return {}


@pytest.fixture
def app(instance_path: Path, app_config: dict[str, Any], backend_config: dict[str, Any]):
    config = {"TESTING": True, "INSTANCE_PATH": str(instance_path), "LOG_JSON": True}
    config.update(backend_config)
    config.update(app_config)
    return create_app(config)


@pytest.fixture
def runner(app):
    """Flask's CliRunner for this app: ``runner.invoke(args=["remote-jobs", "list"])``."""
    return app.test_cli_runner()


@pytest.fixture
def service(app):
    return app.extensions[SERVICE]


@pytest.fixture
def clock(service) -> FakeClock:
    fake = FakeClock()
    service.clock = fake
    return fake


@pytest.fixture
def own_minutes(service) -> FakeClock:
    """A clock years ahead, at a minute of this test's own: another test's app flushing its counts
    late (its timer, into the same PostgreSQL schema) cannot land in this test's charts."""
    clock = FakeClock(datetime.now(timezone.utc) + timedelta(days=3650 + random.randrange(10**5)))
    service.clock = clock
    return clock


@pytest.fixture
def loopback():
    """Start loopback HTTP servers that answer with ``respond(handler)``; closed after the test."""
    servers: list[Loopback] = []

    def start(respond) -> Loopback:
        servers.append(Loopback(respond))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def keys(app) -> dict[str, str]:
    """A key per role (and a bound worker key ``w-bound`` for worker id ``bound-worker``)."""
    store = app.extensions[KEYS]
    out = {role: store.create(f"{role}-key", role)[1] for role in ("worker", "producer", "admin")}
    out["worker_bound"] = store.create("w-bound", "worker", worker_id="bound-worker")[1]
    return out


@pytest.fixture
def producer(client, keys, instance_path) -> ProducerActions:
    return ProducerActions(client, keys["producer"], instance_path / "sources")


@pytest.fixture
def worker(client, keys) -> WorkerActions:
    return WorkerActions(client, keys["worker"], "w1")


@pytest.fixture
def worker2(client, keys) -> WorkerActions:
    return WorkerActions(client, keys["worker"], "w2")


@pytest.fixture
def admin_headers(keys) -> dict[str, str]:
    return auth(keys["admin"])


@pytest.fixture
def log_output():
    """Everything logged while the test runs, as rendered: structlog lines and stdlib records.

    It starts after ``app`` (pytest-flask builds the app first): call ``create_app`` in the test to
    see start-up lines.
    """
    configure_logging(json_lines=True)  # no-op when done; it must not replace our factory later
    buffer = io.StringIO()
    saved = structlog.get_config()["logger_factory"]
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(buffer))
    handler = logging.StreamHandler(buffer)
    root = logging.getLogger()
    saved_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        structlog.configure(logger_factory=saved)


# -- backends: every test that builds an app runs against the JSON files and against PostgreSQL ------
# (``@pytest.mark.files_only`` keeps a test that looks at the files themselves on the file store;
# ``@pytest.mark.postgres`` on such a test runs it on PostgreSQL only, for one that looks at the tables)



def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "files_only: runs on the JSON-file store only")
    config.addinivalue_line("markers", "postgres: needs PostgreSQL (MORAG_REMOTE_TEST_DATABASE_URL)")
    config.addinivalue_line("markers", "browser: drives Chromium with Playwright (tests/support/browser.py)")
    config.browser_unavailable = browser_testing.unavailable()
    config.pg_database, config.pg_unavailable = pg_testing.probe()
    cov = config.pluginmanager.getplugin("_cov")
    if config.pg_database is None and cov is not None and cov.cov_controller is not None:
        # those modules cannot run without a server: judge the coverage floor on the rest
        for name in ("cov", "combining_cov"):  # pytest-cov reports through the second
            measured = getattr(cov.cov_controller, name, None)
            if measured is not None:
                measured.config.report_omit = [*(measured.config.report_omit or []), *pg_testing.PG_MODULES]


def pytest_generate_tests(metafunc) -> None:
    if "backend" in metafunc.fixturenames:
        marked = metafunc.definition.get_closest_marker
        backends = ["files"] if marked("files_only") else ["postgres"] if marked("postgres") else ["files", "postgres"]
        metafunc.parametrize("backend", backends, indirect=True)


def _needs_postgres(item) -> bool:
    callspec = getattr(item, "callspec", None)
    return (item.get_closest_marker("postgres") is not None
            or (callspec is not None and callspec.params.get("backend") == "postgres"))


def pytest_collection_modifyitems(config, items) -> None:
    """Without a server, leave the PostgreSQL tests out; without a browser, the browser tests (one
    line each in the summary says so)."""
    if config.browser_unavailable is not None:
        left_out = [item for item in items if item.get_closest_marker("browser") is not None]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [item for item in items if item.get_closest_marker("browser") is None]
        config.browser_left_out = len(left_out)
    if config.pg_database is not None:
        return
    left_out = [item for item in items if _needs_postgres(item)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if not _needs_postgres(item)]
    config.pg_left_out = len(left_out)


def pytest_terminal_summary(terminalreporter, config) -> None:
    if getattr(config, "browser_left_out", 0):
        terminalreporter.write_line(f"{config.browser_left_out} browser tests skipped: {config.browser_unavailable}; "
                                    f"{browser_testing.HOW}", yellow=True)
    if getattr(config, "pg_left_out", 0):
        terminalreporter.write_line(f"{config.pg_left_out} PostgreSQL tests skipped: {config.pg_unavailable}; "
                                    f"{pg_testing.HOW}", yellow=True)


@pytest.fixture(scope="session")
def pg_database(pytestconfig):
    """This run's own schema on the test server, dropped at the end."""
    db = pytestconfig.pg_database
    if db is None:
        pytest.skip(f"PostgreSQL tests skipped: {pytestconfig.pg_unavailable}; {pg_testing.HOW}")
    db.create()
    yield db
    db.drop()


@pytest.fixture
def pg_url(pg_database) -> str:
    """The test database's URL, emptied for this test."""
    pg_database.truncate()
    return pg_database.url


@pytest.fixture
def backend(request) -> str:
    """``files`` or ``postgres`` (parametrized by ``pytest_generate_tests``)."""
    if request.param == "postgres":
        request.getfixturevalue("pg_url")
    return request.param


@pytest.fixture
def backend_config(backend: str, request) -> dict[str, Any]:
    return {"DATABASE_URL": request.getfixturevalue("pg_url")} if backend == "postgres" else {}


@pytest.fixture
def workers():
    """``morag-remote-worker`` subprocesses a test starts (support.workers.WorkerProcess), stopped after it."""
    started: list = []
    yield started
    for w in started:
        w.stop()
