"""Charts of a finished ``score-file`` or ``embed-file`` run (``--plot chart.png``).

Drawn from the output file, so a resumed run's chart covers every row: the scores per query
and overall, or for embeddings how alike the rows are; and the failures by status code.
matplotlib is optional (``pip install 'clipserve[plot]'``); nothing here is imported before
``--plot`` asks for it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .rows import pyarrow, read_rows

DPI = 100
SCORE_CHART_PX = (1200, 900)
EMBED_CHART_PX = (1200, 500)
MAX_QUERIES = 40  # boxes that stay readable side by side; more are sampled along the medians
SCORE_COLOR = "#1f77b4"
FAILURE_COLOR = "#d62728"
UNKNOWN_CODE = "unknown (an earlier run)"


def missing() -> str | None:
    """What is missing to draw, said before any work; None when matplotlib is installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib: pip install 'clipserve[plot]'"
    return None


def codes_of(errors: Iterable[str | None]) -> Counter[str]:
    """Failures by status code, from errors that read ``"CODE: message"``."""
    return Counter(error.split(":", 1)[0] for error in errors if error is not None)


# -- score-file ----------------------------------------------------------------------------------

def plot_score_file(chart: Path, job: Any, run_codes: Counter[str]) -> None:
    """Chart ``job.output`` (a ``FileJob``'s): every row's score, grouped by query.

    Failures are counted by code from the error column when the output has one; else from this
    run (``run_codes``), and a null score that this run did not write counts as unknown.
    """
    rows = read_rows(job.output)
    by_query: dict[str, list[float]] = {}
    nulls = []
    for row in rows:
        score = row.get(job.col_name)
        if score is None:
            nulls.append(row)
        else:
            by_query.setdefault(str(row.get(job.column_query)), []).append(float(score))
    if job.error_column and rows and job.error_column in rows[0]:
        failures = codes_of(row.get(job.error_column) or UNKNOWN_CODE for row in nulls)
    else:
        failures = Counter(run_codes)
        if len(nulls) > failures.total():
            failures[UNKNOWN_CODE] += len(nulls) - failures.total()
    draw_scores(chart, by_query, failures, title=f"{job.output.name}: {len(rows)} rows")


def draw_scores(chart: Path, by_query: dict[str, list[float]], failures: Counter[str], title: str) -> None:
    figure = _figure(SCORE_CHART_PX, title)
    grid = figure.add_gridspec(2, 2, height_ratios=(1, 1.3))
    overall = figure.add_subplot(grid[0, 0])
    scores = [score for values in by_query.values() for score in values]
    if scores:
        overall.hist(scores, bins=50, color=SCORE_COLOR)
    overall.set(title=f"all scores ({len(scores)} pairs)", xlabel="score", ylabel="pairs")
    _counts_on(overall.yaxis)
    _failure_bars(figure.add_subplot(grid[0, 1]), failures)
    per_query = figure.add_subplot(grid[1, :])
    shown = _spread_by_median(by_query)
    if shown:
        boxes = per_query.boxplot([by_query[q] for q in shown], patch_artist=True, showfliers=False)
        for box in boxes["boxes"]:
            box.set_facecolor(SCORE_COLOR)
        per_query.set_xticks(range(1, len(shown) + 1), [_short(q) for q in shown], rotation=60, ha="right", fontsize=7)
    of = (
        f"{len(shown)} of {len(by_query)} queries, spread evenly"
        if len(shown) < len(by_query)
        else f"{len(by_query)} queries"
    )
    per_query.set(title=f"scores per query ({of}), ordered by median", ylabel="score")
    _save(figure, chart)


def _spread_by_median(by_query: dict[str, list[float]]) -> list[str]:
    ranked = sorted(by_query, key=lambda q: sorted(by_query[q])[len(by_query[q]) // 2])
    if len(ranked) <= MAX_QUERIES:
        return ranked
    step = (len(ranked) - 1) / (MAX_QUERIES - 1)  # the lowest and highest medians always shown
    return [ranked[round(i * step)] for i in range(MAX_QUERIES)]


def _short(text: str, width: int = 30) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


# -- embed-file ----------------------------------------------------------------------------------

def plot_embed_file(chart: Path, job: Any) -> None:
    """Chart ``job.output`` (an ``EmbedFileJob``'s, .npy or .parquet): how alike the rows are
    (cosine similarity to the mean vector: a spike near 1 is near-duplicates or a degenerate
    input), the vectors' lengths, and the failures by code."""
    import numpy as np

    if job.output.suffix.lower() == ".npy":
        matrix = np.load(job.output)
        failed = np.isnan(matrix).any(axis=1)
        ids = job.output.with_name(job.output.stem + ".ids.jsonl")
        errors = [json.loads(line)["error"] for line in ids.read_text(encoding="utf-8").splitlines()]
    else:
        table = pyarrow().parquet.read_table(job.output, columns=["embedding", "error"])
        errors = table.column("error").to_pylist()
        column = table.column("embedding").combine_chunks()
        matrix = column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
        failed = column.is_null().to_numpy(zero_copy_only=False)
    draw_embeddings(chart, matrix[~failed], codes_of(errors), title=f"{job.output.name}: {len(errors)} rows")


def draw_embeddings(chart: Path, vectors: Any, failures: Counter[str], title: str) -> None:
    import numpy as np

    figure = _figure(EMBED_CHART_PX, title)
    alike, lengths, failed = figure.subplots(1, 3)
    norms = np.linalg.norm(vectors, axis=1) if len(vectors) else np.zeros(0)
    if len(vectors):
        mean = vectors.mean(axis=0)
        similarity = (vectors @ mean) / np.maximum(norms * np.linalg.norm(mean), 1e-12)
        alike.hist(similarity, bins=50, color=SCORE_COLOR)
        lengths.hist(norms, bins=50, color=SCORE_COLOR)
    alike.set(title=f"cosine similarity to the mean ({len(vectors)} vectors)", xlabel="cosine", ylabel="rows")
    lengths.set(title="vector lengths", xlabel="L2 norm", ylabel="rows")
    _counts_on(alike.yaxis)
    _counts_on(lengths.yaxis)
    _failure_bars(failed, failures)
    _save(figure, chart)


# -- shared --------------------------------------------------------------------------------------

def _figure(size_px: tuple[int, int], title: str) -> Any:
    # The object API, not pyplot: no GUI backend, no global state in the caller's process.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size_px[0] / DPI, size_px[1] / DPI), dpi=DPI, layout="constrained")
    figure.suptitle(title)
    return figure


def _failure_bars(axes: Any, failures: Counter[str]) -> None:
    if failures:
        codes = [code for code, _ in failures.most_common()][::-1]  # commonest on top
        axes.barh(codes, [failures[code] for code in codes], color=FAILURE_COLOR)
        axes.tick_params(axis="y", labelsize=8)
    else:
        axes.text(0.5, 0.5, "no failures", ha="center", va="center", transform=axes.transAxes)
        axes.set_yticks([])
    axes.set(title=f"failures by code ({failures.total()})", xlabel="rows")
    _counts_on(axes.xaxis)


def _counts_on(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))  # rows and pairs come whole


def _save(figure: Any, chart: Path) -> None:
    chart.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(chart, dpi=DPI)
