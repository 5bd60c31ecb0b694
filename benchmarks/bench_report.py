"""The report page at the scale users have: 50,000 rows, 2,000 queries of 25 candidates.

    python benchmarks/bench_report.py                 # 2,000 queries x 25, over 20,000 images
    python benchmarks/bench_report.py --queries 200   # smaller
    python benchmarks/bench_report.py --thumbnails 2000  # also --embed-thumbnails: 2,000 local photos

write:  `clipserve report` as a user runs it (a fresh process, the scored JSONL and the images
        file in), wall seconds; and the page's size.
open:   a fresh chromium page on the file:// URL until the page's ready mark (the table of every
        query drawn, the first query's images laid out): wall seconds from goto, and the page's
        own performance mark (from navigation start). Image URLs are https://example.org/...,
        refused by a route: the page's time, not the network's.
thumbnails: (--thumbnails N) `report --embed-thumbnails` over N local files, each a copy of one
        of scikit-learn's two sample photos (640x427 JPEGs): write seconds, page size, open seconds.
click:  opening one query (its 25 images), sorting the table by RR, filtering it by text:
        milliseconds, in the page.
Best of 3 for each, interleaved. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.browser import READY, VIEWPORT, launch  # noqa: E402
from tests.report_data import make_benchmark  # noqa: E402

ROUNDS = 3
CLICKS = """async () => {
  const t = [];
  const frame = () => new Promise(r => requestAnimationFrame(() => setTimeout(r, 0)));
  let s = performance.now(); document.querySelectorAll('#queries tbody tr')[7].click();
  await frame(); t.push(performance.now() - s);
  s = performance.now(); document.querySelector('#queries th[data-sort=rr]').click();
  await frame(); t.push(performance.now() - s);
  const f = document.querySelector('#filter'); f.value = 'smoke';
  s = performance.now(); f.dispatchEvent(new Event('input'));
  await new Promise(r => setTimeout(r, 61)); await frame(); t.push(performance.now() - s - 60);
  return t;
}"""


def write_page(scored: Path, images: Path, out: Path, *extra: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "clipserve.cli", "report", str(scored), "--images", str(images), "-o", str(out), *extra],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - started


def open_page(browser, page_file: Path) -> tuple[float, float, list[float]]:
    context = browser.new_context(viewport=VIEWPORT)
    context.route(lambda url: not url.startswith(("file://", "data:")), lambda route: route.abort())
    page = context.new_page()
    started = time.perf_counter()
    page.goto(page_file.as_uri())
    page.wait_for_selector(READY, timeout=120_000)
    wall = time.perf_counter() - started
    mark = page.evaluate("performance.getEntriesByName('report-ready')[0].startTime") / 1000
    clicks = page.evaluate(CLICKS)
    context.close()
    return wall, mark, clicks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--per-query", type=int, default=25)
    parser.add_argument("--images", type=int, default=20000, help="distinct images (they recur across queries)")
    parser.add_argument(
        "--thumbnails", type=int, default=0, help="also time --embed-thumbnails over this many real local images"
    )
    args = parser.parse_args()
    import sklearn.datasets as sklearn_images
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder_name:
        folder = Path(folder_name)
        bench = make_benchmark(
            folder / "big", queries=args.queries, per_query=args.per_query, pool=args.images, write_images=False
        )
        lines = bench.images.read_text(encoding="utf-8").splitlines()
        remote = [json.loads(line) for line in lines]
        for row in remote:
            row["image_url"] = f"https://example.org/FireBench/images/{row['image_id']}.jpg"
        bench.images.write_text("".join(json.dumps(row) + "\n" for row in remote), encoding="utf-8")
        page_file = folder / "big.html"
        result: dict = {
            "rows": len(bench.rows),
            "queries": args.queries,
            "images": args.images,
            "load": os.getloadavg(),
        }
        writes, walls, marks, clicks = [], [], [], []
        with sync_playwright() as playwright:
            browser = launch(playwright)
            for _ in range(ROUNDS):  # interleaved: write, then open, each round
                writes.append(write_page(bench.scored, bench.images, page_file))
                wall, mark, click = open_page(browser, page_file)
                walls.append(wall)
                marks.append(mark)
                clicks.append(click)
            result.update(
                write_s=round(min(writes), 2),
                page_mb=round(page_file.stat().st_size / 1e6, 2),
                open_s=round(min(walls), 2),
                ready_mark_s=round(min(marks), 2),
                open_query_ms=round(min(c[0] for c in clicks), 1),
                sort_ms=round(min(c[1] for c in clicks), 1),
                filter_ms=round(min(c[2] for c in clicks), 1),
            )
            if args.thumbnails:
                small = make_benchmark(
                    folder / "thumbs", queries=max(1, args.thumbnails // 25), per_query=25, pool=args.thumbnails
                )
                photos = [
                    Path(sklearn_images.__file__).parent / "images" / name for name in ("china.jpg", "flower.jpg")
                ]
                for i, row in enumerate(
                    json.loads(line) for line in small.images.read_text(encoding="utf-8").splitlines()
                ):
                    shutil.copyfile(photos[i % 2], row["image_url"])  # real photos (640x427), not the drawings
                thumbs_page = folder / "thumbs.html"
                result["thumbnails"] = {
                    "images": args.thumbnails,
                    "write_s": round(
                        min(
                            write_page(small.scored, small.images, thumbs_page, "--embed-thumbnails")
                            for _ in range(ROUNDS)
                        ),
                        2,
                    ),
                    "page_mb": round(thumbs_page.stat().st_size / 1e6, 2),
                    "open_s": round(min(open_page(browser, thumbs_page)[0] for _ in range(ROUNDS)), 2),
                }
            browser.close()
    result["load_after"] = os.getloadavg()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
