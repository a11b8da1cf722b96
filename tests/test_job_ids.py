"""Job ids are UUIDv7: unique, and in creation order within a process even inside one millisecond
(the list cursor and the claim tie-break rely on it)."""
from __future__ import annotations

import time
import uuid

from morag_remote.models import new_job_id


def test_ids_made_in_a_tight_loop_sort_in_creation_order():
    ids = [new_job_id() for _ in range(5000)]  # many share a millisecond
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_are_rfc9562_version_7():
    parsed = uuid.UUID(new_job_id())
    assert parsed.version == 7 and parsed.variant == uuid.RFC_4122


def test_ids_carry_the_creation_millisecond():
    """Never earlier than the clock; later only by what a burst borrowed (a few ms at most)."""
    before = time.time_ns() // 1_000_000
    ms = uuid.UUID(new_job_id()).int >> 80
    after = time.time_ns() // 1_000_000
    assert before <= ms <= after + 100
