"""Long polls run in-process on threads of their own, against a test's service."""
from __future__ import annotations

import threading


class Waiter:
    """``service.poll(..., wait=)`` on a thread of its own."""

    def __init__(self, service, worker_id: str, types: list[str], wait: float = 20, **kwargs) -> None:
        self.jobs = None
        self.thread = threading.Thread(
            target=lambda: setattr(self, "jobs", service.poll(worker_id, types, wait=wait, **kwargs)), daemon=True)
        self.thread.start()

    def done(self, timeout: float = 30.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the poll did not return"
        return self.jobs


def source_file(instance_path) -> str:
    """A one-byte source inside the test app's source root."""
    path = instance_path / "sources" / "a.mp3"
    path.write_bytes(b"a")
    return str(path)
