"""Reading a scored file into queries and their candidates, with score-file's column handling.

The columns are the benchmark maker's (its config.toml's ``column_query``, ``column_query_id``,
``column_image_id``, ``column_relevance``, ``image_url_temp_column``, ``image_base_url`` and
``[similarity_config] col_name``), and each image's URL is found as ``score-file`` finds it:
the row's own URL column, else the images file, else ``image_base_url`` + the image id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._config import DEFAULT_COL_NAME, read_toml
from ..files.rows import RunFailed, read_rows
from ..files.scorefile import FileJob, _image_url, _url_map, job_settings_from_config

# The benchmark maker's BenchmarkConfig defaults.
DEFAULT_RELEVANCE_COLUMN = "relevance_label"
DEFAULT_QUERY_ID_COLUMN = "query_id"


@dataclass(frozen=True)
class ReportJob:
    scored: Path
    output: Path
    images: Path | None = None
    column_query: str = "query_text"
    column_query_id: str = DEFAULT_QUERY_ID_COLUMN  # queries are told apart by it; by their text where rows lack it
    column_image_id: str = "image_id"
    image_url_column: str = "image_url"
    image_base_url: str | None = None
    score_column: str = DEFAULT_COL_NAME
    relevance_column: str = DEFAULT_RELEVANCE_COLUMN
    embed_thumbnails: bool = False

    def file_job(self) -> FileJob:
        """The same columns as score-file's job: its URL lookup is this file's."""
        return FileJob(
            output=self.scored,
            images=self.images,
            column_query=self.column_query,
            column_image_id=self.column_image_id,
            image_url_column=self.image_url_column,
            image_base_url=self.image_base_url,
            col_name=self.score_column,
        )


def report_settings_from_config(path: str | Path) -> dict[str, Any]:
    """The benchmark maker's config.toml keys, as ReportJob fields (score-file's, plus the
    query id and relevance columns); the scored file is its ``qrels_with_score_jsonl``."""
    settings = job_settings_from_config(path)
    settings.pop("qrels", None)
    if "output" in settings:
        settings["scored"] = settings.pop("output")
    if "col_name" in settings:
        settings["score_column"] = settings.pop("col_name")
    data = read_toml(path)
    for key, name in (("column_query_id", "column_query_id"), ("column_relevance", "relevance_column")):
        if data.get(key) is not None:
            settings[name] = data[key]
    return settings


@dataclass(frozen=True)
class Candidate:
    image_id: str
    src: str | None  # what the page shows: an http(s) or file:// URL (None: no URL known)
    score: float
    label: float


@dataclass
class Query:
    key: str  # the query id, or the text where the rows have none
    text: str
    candidates: list[Candidate] = field(default_factory=list)
    left_out: int = 0  # rows with no score (a failed pair) or no label: left out of every measure


@dataclass(frozen=True)
class Scored:
    queries: list[Query]
    rows: int


def number(value: Any) -> float | None:
    """A score or label as a float; None for null, "" (CSV), NaN, infinities and what is not a number."""
    if isinstance(value, bool):
        return float(value)
    if value is None or value == "":
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def page_src(url: str | None) -> str | None:
    """Where the page finds an image: URLs as they are, local paths as absolute file:// URLs
    (score-file reads a local path relative to where it runs; the page may be opened anywhere)."""
    if not url:
        return None
    if url.startswith(("http://", "https://", "file://", "data:")):
        return url
    return Path(url).expanduser().resolve().as_uri()


def read_scored(job: ReportJob) -> Scored:
    rows = read_rows(job.scored)
    if rows and not any(job.score_column in row for row in rows):
        raise RunFailed(f"{job.scored}: no {job.score_column!r} column (the score; --score-column names another)")
    if rows and not any(job.relevance_column in row for row in rows):
        raise RunFailed(
            f"{job.scored}: no {job.relevance_column!r} column (the label; --relevance-column names another)"
        )
    file_job = job.file_job()
    urls = _url_map(file_job)
    queries: dict[str, Query] = {}
    for row in rows:
        text = "" if row.get(job.column_query) is None else str(row[job.column_query])
        query_id = row.get(job.column_query_id)
        key = text if query_id is None or query_id == "" else str(query_id)
        query = queries.get(key)
        if query is None:
            query = queries[key] = Query(key=key, text=text)
        score, label = number(row.get(job.score_column)), number(row.get(job.relevance_column))
        if score is None or label is None:
            query.left_out += 1
            continue
        image_id = "" if row.get(job.column_image_id) is None else str(row[job.column_image_id])
        query.candidates.append(Candidate(image_id, page_src(_image_url(row, file_job, urls)), score, label))
    return Scored(list(queries.values()), rows=len(rows))
