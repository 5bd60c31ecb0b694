"""Scoring a whole benchmark file, as the benchmark maker's similarity step does.

Reads qrels rows (JSONL, CSV or Parquet by extension), maps each row's image id to a URL via
an images file (or takes the URL from the row), scores every pair, and writes every input
row unchanged plus the score column (null where the pair failed), in input order.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from ._batch import failed_result
from ._config import DEFAULT_COL_NAME, read_toml
from ._errors import ClipServeError
from ._types import SimilarityInput, SimilarityResult

# Codes that mean the call, not the pair, failed: a chunk made only of these stops the run.
_RUN_FAILURE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE.name, grpc.StatusCode.UNAUTHENTICATED.name})


class RunFailed(Exception):
    """The run could not go on (server unreachable, bad input file); exit non-zero."""


@dataclass(frozen=True)
class FileJob:
    qrels: Path
    output: Path
    images: Path | None = None
    column_query: str = "query_text"
    column_image_id: str = "image_id"
    image_url_column: str = "image_url"
    col_name: str = DEFAULT_COL_NAME


@dataclass(frozen=True)
class Summary:
    total: int
    skipped: int  # already in the output (--resume)
    ok: int
    failed: int
    seconds: float


def job_settings_from_config(path: str | Path) -> dict[str, Any]:
    """The benchmark maker's config.toml keys, as FileJob fields."""
    data = read_toml(path)
    similarity = data.get("similarity_config", {})
    mapping = {
        "qrels": data.get("qrels_jsonl"),
        "images": data.get("images_jsonl"),
        "output": data.get("qrels_with_score_jsonl"),
        "column_query": data.get("column_query"),
        "column_image_id": data.get("column_image_id"),
        "image_url_column": data.get("image_url_temp_column"),
        "col_name": similarity.get("col_name"),
    }
    return {k: v for k, v in mapping.items() if v is not None}


# -- reading and writing rows ----------------------------------------------------------------------

def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".csv", ".parquet"):
        return suffix[1:]
    raise RunFailed(f"{path}: unknown file type {suffix!r} (use .jsonl, .csv or .parquet)")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise RunFailed("Parquet files need pyarrow: pip install 'clipserve[parquet]'") from None
    return pyarrow


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise RunFailed(f"{path}: no such file")
    kind = _kind(path)
    if kind == "parquet":
        return _pyarrow().parquet.read_table(path).to_pylist()
    with path.open(encoding="utf-8", newline="") as fh:
        if kind == "csv":
            return list(csv.DictReader(fh))
        rows = []
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RunFailed(f"{path}:{number}: not JSON: {exc}") from None
        return rows


class RowWriter(Protocol):
    def write(self, rows: Sequence[dict[str, Any]]) -> None: ...
    def close(self) -> None: ...


class _JsonlWriter:
    def __init__(self, path: Path, append: bool) -> None:
        self._fh = path.open("a" if append else "w", encoding="utf-8")

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self._fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        self._fh.flush()  # what is written survives a crash: --resume picks up from there

    def close(self) -> None:
        self._fh.close()


class _CsvWriter:
    def __init__(self, path: Path, append: bool, fieldnames: list[str]) -> None:
        self._fh = path.open("a" if append else "w", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=fieldnames)
        if not append:
            self._writer.writeheader()

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self._writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class _ParquetWriter:
    """Parquet cannot be appended to: rows are collected and written when the run ends."""

    def __init__(self, path: Path, existing: list[dict[str, Any]]) -> None:
        self._path = path
        self._rows = list(existing)

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self._rows.extend(rows)

    def close(self) -> None:
        pa = _pyarrow()
        pa.parquet.write_table(pa.Table.from_pylist(self._rows), self._path)


def _writer(job: FileJob, existing: list[dict[str, Any]], fieldnames: list[str]) -> RowWriter:
    kind = _kind(job.output)
    job.output.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        return _JsonlWriter(job.output, append=bool(existing))
    if kind == "csv":
        return _CsvWriter(job.output, append=bool(existing), fieldnames=fieldnames)
    return _ParquetWriter(job.output, existing)


# -- the run ----------------------------------------------------------------------------------------

def _url_map(job: FileJob) -> dict[str, str]:
    if job.images is None:
        return {}
    urls = {}
    for row in read_rows(job.images):
        if row.get(job.column_image_id) is not None and row.get(job.image_url_column):
            urls[str(row[job.column_image_id])] = str(row[job.image_url_column])
    return urls


def _pair(row: dict[str, Any], job: FileJob, urls: dict[str, str]) -> tuple[SimilarityInput, str | None]:
    """The pair a row asks for, and why it cannot be scored (None when it can)."""
    query = row.get(job.column_query)
    image_id = row.get(job.column_image_id)
    url = row.get(job.image_url_column) or (urls.get(str(image_id)) if image_id is not None else None)
    item = SimilarityInput(
        query=str(query or ""), image_url=str(url or ""), query_id=None, image_id=None if image_id is None else str(image_id)
    )
    if not query:
        return item, f"the row has no {job.column_query!r}"
    if image_id is None and not url:
        return item, f"the row has no {job.column_image_id!r}"
    if not url:
        return item, f"no image URL for {job.column_image_id}={image_id!r}"
    return item, None


def _check_resumable(existing: list[dict[str, Any]], rows: list[dict[str, Any]], job: FileJob) -> None:
    if len(existing) > len(rows):
        raise RunFailed(f"{job.output} has {len(existing)} rows, more than the {len(rows)} of {job.qrels}: not its output")
    for number, (done, row) in enumerate(zip(existing, rows), 1):
        for column in (job.column_query, job.column_image_id):
            if str(done.get(column)) != str(row.get(column)):
                raise RunFailed(f"{job.output} row {number} does not match {job.qrels} ({column}): cannot resume; remove the output or drop --resume")


def _chunks(indices: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def score_file(clip: Any, job: FileJob, *, resume: bool = False, chunk_size: int = 1024, progress: bool = True) -> Summary:
    """Score ``job.qrels`` into ``job.output`` with ``clip`` (a ``CLIP``)."""
    started = time.monotonic()
    try:
        clip.model_info()  # fail fast, before reading anything, when the server is not there
    except ClipServeError as exc:
        raise RunFailed(f"cannot use the server at {clip.address}: {exc}; rerun with --resume once it is up") from None
    rows = read_rows(job.qrels)
    urls = _url_map(job)
    existing = read_rows(job.output) if resume and job.output.exists() else []
    _check_resumable(existing, rows, job)
    fieldnames = list(dict.fromkeys([*(rows[0].keys() if rows else []), job.col_name]))
    todo = list(range(len(existing), len(rows)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows), initial=len(existing), unit="pair", desc=f"scoring {job.qrels.name}", dynamic_ncols=True)
    ok = failed = 0
    writer = _writer(job, existing, fieldnames)
    try:
        for chunk in _chunks(todo, chunk_size):
            pairs = [_pair(rows[i], job, urls) for i in chunk]
            sendable = [item for item, problem in pairs if problem is None]
            scored = iter(clip.score_batch(sendable, progress=False)) if sendable else iter(())
            results: list[SimilarityResult] = [
                next(scored) if problem is None else failed_result(item, grpc.StatusCode.INVALID_ARGUMENT.name, problem)
                for item, problem in pairs
            ]
            sent = [r for (_, problem), r in zip(pairs, results) if problem is None]
            if sent and all(r.error_code in _RUN_FAILURE_CODES for r in sent):
                raise RunFailed(f"the server failed every pair of a chunk ({sent[0].error}); rerun with --resume to continue")
            out = []
            for i, result in zip(chunk, results):
                row = dict(rows[i])
                row[job.col_name] = result.score
                out.append(row)
            writer.write(out)
            chunk_failed = sum(1 for r in results if r.error is not None)
            ok += len(results) - chunk_failed
            failed += chunk_failed
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(ok=ok, failed=failed, refresh=False)
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return Summary(total=len(rows), skipped=len(existing), ok=ok, failed=failed, seconds=time.monotonic() - started)


def print_summary(summary: Summary, job: FileJob) -> None:
    scored = summary.ok + summary.failed
    rate = scored / summary.seconds if summary.seconds > 0 else 0.0
    skipped = f", {summary.skipped} already scored" if summary.skipped else ""
    print(
        f"{job.output}: {summary.total} rows: {summary.ok} scored, {summary.failed} failed (score null){skipped}; "
        f"{scored} pairs in {summary.seconds:.1f}s ({rate:.1f} pairs/s)",
        file=sys.stderr,
    )
