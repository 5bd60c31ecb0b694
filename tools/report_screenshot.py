"""Screenshots of the report page on the tests' synthetic benchmark (tests/report_data.py):
the one tests/test_report.py compares against (tests/data/report_screenshot.png, the page as it
opens) and the documentation's (docs/report.png, the planted pair's query, opened from the
disagreements). Needs chromium and playwright (the dev extra): `python tools/report_screenshot.py`."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import READY, VIEWPORT, launch  # noqa: E402
from tests.report_data import make_benchmark  # noqa: E402

SETTLE = "Promise.all([...document.images].map(i => i.decode().catch(() => null)))"


def main() -> int:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder:
        bench = make_benchmark(Path(folder))
        page_file = Path(folder) / "report.html"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "clipserve.cli",
                "report",
                str(bench.scored),
                "--images",
                str(bench.images),
                "-o",
                str(page_file),
                "--embed-thumbnails",
            ],
            check=True,
        )
        with sync_playwright() as playwright:
            browser = launch(playwright)
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(page_file.as_uri())
            page.wait_for_selector(READY)
            page.evaluate(SETTLE)
            page.screenshot(path=str(ROOT / "tests" / "data" / "report_screenshot.png"))
            page.click("nav button[data-view=disagreements]")
            page.locator("#disagreements tbody tr").first.click()
            page.evaluate(SETTLE)
            page.screenshot(path=str(ROOT / "docs" / "report.png"))
            browser.close()
    print("wrote tests/data/report_screenshot.png and docs/report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
