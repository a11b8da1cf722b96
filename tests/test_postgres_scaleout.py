"""Several processes and several API hosts on one database: each job is handed out exactly once, and
a long poll on one host is woken by a job created through another."""
from __future__ import annotations

import collections
import multiprocessing
import secrets
import threading
import time

import psycopg
import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from support import postgres as pg_testing
from morag_remote.store.postgres.keys import PostgresKeyStore
from morag_remote.store.postgres.db import database
from morag_remote.store.postgres.jobs import PostgresJobStore
from test_store_contract import job

pytestmark = [pytest.mark.postgres, pytest.mark.slow]


def test_eight_processes_claim_a_thousand_jobs_each_exactly_once(pg_url):
    store = PostgresJobStore(database(pg_url))
    ids = {store.create(job()).id for _ in range(1000)}
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=pg_testing.claim_until_empty, args=(pg_url, f"w{i}", start, out))
             for i in range(8)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    claims = [(worker, job_id) for worker, got in results for job_id in got]
    assert sorted(job_id for _, job_id in claims) == sorted(ids)  # all of them, none twice
    assert sum(1 for _, got in results if got) > 1  # the processes did compete
    for worker, job_id in claims:
        stored = store.get(job_id)
        assert (stored.status, stored.worker_id, stored.attempt) == ("processing", worker, 1)


@pytest.fixture(scope="module")
def cluster(pg_database, tmp_path_factory):
    """Two API hosts (gunicorn, two workers each) on one database, and keys made on neither."""
    pg_database.truncate()
    root = tmp_path_factory.mktemp("cluster")
    sources = root / "sources"
    sources.mkdir()
    secret = secrets.token_hex(32)  # shared: a download token issued by one host is good on the other
    keys = PostgresKeyStore(database(pg_database.url))
    cluster = {"producer": keys.create("producer", "producer")[1], "worker": keys.create("worker", "worker")[1],
               "sources": sources, "url": pg_database.url, "root": root, "secret": secret}
    hosts = [pg_testing.Host(name, pg_database.url, str(root / name), str(sources), secret) for name in "ab"]
    try:
        for host in hosts:
            host.wait_ready()
        cluster["hosts"] = hosts
        yield cluster
    finally:
        for host in hosts:
            host.stop()


def _create(base: str, cluster: dict, n: int) -> str:
    path = cluster["sources"] / f"in-{n}.bin"
    path.write_bytes(b"audio" * 10)
    r = requests.post(f"{base}/api/v1/remote-jobs/", headers={"Authorization": f"Bearer {cluster['producer']}"},
                      json={"source_file_path": str(path), "content_type": "audio", "ingestion_task_id": f"t{n}"},
                      timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["job_id"]


def worker_session() -> requests.Session:
    """A polling worker's HTTP session. Its connection to one host idles while it long-polls the
    other, and gunicorn closes a connection idle for its keepalive (5 s): a request sent at that
    moment meets a closed connection before any answer, and is sent again on a new one (GET and
    PUT only), as a worker's HTTP client must."""
    session = requests.Session()
    retry = Retry(total=2, connect=2, read=1, status=0, allowed_methods=frozenset({"GET", "PUT"}),
                  raise_on_status=False)
    session.mount("http://", HTTPAdapter(max_retries=retry))
    return session


def test_sixteen_pollers_on_two_hosts_claim_every_job_exactly_once(cluster):
    hosts = [h.base for h in cluster["hosts"]]
    total = 240
    worker_auth = {"Authorization": f"Bearer {cluster['worker']}"}
    created: list[str] = []
    claims: list[tuple[str, str]] = []
    lock = threading.Lock()
    done = threading.Event()
    deadline = time.monotonic() + 120

    def producer() -> None:
        for n in range(total):
            created.append(_create(hosts[n % 2], cluster, n))

    def poller(i: int) -> None:
        session = worker_session()
        mine, other = hosts[i % 2], hosts[(i + 1) % 2]
        while not done.is_set() and time.monotonic() < deadline:
            r = session.get(f"{mine}/api/v1/remote-jobs/poll", headers=worker_auth, timeout=30,
                            params={"worker_id": f"p{i}", "content_types": "audio", "max_jobs": 1 + i % 3, "wait": 2})
            assert r.status_code == 200, r.text
            for claimed in r.json()["jobs"]:
                with lock:
                    claims.append((f"p{i}", claimed["job_id"]))
                    if len(claims) >= total:
                        done.set()
                # download and report on the other host: any host serves any request
                got = session.get(other + claimed["source_file_url"], headers=worker_auth, timeout=10)
                assert got.status_code == 200 and got.content == b"audio" * 10
                result = session.put(f"{other}/api/v1/remote-jobs/{claimed['job_id']}/result", headers=worker_auth,
                                     json={"success": True, "content": claimed["job_id"], "lease_id": claimed["lease_id"]},
                                     timeout=10)
                assert result.status_code == 200, result.text

    errors: list[BaseException] = []

    def run(fn, *args) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # surfaced below, with the others stopped
            errors.append(exc)
            done.set()

    threads = [threading.Thread(target=run, args=(poller, i)) for i in range(16)]
    threads.append(threading.Thread(target=run, args=(producer,)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert not errors, errors
    assert len(created) == total
    assert sorted(job_id for _, job_id in claims) == sorted(created)  # each exactly once
    assert len({worker for worker, _ in claims}) > 2
    store = PostgresJobStore(database(cluster["url"]))
    by_id = dict((job_id, worker) for worker, job_id in claims)
    for job_id in created:
        stored = store.get(job_id)
        assert (stored.status, stored.attempt, stored.worker_id) == ("completed", 1, by_id[job_id])
        assert stored.result_data["content"] == job_id


def _listening(url: str, application_name: str) -> bool:
    with psycopg.connect(url.split("?")[0], autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                            "AND query LIKE 'LISTEN%%'", (application_name,)).fetchone()[0] > 0


def test_a_long_poll_on_one_host_gets_a_job_created_through_another(cluster):
    name = f"mr-host-c-{secrets.token_hex(3)}"
    url = f"{cluster['url']}&application_name={name}"
    host_c = pg_testing.Host("c", url, str(cluster["root"] / "c"), str(cluster["sources"]), cluster["secret"],
                             workers=1)
    try:
        host_c.wait_ready()
        box = collections.deque()
        started = time.monotonic()

        def long_poll() -> None:
            r = requests.get(f"{host_c.base}/api/v1/remote-jobs/poll", timeout=40,
                             headers={"Authorization": f"Bearer {cluster['worker']}"},
                             params={"worker_id": "lp", "content_types": "video", "wait": 20})
            box.append((r.status_code, r.json(), time.monotonic() - started))

        poll = threading.Thread(target=long_poll)
        poll.start()
        # host C's only process starts listening when its first long poll begins to wait
        for _ in range(300):
            if _listening(cluster["url"], name) or not poll.is_alive():
                break
            time.sleep(0.05)  # nothing to block on: the signal is a row in pg_stat_activity
        assert poll.is_alive(), box
        path = cluster["sources"] / "video.bin"
        path.write_bytes(b"v")
        r = requests.post(f"{cluster['hosts'][0].base}/api/v1/remote-jobs/",
                          headers={"Authorization": f"Bearer {cluster['producer']}"}, timeout=10,
                          json={"source_file_path": str(path), "content_type": "video", "ingestion_task_id": "x"})
        assert r.status_code == 201
        poll.join(40)
        status, body, elapsed = box.popleft()
        assert status == 200
        assert body["job_id"] == r.json()["job_id"]  # it arrived before the 20 s wait ended
        print(f"cross-host wake-up: job answered {elapsed:.3f} s after the poll began")
    finally:
        host_c.stop()
