"""Signing in to the dashboard from a Flask test client, as a browser's form post would."""
from __future__ import annotations

import re
from typing import Any

TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')


def sign_in(client, key: str, **extra: Any):
    page = client.get("/ui/sign-in")
    token = TOKEN.search(page.get_data(as_text=True)).group(1)
    return client.post("/ui/sign-in", data={"csrf_token": token, "api_key": key, **extra})
