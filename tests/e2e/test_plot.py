"""`score-file --plot` and `embed-file --plot`: a chart of the run, drawn from its output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from clipserve.files.plot import (
    EMBED_CHART_PX,
    FAILURE_COLOR,
    MAX_QUERIES,
    SCORE_CHART_PX,
    SCORE_COLOR,
    _spread_by_median,
)

from ..helpers import make_image
from .test_score_file import QUERIES, write_jsonl


def cli(*args: str, block: str = "") -> subprocess.CompletedProcess:
    """``clipserve ARGS`` in a subprocess; ``block`` names a package it cannot import."""
    blocker = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] == {block!r}: raise ImportError('blocked for this test: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    code = (blocker if block else "import sys\n") + f"from clipserve.cli import main\nsys.exit(main({list(args)!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def pixels_of(chart: Path) -> tuple[tuple[int, int], dict[tuple[int, int, int], int]]:
    """The chart's size and how many pixels each colour covers."""
    with Image.open(chart) as image:
        assert image.format == "PNG"
        rgb_image = image.convert("RGB")
        colors = rgb_image.getcolors(maxcolors=rgb_image.width * rgb_image.height)
        return rgb_image.size, {color: count for count, color in colors}


def assert_a_drawn_chart(chart: Path, size: tuple[int, int]) -> dict[tuple[int, int, int], int]:
    """Of the expected size, neither blank nor a flat fill: several colours, a fair share of
    the page inked, and bars or boxes in the score colour."""
    found_size, colors = pixels_of(chart)
    assert found_size == size
    inked = sum(count for color, count in colors.items() if color != (255, 255, 255))
    assert inked > 0.05 * size[0] * size[1]
    assert len(colors) > 20  # text, axes, antialiasing: a drawing, not a fill
    assert colors.get(rgb(SCORE_COLOR), 0) > 2000
    return colors


def image_files(folder: Path, count: int) -> list[str]:
    """``count`` local images (uploaded, so no fetch can time out) and one file that is not an image."""
    paths = []
    for i in range(count):
        paths.append(folder / f"photo{i}.png")
        paths[-1].write_bytes(make_image(40 + 3 * i, 30 + 2 * i, seed=i))
    paths.append(folder / "not-an-image.png")
    paths[-1].write_bytes(b"plain text, not a picture")
    return [str(path) for path in paths]


@pytest.fixture()
def qrels(tmp_path):
    """Three queries, each over six images and one file that is not an image (3 failures)."""
    rows = [
        {"query_text": text, "image_id": f"im{i}", "image_url": url}
        for text in QUERIES
        for i, url in enumerate(image_files(tmp_path, 6))
    ]
    write_jsonl(tmp_path / "qrels.jsonl", rows)
    return tmp_path / "qrels.jsonl"


def test_score_file_plot_draws_the_scores_and_the_failures(fake_server, qrels, tmp_path):
    """The chart is a PNG of the documented size with the score histogram and boxes, and a
    failures bar (three pairs failed)."""
    chart = tmp_path / "charts" / "scores.png"
    done = cli("score-file", "--no-progress", str(qrels), "--plot", str(chart), "--address", fake_server.address)
    assert done.returncode == 0, done.stderr
    assert f"chart: {chart}" in done.stderr and "3 failed" in done.stderr
    colors = assert_a_drawn_chart(chart, SCORE_CHART_PX)
    assert colors.get(rgb(FAILURE_COLOR), 0) > 500


def test_a_chart_that_cannot_be_written_loses_nothing_of_the_run(fake_server, qrels, tmp_path):
    """The run's output and summary come first: a chart that cannot be written (its folder is a
    file) ends the command with an error saying so, not a traceback, and the scores are kept."""
    (tmp_path / "taken").write_text("a file, not a folder")
    chart = tmp_path / "taken" / "scores.png"
    done = cli("score-file", "--no-progress", str(qrels), "--plot", str(chart), "--address", fake_server.address)
    assert done.returncode == 1
    assert "3 failed" in done.stderr and f"the chart {chart} could not be drawn" in done.stderr
    assert "Traceback" not in done.stderr
    assert len((tmp_path / "qrels_with_score.jsonl").read_text().splitlines()) == 21


def test_a_run_without_failures_draws_no_failure_bar(fake_server, qrels, tmp_path):
    """The chart follows the data: every pair scored, nothing in the failure colour."""
    rows = [json.loads(line) for line in qrels.read_text().splitlines() if "not-an-image" not in line]
    write_jsonl(qrels, rows)
    chart = tmp_path / "scores.png"
    done = cli("score-file", "--no-progress", str(qrels), "--plot", str(chart), "--address", fake_server.address)
    assert done.returncode == 0, done.stderr
    colors = assert_a_drawn_chart(chart, SCORE_CHART_PX)
    assert colors.get(rgb(FAILURE_COLOR), 0) == 0


@pytest.mark.parametrize("suffix", [".parquet", ".npy"])
def test_embed_file_plot_draws_the_vectors_and_the_failures(fake_server, tmp_path, suffix):
    """From either output format: similarity and length histograms, and a failures bar."""
    *images, not_an_image = image_files(tmp_path, 24)
    rows = [{"url": url} for url in images] + [{"url": not_an_image}] * 6
    write_jsonl(tmp_path / "images.jsonl", rows)
    chart = tmp_path / "vectors.png"
    done = cli(
        "embed-file",
        "--no-progress",
        str(tmp_path / "images.jsonl"),
        "-o",
        str(tmp_path / f"vectors{suffix}"),
        "--image-column",
        "url",
        "--raw",
        "--plot",
        str(chart),
        "--address",
        fake_server.address,
    )
    assert done.returncode == 0, done.stderr
    assert "24 embedded, 6 failed" in done.stderr
    colors = assert_a_drawn_chart(chart, EMBED_CHART_PX)
    assert colors.get(rgb(FAILURE_COLOR), 0) > 500


@pytest.mark.parametrize("command", ["score-file", "embed-file"])
def test_plot_without_matplotlib_says_what_to_install_before_any_work(tmp_path, command):
    """The client imports and runs without matplotlib; --plot then fails at once (exit status 2,
    no traceback), before reading a row or calling a server."""
    args = [
        str(tmp_path / "rows.jsonl"),
        "-o",
        str(tmp_path / "out.parquet"),
        "--plot",
        str(tmp_path / "c.png"),
        "--address",
        "127.0.0.1:1",
    ]
    if command == "embed-file":
        args += ["--text-column", "text"]
    done = cli(command, *args, block="matplotlib")
    assert done.returncode == 2
    assert done.stderr == "error: --plot needs matplotlib: pip install 'clipserve[plot]'\n"
    assert not (tmp_path / "out.parquet").exists()


def test_many_queries_are_sampled_along_their_medians_lowest_and_highest_kept():
    """With more queries than boxes fit, the chart shows MAX_QUERIES of them, spread evenly
    from the lowest median to the highest."""
    by_query = {f"q{i}": [float(i), float(i) + 1] for i in range(200)}
    shown = _spread_by_median(by_query)
    assert len(shown) == MAX_QUERIES and shown[0] == "q0" and shown[-1] == "q199"
    assert [int(q[1:]) for q in shown] == sorted(int(q[1:]) for q in shown)
