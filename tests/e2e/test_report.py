"""`clipserve report`: a scored benchmark as one self-contained page, checked in a real chromium.

The figures on the page are scikit-learn's (NDCG) and imsearch_eval's (reciprocal rank) on the
test's data; every query is there; the planted mislabelled pair tops the disagreements; the page
works from a file:// URL with the network off; and it looks like the stored screenshot (loosely).
"""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops, ImageStat
from playwright.sync_api import expect, sync_playwright
from sklearn.metrics import ndcg_score

from clipserve.report import metrics
from clipserve.report.data import ReportJob, read_scored, report_settings_from_config
from clipserve.report.page import payload
from clipserve.report.thumbnails import THUMBNAIL_PX, make_thumbnails

from ..browser import READY, VIEWPORT, chromium_path, launch
from ..report_data import Benchmark, make_benchmark
from ..test_packaging import BLOCK_TORCH

pytestmark = pytest.mark.cost(1.5)  # its CPU cost among the files (tests/conftest.py)

STORED_SCREENSHOT = Path(__file__).parent.parent / "data" / "report_screenshot.png"


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipserve.cli", "report", *args], capture_output=True, text=True, timeout=120
    )


def expected(bench: Benchmark) -> dict[str, tuple[float, float, int]]:
    """Each query's (NDCG, RR, relevant images) by the reference code: sklearn's ndcg_score over
    the scored candidates, and imsearch_eval's compute_reciprocal_rank (first label > 0)."""
    by_query: dict[str, list[tuple[float, int]]] = {}
    for row in bench.rows:
        if row["clip_score"] is not None:
            by_query.setdefault(row["query_id"], []).append((row["clip_score"], row["relevance_label"]))
    figures = {}
    for query, pairs in by_query.items():
        scores, labels = [s for s, _ in pairs], [g for _, g in pairs]
        ranked = sorted(pairs, key=lambda p: -p[0])
        rr = next((1 / rank for rank, (_, label) in enumerate(ranked, 1) if label > 0), 0.0)
        figures[query] = (float(ndcg_score([labels], [scores])), rr, sum(1 for g in labels if g > 0))
    return figures


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Benchmark:
    return make_benchmark(tmp_path_factory.mktemp("report"))


@pytest.fixture(scope="module")
def page_file(bench: Benchmark) -> Path:
    """The page as a user makes it, thumbnails embedded (so it travels alone)."""
    out = bench.scored.with_name("report.html")
    done = report(str(bench.scored), "--images", str(bench.images), "-o", str(out), "--embed-thumbnails")
    assert done.returncode == 0, done.stderr
    assert "30 thumbnails embedded" in done.stderr
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if chromium_path() is None:
        pytest.skip(
            "chromium is not installed (apt-get install chromium; "
            ".ci/run installs it): the report page's browser tests need it"
        )
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


class Opened:
    """A page in its own context, with every console error and uncaught exception collected."""

    def __init__(self, browser, url: str, **context) -> None:
        self.context = browser.new_context(viewport=VIEWPORT, **context)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.url = url

    def open(self):
        self.page.goto(self.url)
        self.page.wait_for_selector(READY)
        return self.page


@pytest.fixture()
def opened(browser, page_file: Path) -> Iterator[Opened]:
    view = Opened(browser, page_file.as_uri())
    view.open()
    yield view
    assert view.errors == [], "the page logged errors"
    view.context.close()


def table_column(page, cls: str) -> list[str]:
    return page.locator(f"#queries tbody tr td.{cls}").all_inner_texts()


# -- the measures ---------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.sampled_from([0.0, 1.0, 1.5, 2.0, 7.25, -3.0, 12.5])), min_size=2, max_size=40
    )
)
def test_ndcg_is_sklearns_ndcg_score_with_its_tie_averaging(pairs):
    labels, scores = [g for g, _ in pairs], [s for _, s in pairs]
    assert metrics.ndcg(labels, scores) == pytest.approx(float(ndcg_score([labels], [scores])), abs=1e-12)


def test_ndcg_of_one_candidate_or_no_relevant_one_is_zero_as_imsearch_eval():
    assert metrics.ndcg([1], [3.0]) == 0.0  # sklearn refuses; imsearch_eval's compute_ndcg answers 0.0
    assert metrics.ndcg([0, 0, 0], [3.0, 2.0, 1.0]) == 0.0 == ndcg_score([[0, 0, 0]], [[3.0, 2.0, 1.0]])


def test_reciprocal_rank_is_one_over_the_rank_of_the_first_image_labelled_above_zero():
    assert metrics.reciprocal_rank([0, 0, 1, 1], [9.0, 8.0, 7.0, 1.0]) == pytest.approx(1 / 3)
    assert metrics.reciprocal_rank([0, 2], [1.0, 5.0]) == 1.0
    assert metrics.reciprocal_rank([0, 0], [1.0, 5.0]) == 0.0


# -- the page, in chromium ------------------------------------------------------------------------

def test_the_page_loads_without_a_script_error_and_shows_sklearns_figures(opened, bench):
    page = opened.page
    want = expected(bench)
    assert page.inner_text("#mean-ndcg") == f"{sum(n for n, _, _ in want.values()) / len(want):.3f}"
    assert page.inner_text("#mrr") == f"{sum(r for _, r, _ in want.values()) / len(want):.3f}"
    shown = page.eval_on_selector_all(
        "#queries tbody tr",
        (
            "rows => rows.map(r => [r.dataset.query, "
            "r.querySelector('.ndcg').innerText, r.querySelector('.rr').innerText])"
        ),
    )
    assert {query: (ndcg, rr) for query, ndcg, rr in shown} == {
        q: (f"{n:.3f}", f"{r:.3f}") for q, (n, r, _) in want.items()
    }
    assert page.inner_text("#n-left-out") == "1"  # the failed pair is left out, and said so


def test_every_query_is_in_the_table(opened, bench):
    rows = opened.page.eval_on_selector_all("#queries tbody tr", "rows => rows.map(r => r.dataset.query)")
    assert sorted(rows) == sorted({row["query_id"] for row in bench.rows})
    assert opened.page.inner_text("#shown") == "12 of 12 queries"


def test_a_long_table_gets_its_later_rows_as_it_is_scrolled(browser, tmp_path):
    """The table holds a screenful more than is seen; scrolled to its end, every query is there."""
    many = make_benchmark(tmp_path, queries=450, per_query=3, write_images=False)
    done = report(str(many.scored), "-o", str(tmp_path / "many.html"))
    assert done.returncode == 0, done.stderr
    view = Opened(browser, (tmp_path / "many.html").as_uri())
    page = view.open()
    rows = page.locator("#queries tbody tr")
    assert 0 < rows.count() < 450
    while rows.count() < 450:
        before = rows.count()
        rows.last.scroll_into_view_if_needed()
        expect(rows).not_to_have_count(before)  # the next rows came
    queries = page.eval_on_selector_all("#queries tbody tr", "rows => rows.map(r => r.dataset.query)")
    assert sorted(queries) == sorted({row["query_id"] for row in many.rows})
    assert view.errors == []
    view.context.close()


@pytest.mark.parametrize(("column", "cls"), [("ndcg", "ndcg"), ("rr", "rr"), ("relevant", "relevant")])
def test_clicking_a_header_sorts_by_it_and_again_reverses(opened, column, cls):
    page = opened.page
    header = page.locator(f"#queries th[data-sort={column}]")

    def values() -> list[float]:
        return [float(text.split("/")[0]) for text in table_column(page, cls)]

    if column == "ndcg":  # the opening order: worst NDCG first
        assert values() == sorted(values())
    header.click()
    first = values()
    header.click()
    second = values()
    assert {tuple(sorted(first)), tuple(sorted(second))} == {tuple(sorted(first))}
    assert [first, second] in (
        [sorted(first), sorted(first, reverse=True)],
        [sorted(first, reverse=True), sorted(first)],
    )
    assert first != second


def test_typing_in_the_filter_keeps_the_queries_whose_text_matches(opened, bench):
    page = opened.page
    page.fill("#filter", "SMOKE")
    expect(page.locator("#shown")).to_have_text("3 of 12 queries")  # the filter waits 60 ms for more keys
    texts = page.locator("#queries tbody tr td:first-child > div:first-child").all_inner_texts()
    want = sorted({row["query_text"] for row in bench.rows if "smoke" in row["query_text"]})
    assert sorted(texts) == want and len(want) == 3
    page.fill("#filter", "")
    expect(page.locator("#shown")).to_have_text("12 of 12 queries")


def test_a_query_shows_its_images_in_score_order_with_score_and_label(opened, bench):
    page = opened.page
    page.click("#queries tbody tr[data-query='q0004']")
    cards = page.eval_on_selector_all(
        "#q-images .card",
        (
            "cards => cards.map(c => [c.dataset.image, Number(c.dataset.score), Number(c.dataset.label), "
            "c.classList.contains('rel'), c.querySelector('.score').innerText, !!c.querySelector('.flag')])"
        ),
    )
    rows = sorted((r for r in bench.rows if r["query_id"] == "q0004"), key=lambda r: -r["clip_score"])
    assert [(c[0], c[1], c[2]) for c in cards] == [(r["image_id"], r["clip_score"], r["relevance_label"]) for r in rows]
    assert all(c[3] == c[5] == (c[2] > 0) for c in cards)  # relevant ones marked, the others not
    assert [c[4] for c in cards] == [f"{r['clip_score']:.3f}" for r in rows]
    ndcg, rr, relevant = expected(bench)["q0004"]
    assert (page.inner_text("#q-ndcg"), page.inner_text("#q-rr"), page.inner_text("#q-relevant")) == (
        f"{ndcg:.3f}",
        f"{rr:.3f}",
        f"{relevant} of {len(rows)}",
    )
    assert page.locator("img").count() == len(rows)  # one query's images at a time, not every image


def test_the_arrow_keys_step_through_the_queries_in_the_tables_order(opened):
    page = opened.page
    order = page.eval_on_selector_all("#queries tbody tr", "rows => rows.map(r => r.dataset.query)")
    assert page.locator("#queries tr.sel").get_attribute("data-query") == order[0]  # the worst opens first
    page.keyboard.press("ArrowDown")
    page.keyboard.press("j")
    assert page.locator("#queries tr.sel").get_attribute("data-query") == order[2]
    page.keyboard.press("ArrowUp")
    assert page.locator("#queries tr.sel").get_attribute("data-query") == order[1]
    heading = page.locator("#queries tr.sel td:first-child > div:first-child").inner_text()
    assert page.inner_text(".qhead h2") == heading  # and its images are the ones shown


def test_the_planted_mislabelled_pair_tops_the_disagreements_and_opens_its_query(opened, bench):
    page = opened.page
    page.click("nav button[data-view=disagreements]")
    first = page.locator("#disagreements tbody tr").first
    assert (first.get_attribute("data-query"), first.get_attribute("data-image")) == bench.planted
    assert "standard deviation" in page.inner_text("#disagree-note")  # the measure is stated on the page
    measures = [float(t) for t in page.locator("#disagreements td.measure").all_inner_texts()]
    assert measures == sorted(measures, reverse=True) and measures[-1] > 0
    first.click()
    highlighted = page.locator("#q-images .card.hl")
    assert highlighted.get_attribute("data-image") == bench.planted[1]
    assert page.locator("#queries tr.sel").get_attribute("data-query") == bench.planted[0]


def test_the_score_distribution_is_drawn_by_label(opened, bench):
    page = opened.page
    page.click("nav button[data-view=distribution]")
    assert page.locator("#histogram svg rect[fill='#1f6fd1']").count() > 0
    assert page.locator("#histogram svg rect[fill='#d9534f']").count() > 0
    counts = page.eval_on_selector_all("#label-stats tbody tr", "rows => rows.map(r => r.children[1].innerText)")
    scored = [r for r in bench.rows if r["clip_score"] is not None]
    assert counts == [
        str(sum(1 for r in scored if r["relevance_label"] > 0)),
        str(sum(1 for r in scored if r["relevance_label"] == 0)),
    ]


def test_a_query_text_with_markup_is_shown_as_text(opened, bench):
    text = next(r["query_text"] for r in bench.rows if r["query_id"] == "q0005")
    page = opened.page
    page.click("#queries tbody tr[data-query='q0005']")
    assert page.inner_text(".qhead h2") == text
    assert page.locator("#queries b, .qhead b:not([id])").count() == 0


def test_the_page_works_from_a_file_url_with_the_network_off(browser, page_file):
    view = Opened(browser, page_file.as_uri(), offline=True)
    requests = []

    def refuse(route):
        requests.append(route.request.url)
        route.abort()

    view.context.route(lambda url: not url.startswith("file://"), refuse)
    page = view.open()
    page.click("#queries tbody tr[data-query='q0003']")
    loaded = page.eval_on_selector_all(
        "#q-images img", "imgs => Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth, () => 0)))"
    )
    assert len(loaded) == 10 and all(width > 0 for width in loaded)
    assert page.locator("#q-images img[src^='data:image/jpeg;base64,']").count() == 10
    assert requests == [] and view.errors == []
    view.context.close()


def test_without_thumbnails_the_images_come_from_their_paths(browser, bench):
    out = bench.scored.with_name("linked.html")
    done = report(str(bench.scored), "--images", str(bench.images), "-o", str(out))
    assert done.returncode == 0, done.stderr
    view = Opened(browser, out.as_uri())
    page = view.open()
    sources = page.eval_on_selector_all("#q-images img", "imgs => imgs.map(i => i.src)")
    assert sources and all(src.startswith("file:///") and src.endswith(".jpg") for src in sources)
    loaded = page.eval_on_selector_all(
        "#q-images img", "imgs => Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth, () => 0)))"
    )
    assert all(width > 0 for width in loaded) and view.errors == []
    view.context.close()


def _grey(image: Image.Image) -> Image.Image:
    return image.convert("L").resize((128, 80), Image.Resampling.BOX)


def test_it_looks_like_the_stored_screenshot(opened, tmp_path):
    """Loosely: the same layout (the figures, the table on the left, the images on the right),
    not the same pixels (fonts and antialiasing differ between machines).
    Refresh the stored one with `python tools/report_screenshot.py`."""
    page = opened.page
    page.evaluate("Promise.all([...document.images].map(i => i.decode().catch(() => null)))")
    shot = tmp_path / "now.png"
    page.screenshot(path=str(shot))
    difference = ImageChops.difference(_grey(Image.open(shot)), _grey(Image.open(STORED_SCREENSHOT)))
    assert ImageStat.Stat(difference).mean[0] < 12, f"the page no longer looks like {STORED_SCREENSHOT} (see {shot})"
    boxes = {
        name: page.locator(selector).bounding_box()
        for name, selector in (("figures", ".stats"), ("table", "#queries"), ("images", "#q-images"))
    }
    assert boxes["figures"]["y"] < boxes["table"]["y"]
    assert boxes["table"]["x"] + boxes["table"]["width"] <= boxes["images"]["x"]
    assert boxes["images"]["width"] > 400 and boxes["table"]["width"] > 380


# -- reading the file ----------------------------------------------------------------------------

def test_csv_parquet_and_the_benchmark_makers_column_names_give_the_same_figures(bench, tmp_path):
    renamed = [
        {
            "qid": r["query_id"],
            "q": r["query_text"],
            "img": r["image_id"],
            "judge": r["relevance_label"],
            "dfn": r["clip_score"],
        }
        for r in bench.rows
    ]
    (tmp_path / "config.toml").write_text(
        'column_query = "q"\ncolumn_query_id = "qid"\ncolumn_image_id = "img"\ncolumn_relevance = "judge"\n'
        f'qrels_with_score_jsonl = "{tmp_path / "scored.csv"}"\n[similarity_config]\ncol_name = "dfn"\n',
        encoding="utf-8",
    )
    with (tmp_path / "scored.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(renamed[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in renamed)
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "scored.parquet")
    original = payload(
        ReportJob(scored=bench.scored, output=tmp_path / "a.html"),
        read_scored(ReportJob(scored=bench.scored, output=tmp_path / "a.html")),
        {},
    )
    settings_ = report_settings_from_config(tmp_path / "config.toml")
    for name in ("scored.csv", "scored.parquet"):
        job = ReportJob(**{**settings_, "scored": tmp_path / name, "output": tmp_path / "b.html"})
        data = payload(job, read_scored(job), {})
        assert data["summary"] == original["summary"]
        assert [(q["id"], q["ndcgText"], q["rrText"], q["relevant"]) for q in data["queries"]] == [
            (q["id"], q["ndcgText"], q["rrText"], q["relevant"]) for q in original["queries"]
        ]
    done = report("--config", str(tmp_path / "config.toml"), "-o", str(tmp_path / "c.html"))
    assert done.returncode == 0, done.stderr
    assert f"mean NDCG {original['summary']['meanNdcg']}, MRR {original['summary']['meanRr']}" in done.stderr


def test_a_file_without_the_score_column_fails_with_one_clear_line(bench, tmp_path):
    done = report(str(bench.scored), "--score-column", "siglip_score", "-o", str(tmp_path / "x.html"))
    assert done.returncode == 1
    assert "no 'siglip_score' column" in done.stderr and not (tmp_path / "x.html").exists()


def test_an_image_that_cannot_be_had_is_linked_instead_and_counted(bench, tmp_path):
    (tmp_path / "not-an-image.jpg").write_text("plain text", encoding="utf-8")
    sources = [
        (bench.images.parent / "images" / "im0000.jpg").as_uri(),
        (tmp_path / "gone.jpg").as_uri(),
        (tmp_path / "not-an-image.jpg").as_uri(),
    ]
    made = make_thumbnails(sources)
    assert list(made.by_src) == sources[:1] and made.by_src[sources[0]].startswith("data:image/jpeg;base64,")
    assert set(made.failures) == set(sources[1:])
    assert "1 thumbnails embedded, 2 could not be made (the page links those" in made.summary()
    with Image.open(io.BytesIO(base64.b64decode(made.by_src[sources[0]].split(",", 1)[1]))) as small:
        assert max(small.size) == THUMBNAIL_PX and small.format == "JPEG"


def test_the_page_is_written_without_torch_numpy_pillow_or_sklearn(bench, tmp_path):
    """The SDK's own install (no server extra) writes the page; only thumbnails need more."""
    code = BLOCK_TORCH + (
        "sys.modules['sklearn'] = None\n"
        "from clipserve.cli import main\n"
        f"sys.exit(main(['report', {str(bench.scored)!r}, '--images', "
        f"{str(bench.images)!r}, '-o', {str(tmp_path / 'x.html')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_embedding_thumbnails_without_the_server_extra_says_what_to_install(bench, tmp_path):
    code = BLOCK_TORCH + (
        "from clipserve.cli import main\n"
        f"sys.exit(main(['report', {str(bench.scored)!r}, '-o', {str(tmp_path / 'x.html')!r}, '--embed-thumbnails']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "pip install 'clipserve[server]'" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.html").exists()


# -- score-file --report -------------------------------------------------------------------------

def test_score_file_writes_the_report_at_the_end_of_its_run(fake_server, image_host, browser, tmp_path):
    images = [{"image_id": f"im{i}", "image_url": image_host.url(f"img/photo{i}.jpg")} for i in range(6)]
    qrels = [
        {"query_id": f"q{q}", "query_text": text, "image_id": f"im{i}", "relevance_label": int((q + i) % 3 == 0)}
        for q, text in enumerate(["a dog", "a red car"])
        for i in range(6)
    ]
    (tmp_path / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in images), encoding="utf-8")
    (tmp_path / "qrels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qrels), encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clipserve.cli",
            "score-file",
            str(tmp_path / "qrels.jsonl"),
            "--images",
            str(tmp_path / "images.jsonl"),
            "--no-progress",
            "--address",
            fake_server.address,
            "--report",
            str(tmp_path / "report.html"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"report: {tmp_path / 'report.html'} (2 queries, 12 scored pairs" in done.stderr
    view = Opened(browser, (tmp_path / "report.html").as_uri())
    page = view.open()
    assert page.locator("#queries tbody tr").count() == 2
    loaded = page.eval_on_selector_all(
        "#q-images img", "imgs => Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth, () => 0)))"
    )
    assert loaded == [64] * 6  # from the image host's URLs
    assert view.errors == []
    view.context.close()
