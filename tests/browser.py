"""Debian's chromium, headless, driven by playwright (never ``playwright install``: the system
browser, as .ci/run installs it), for the report page's tests, its screenshot and its benchmark."""

from __future__ import annotations

import shutil
from typing import Any

# Without the background-networking flags, chromium's own connections (updates, sync, field
# trials) are refused by the closed network and slow every start.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1280, "height": 800}
READY = "html[data-ready='1']"  # the page sets it once its first view is drawn


def chromium_path() -> str | None:
    return shutil.which("chromium")


def launch(playwright: Any) -> Any:
    """A headless chromium; ``chromium_path()`` must have found it."""
    return playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
