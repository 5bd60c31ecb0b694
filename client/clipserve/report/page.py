"""The report page: the measures of every query, as inline JSON in one HTML file.

The page (``template.html``: its CSS and JS inline) renders lazily from that JSON: the table of
queries, then one query's images at a time, so that 50,000 rows open as fast as 500.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..files.rows import RunFailed, replace_atomically
from . import metrics
from .data import ReportJob, Scored, read_scored

DATA_MARK = "/*REPORT_DATA*/"
MAX_DISAGREEMENTS = 500  # the page lists the strongest ones; beyond, they are near 0 and many
PRECISION = 3  # every NDCG and RR figure on the page


@dataclass(frozen=True)
class ReportSummary:
    output: Path
    queries: int
    pairs: int
    mean_ndcg: str  # as the page shows them
    mean_rr: str
    left_out: int
    thumbnails: str | None = None  # the thumbnails' line, when asked for

    def lines(self) -> list[str]:
        line = (
            f"report: {self.output} ({self.queries} queries, {self.pairs} scored pairs; "
            f"mean NDCG {self.mean_ndcg}, MRR {self.mean_rr})"
        )
        lines = [line]
        if self.left_out:
            lines.append(f"{self.left_out} rows without a score or a label are left out of the measures")
        if self.thumbnails:
            lines.append(self.thumbnails)
        return lines


def figure(value: float) -> str:
    # Formatted here, not by the page's JS: toFixed rounds a binary half up, Python to even.
    return f"{value:.{PRECISION}f}"


def payload(job: ReportJob, scored: Scored, thumbnails: dict[str, str]) -> dict[str, Any]:
    """What the page draws: images listed once (they recur across queries), each query's
    candidates in score order as [image, score, label, contradiction]."""
    images: list[list[str | None]] = []
    image_index: dict[tuple[str, str | None], int] = {}
    queries = []
    ndcgs: list[float] = []
    rrs: list[float] = []
    relevant = pairs = 0
    flagged: list[tuple[float, int, int]] = []
    for q, query in enumerate(scored.queries):
        labels = [c.label for c in query.candidates]
        scores = [c.score for c in query.candidates]
        try:
            ndcg = metrics.ndcg(labels, scores)
        except ValueError as exc:
            raise RunFailed(f"{job.scored}: query {query.key!r}: {exc}") from None
        rr = metrics.reciprocal_rank(labels, scores)
        ndcgs.append(ndcg)
        rrs.append(rr)
        n_relevant = sum(1 for label in labels if label > 0)
        relevant += n_relevant
        pairs += len(labels)
        contradiction = metrics.contradictions(labels, scores)
        rows = []
        for position, i in enumerate(metrics.score_order(scores)):
            candidate = query.candidates[i]
            key = (candidate.image_id, candidate.src)
            if key not in image_index:
                image_index[key] = len(images)
                images.append([candidate.image_id, thumbnails.get(candidate.src or "", candidate.src)])
            measure = contradiction[i]
            rows.append(
                [image_index[key], candidate.score, candidate.label, None if measure is None else round(measure, 4)]
            )
            if measure is not None and measure > 0:
                flagged.append((measure, q, position))
        queries.append(
            {
                "id": query.key,
                "text": query.text,
                "ndcg": ndcg,
                "rr": rr,
                "ndcgText": figure(ndcg),
                "rrText": figure(rr),
                "relevant": n_relevant,
                "leftOut": query.left_out,
                "candidates": rows,
            }
        )
    flagged.sort(key=lambda item: -item[0])
    return {
        "file": job.scored.name,
        "columns": {
            "score": job.score_column,
            "label": job.relevance_column,
            "query": job.column_query,
            "image": job.column_image_id,
        },
        "summary": {
            "meanNdcg": figure(metrics.mean(ndcgs)),
            "meanRr": figure(metrics.mean(rrs)),
            "queries": len(queries),
            "pairs": pairs,
            "relevant": relevant,
            "leftOut": sum(query.left_out for query in scored.queries),
            "rows": scored.rows,
        },
        "images": images,
        "queries": queries,
        "disagreements": [[q, position] for _, q, position in flagged[:MAX_DISAGREEMENTS]],
        "disagreementsTotal": len(flagged),
    }


def render(data: dict[str, Any]) -> str:
    template = resources.files(__package__).joinpath("template.html").read_text(encoding="utf-8")
    # Inside <script type="application/json">: no "<" at all, so nothing in a query's text can
    # close the element ("</script>") or open a comment. "\u003c" is the same JSON string.
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return template.replace(DATA_MARK, text)


def write_report(job: ReportJob) -> ReportSummary:
    """Read ``job.scored``, write the page to ``job.output`` (atomically)."""
    scored = read_scored(job)
    thumbs_line = None
    thumbnails: dict[str, str] = {}
    if job.embed_thumbnails:
        from .thumbnails import make_thumbnails

        made = make_thumbnails(c.src for q in scored.queries for c in q.candidates if c.src)
        thumbnails, thumbs_line = made.by_src, made.summary()
    data = payload(job, scored, thumbnails)
    html = render(data)

    def save(temporary: Path) -> None:
        temporary.write_text(html, encoding="utf-8")
        temporary.chmod(0o644)  # a page to share, not mkstemp's private file

    replace_atomically(job.output, save)
    summary = data["summary"]
    return ReportSummary(
        job.output,
        queries=summary["queries"],
        pairs=summary["pairs"],
        mean_ndcg=summary["meanNdcg"],
        mean_rr=summary["meanRr"],
        left_out=summary["leftOut"],
        thumbnails=thumbs_line,
    )
