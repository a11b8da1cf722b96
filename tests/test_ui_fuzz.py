"""Any query string on any page of the dashboard: never a 500. Hypothesis draws query strings from
the parameters the pages read (filters, cursor, limit, search, the notices' counts, sign-in's
reason and next) and from raw bytes, percent-encoded or not, and sends them signed in as an admin
(and, on the sign-in form, signed out) against real jobs; tests/test_schemathesis.py does the same
for the API from its OpenAPI document."""
from __future__ import annotations

from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.ui import sign_in

pytestmark = pytest.mark.slow

PARAMS = ("status", "content_type", "ingestion_task_id", "worker_id", "limit", "cursor", "q", "done", "n",
          "skipped", "refused", "reason", "next", "scope")
VALUES = st.one_of(
    st.sampled_from(["", "pending", "failed", "audio", "0", "1", "-1", "500", "501", "1e9", "cancel", "retry",
                     "delete", "expired", "forged", "//evil.example", "/ui/jobs", "%00", "\x00", "é", "0190d6a0"]),
    st.text(max_size=80),
    st.text(alphabet="0123456789abcdef-", max_size=70),
)
PAIRS = st.lists(st.tuples(st.one_of(st.sampled_from(PARAMS), st.text(max_size=10)), VALUES), max_size=6)
RAW = st.binary(max_size=120).map(lambda b: quote_from_bytes(b, safe="=&%+;"))
PAGES = ["/ui/", "/ui/overview.part", "/ui/jobs", "/ui/workers", "/ui/sign-in", "/ui/jobs/{job}", "/ui/jobs/{job}/json"]


def _encode(pairs) -> str:
    return "&".join(f"{quote_from_bytes(k.encode('utf-8', 'surrogatepass'))}="
                    f"{quote_from_bytes(v.encode('utf-8', 'surrogatepass'))}" for k, v in pairs)


@pytest.mark.parametrize("path", PAGES)
def test_no_query_string_makes_a_page_fail(path, app, client, keys, producer, worker):
    job_id = producer.create_id()
    producer.create_id(ingestion_task_id="other")
    worker.claim()
    assert sign_in(client, keys["admin"]).status_code == 302
    target = path.format(job=job_id)
    seen: set[int] = set()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(query=st.one_of(PAIRS.map(_encode), RAW))
    def check(query: str) -> None:
        response = client.get(target, environ_overrides={"QUERY_STRING": query})
        assert response.status_code < 500, (query, response.get_data(as_text=True)[:500])
        seen.add(response.status_code)

    check()
    assert 200 in seen  # the page itself answered, not only a redirect to the sign-in form
