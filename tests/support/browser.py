"""The browser tests' Chromium: Debian's (``apt-get install chromium``, which ``.ci/run`` does when
it is absent) driven by Playwright for Python; Playwright's own browser downloads are never used.
Without the browser or the package, the browser tests are left out and the summary says so in one
line, as for PostgreSQL."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

CHROMIUM = os.environ.get("MORAG_REMOTE_TEST_CHROMIUM", "/usr/bin/chromium")
HOW = "install it with 'apt-get install chromium' (.ci/run does) to run them"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "screenshots"


def unavailable() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (make install)"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no browser at {CHROMIUM}"
    return None


def screenshot(page, name: str) -> Path:
    """The page as the reviewer would see it, in screenshots/ (ignored by git)."""
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
