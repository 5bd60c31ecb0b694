"""The ``clipserve report`` command line, and ``score-file --report``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..files.flags import add_columns_and_images
from ..files.rows import RunFailed
from .data import DEFAULT_QUERY_ID_COLUMN, DEFAULT_RELEVANCE_COLUMN, ReportJob, report_settings_from_config

# The flags that set a ReportJob field of the same name; they override --config.
_FIELDS = (
    "scored",
    "output",
    "images",
    "column_query",
    "column_query_id",
    "column_image_id",
    "image_url_column",
    "image_base_url",
    "score_column",
    "relevance_column",
)


def add_parser(sub: Any) -> None:
    report = sub.add_parser(
        "report",
        help="write a scored file (score-file's output) as one self-contained HTML page",
        description="Reads a scored qrels file (.jsonl, .csv, .parquet) and writes one HTML page: the mean NDCG and "
        "MRR over queries, a table of queries sortable by NDCG, RR and relevant images, each query's images in score "
        "order with their labels, the pairs where score and label disagree most, and the score distribution by label. "
        "Columns and the images file are found as score-file finds them, from the benchmark maker's config.toml "
        "(column_query, column_query_id, column_image_id, column_relevance, images_jsonl, image_url_temp_column, "
        "image_base_url, qrels_with_score_jsonl, [similarity_config] col_name) or the flags.",
    )
    report.add_argument(
        "scored", nargs="?", default=None, help="the scored file (default: qrels_with_score_jsonl in --config)"
    )
    report.add_argument("-o", "--output", default=None, help="the page to write (default: <scored>.html)")
    add_columns_and_images(report)
    report.add_argument(
        "--column-query-id",
        default=None,
        help=f"query id column; rows without it are grouped by query text (default: {DEFAULT_QUERY_ID_COLUMN})",
    )
    report.add_argument("--score-column", default=None, help="the score column (default: clip_score)")
    report.add_argument(
        "--relevance-column",
        default=None,
        help=f"the label column; above 0 is relevant (default: {DEFAULT_RELEVANCE_COLUMN})",
    )
    report.add_argument(
        "--embed-thumbnails",
        action="store_true",
        help=(
            "put small JPEG thumbnails inside the page, "
            "so that it works alone and offline (needs clipserve[server] to decode)"
        ),
    )
    report.set_defaults(func=run)


def _cannot_embed(embed: bool) -> bool:
    if not embed:
        return False
    from .thumbnails import missing

    problem = missing()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
    return problem is not None


def write(job: ReportJob) -> int:
    from .page import write_report

    try:
        summary = write_report(job)
    except (RunFailed, OSError) as exc:
        print(f"error: the report {job.output} could not be written: {exc}", file=sys.stderr)
        return 1
    for line in summary.lines():
        print(line, file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    if _cannot_embed(args.embed_thumbnails):
        return 2
    settings = report_settings_from_config(args.config) if args.config else {}
    for name in _FIELDS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if "scored" not in settings:
        print("error: give the scored file (argument, or qrels_with_score_jsonl in --config)", file=sys.stderr)
        return 2
    scored = Path(settings.pop("scored"))
    output = Path(settings.pop("output", None) or scored.with_suffix(".html"))
    images = settings.pop("images", None)
    job = ReportJob(
        scored=scored,
        output=output,
        images=Path(images) if images else None,
        embed_thumbnails=args.embed_thumbnails,
        **settings,
    )
    return write(job)


def after_score_file(page: str, config: str | None, file_job: Any) -> int:
    """``score-file --report PAGE``: the page of the output just written, with its columns
    (and the query id and label columns of the config, when there is one)."""
    extra = report_settings_from_config(config) if config else {}
    job = ReportJob(
        scored=file_job.output,
        output=Path(page),
        images=file_job.images,
        column_query=file_job.column_query,
        column_query_id=extra.get("column_query_id", DEFAULT_QUERY_ID_COLUMN),
        column_image_id=file_job.column_image_id,
        image_url_column=file_job.image_url_column,
        image_base_url=file_job.image_base_url,
        score_column=file_job.col_name,
        relevance_column=extra.get("relevance_column", DEFAULT_RELEVANCE_COLUMN),
    )
    return write(job)
