"""``GET /health`` under concurrent probes: each probe writes its own file, so threads of one process
(gunicorn's gthread workers) never remove each other's probe and report a writable store as 503."""
from __future__ import annotations

import threading

THREADS = 8
PROBES = 60


def test_concurrent_health_probes_in_one_process_all_answer_200(app):
    statuses: list[int] = []
    start = threading.Barrier(THREADS)

    def probe() -> None:
        client = app.test_client()
        start.wait(30)
        for _ in range(PROBES):
            statuses.append(client.get("/health").status_code)

    threads = [threading.Thread(target=probe) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(thread.is_alive() for thread in threads)
    assert len(statuses) == THREADS * PROBES
    assert set(statuses) == {200}, f"{statuses.count(503)} of {len(statuses)} probes answered 503"
