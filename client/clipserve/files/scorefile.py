"""Scoring a whole benchmark file, as the benchmark maker's similarity step does.

Reads qrels rows (JSONL, CSV or Parquet by extension), finds each row's image URL (the row's
own URL column, else the images file, else ``image_base_url`` + the image id), scores every
pair, and writes every input row unchanged plus the score column (null where the pair
failed), in input order. ``retry_failed`` is the benchmark maker's ``similarity-retry``:
re-score, in place, the rows of a scored file whose score is null or missing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from .._config import DEFAULT_COL_NAME, read_toml
from .._errors import ClipServeError
from .._jobs import failed_score
from .._types import SimilarityInput, SimilarityResult
from .inplace import Updates, open_scored
from .rows import RunFailed, open_writer, read_rows
from .tally import Tally

if TYPE_CHECKING:
    from .._client import CLIP

@dataclass(frozen=True)
class FileJob:
    output: Path
    qrels: Path | None = None  # not read by retry_failed, which re-scores the output
    images: Path | None = None
    column_query: str = "query_text"
    column_image_id: str = "image_id"
    image_url_column: str = "image_url"
    image_base_url: str | None = None
    col_name: str = DEFAULT_COL_NAME
    error_column: str | None = None

    def result_columns(self, result: SimilarityResult) -> dict[str, Any]:
        """What a row gets from its result: the score, and the error when asked for."""
        columns: dict[str, Any] = {self.col_name: result.score}
        if self.error_column:
            columns[self.error_column] = result.error
        return columns

    @property
    def column_types(self) -> dict[str, str]:
        """Arrow types of the written columns (Parquet: a column of nulls needs one)."""
        types = {self.col_name: "float64"}
        if self.error_column:
            types[self.error_column] = "string"
        return types


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
        "image_base_url": data.get("image_base_url"),
        "col_name": similarity.get("col_name"),
    }
    return {k: v for k, v in mapping.items() if v is not None}


# -- what each row asks for -------------------------------------------------------------------------

def _url_map(job: FileJob) -> dict[str, str]:
    if job.images is None:
        return {}
    urls = {}
    for row in read_rows(job.images):
        if row.get(job.column_image_id) is not None and row.get(job.image_url_column):
            urls[str(row[job.column_image_id])] = str(row[job.image_url_column])
    return urls


def _image_url(row: dict[str, Any], job: FileJob, urls: dict[str, str]) -> str | None:
    if row.get(job.image_url_column):
        return str(row[job.image_url_column])
    image_id = row.get(job.column_image_id)
    if image_id is None or image_id == "":
        return None
    if str(image_id) in urls:
        return urls[str(image_id)]
    if job.image_base_url:
        # As the benchmark maker builds image_url (preprocess.build_row): no URL-encoding.
        return job.image_base_url.rstrip("/") + "/" + str(image_id).lstrip("/")
    return None


def _no_url(job: FileJob, image_id: Any) -> str:
    where = f"{job.images.name} has no {job.image_url_column!r} for it" if job.images is not None else "no images file"
    return f"no image URL for {job.column_image_id} {image_id!r}: {where}, and no image_base_url is set"


def _pair(row: dict[str, Any], job: FileJob, urls: dict[str, str]) -> tuple[SimilarityInput, str | None]:
    """The pair a row asks for, and why it cannot be scored (None when it can)."""
    query = row.get(job.column_query)
    image_id = row.get(job.column_image_id)
    url = _image_url(row, job, urls)
    item = SimilarityInput(
        query="" if query is None else str(query),
        image_url=url or "",
        image_id=None if image_id is None else str(image_id),
    )
    if query is None or query == "":
        return item, f"the row has no {job.column_query!r}"
    if url is None:
        return item, _no_url(job, image_id) if image_id not in (None, "") else f"the row has no {job.column_image_id!r}"
    return item, None


def _score_rows(
    clip: CLIP, rows: Sequence[dict[str, Any]], job: FileJob, urls: dict[str, str]
) -> tuple[list[SimilarityResult], ClipServeError | None]:
    """One result per row, in order; and the error that stopped the call, if one did (the
    server could not be reached or refused it): then the rows it did not answer carry it."""
    pairs = [_pair(row, job, urls) for row in rows]
    sendable = [item for item, problem in pairs if problem is None]
    error = None
    try:
        scored = clip.score_batch(sendable, progress=False) if sendable else []
    except ClipServeError as exc:
        if exc.results is None:
            raise
        scored, error = exc.results, exc
    answers = iter(scored)
    invalid = grpc.StatusCode.INVALID_ARGUMENT.name
    results = [next(answers) if problem is None else failed_score(item, invalid, problem) for item, problem in pairs]
    return results, error


# -- the summary --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    output: Path
    total: int  # rows in the file
    skipped: int  # rows left as they were: already in the output (--resume), or with a score (--retry-failed)
    tally: Tally
    seconds: float
    retry: bool = False
    replicas: dict[str, int] = field(default_factory=dict)  # pairs each server answered

    def lines(self) -> list[str]:
        scored = self.tally.ok + self.tally.failed
        if self.retry and self.skipped == self.total:
            return [f"{self.output}: {self.total} rows, every one has a score: nothing to retry, the file is unchanged"]
        rate = scored / self.seconds if self.seconds > 0 else 0.0
        pace = f"{scored} pairs in {self.seconds:.1f}s ({rate:.1f} pairs/s)"
        if self.retry:
            head = (
                f"{self.output}: {self.total} rows, {scored} without a score re-scored: "
                f"{self.tally.ok} scored, {self.tally.failed} still failed (score null); {pace}"
            )
        else:
            skipped = f", {self.skipped} already scored" if self.skipped else ""
            head = (
                f"{self.output}: {self.total} rows: {self.tally.ok} scored, "
                f"{self.tally.failed} failed (score null){skipped}; {pace}"
            )
        lines = [head]
        if self.tally.failed:
            lines.append(f"{self.tally.failed} failed: {self.tally.reasons()}")
        if len(self.replicas) > 1:
            lines.append(
                "pairs per replica: " + ", ".join(f"{name} {count}" for name, count in sorted(self.replicas.items()))
            )
        return lines


def _answered_since(clip: CLIP, before: dict[str, int]) -> dict[str, int]:
    """Pairs each replica answered since ``before`` (a ``clip.stats().items_by_replica``)."""
    now = clip.stats().items_by_replica
    return {name: count - before.get(name, 0) for name, count in now.items() if count > before.get(name, 0)}


# -- the runs -----------------------------------------------------------------------------------------

def _chunks(indices: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def _progress(progress: bool, total: int, initial: int, name: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, unit="pair", desc=f"scoring {name}", dynamic_ncols=True, disable=not progress
    )


def _server_failed(clip: CLIP, error: ClipServeError, rerun: str) -> RunFailed:
    # The SDK names the address when it could not reach the server; other refusals do not.
    what = str(error) if clip.address in error.details else f"the server at {clip.address}: {error}"
    return RunFailed(f"{what}; rerun with {rerun} to carry on")


def _check_server(clip: CLIP, rerun: str) -> None:
    try:
        clip.model_info()  # fail fast, before reading anything, when the server is not there
    except ClipServeError as exc:
        raise _server_failed(clip, exc, rerun) from None


def _check_resumable(existing: list[dict[str, Any]], rows: list[dict[str, Any]], job: FileJob) -> None:
    if len(existing) > len(rows):
        raise RunFailed(
            f"{job.output} has {len(existing)} rows, more than the {len(rows)} of {job.qrels}: not its output"
        )
    for number, (done, row) in enumerate(zip(existing, rows), 1):
        for column in (job.column_query, job.column_image_id):
            if str(done.get(column)) != str(row.get(column)):
                raise RunFailed(
                    f"{job.output} row {number} does not match {job.qrels} ({column}): cannot resume; "
                    "remove the output or drop --resume"
                )


def score_file(
    clip: CLIP, job: FileJob, *, resume: bool = False, chunk_size: int = 1024, progress: bool = True
) -> Summary:
    """Score ``job.qrels`` into ``job.output`` with ``clip``."""
    started = time.monotonic()
    if job.qrels is None:
        raise RunFailed("no qrels file to score: give it as the argument, or qrels_jsonl in --config")
    _check_server(clip, "--resume")
    rows = read_rows(job.qrels)
    urls = _url_map(job)
    existing = read_rows(job.output) if resume and job.output.exists() else []
    _check_resumable(existing, rows, job)
    fieldnames = list(dict.fromkeys([*(rows[0].keys() if rows else []), *job.column_types]))
    tally = Tally()
    answered_before = clip.stats().items_by_replica
    bar = _progress(progress, len(rows), len(existing), job.qrels.name)
    writer = open_writer(job.output, existing, fieldnames, job.column_types)
    try:
        for chunk in _chunks(range(len(existing), len(rows)), chunk_size):
            results, error = _score_rows(clip, [rows[i] for i in chunk], job, urls)
            if error is not None:
                # Keep the output a prefix of the input that --resume can carry on from.
                stop = next((n for n, r in enumerate(results) if r.error_code == error.code.name), len(results))
                results = results[:stop]
            writer.write([{**rows[i], **job.result_columns(result)} for i, result in zip(chunk, results)])
            tally.add(results)
            bar.update(len(results))
            bar.set_postfix(ok=tally.ok, failed=tally.failed, refresh=False)
            if error is not None:
                raise _server_failed(clip, error, "--resume")
    finally:
        writer.close()
        bar.close()
    return Summary(
        job.output,
        total=len(rows),
        skipped=len(existing),
        tally=tally,
        seconds=time.monotonic() - started,
        replicas=_answered_since(clip, answered_before),
    )


def retry_failed(clip: CLIP, job: FileJob, *, chunk_size: int = 1024, progress: bool = True) -> Summary:
    """Re-score the rows of ``job.output`` whose score is null or missing, in place.

    Like the benchmark maker's ``similarity-retry``: a NaN score is a score and is kept, and
    nothing is written when no row needs it. Rows with a score are written back byte for
    byte; the file is replaced atomically, also when the server fails half way (the rows
    re-scored by then are kept).
    """
    started = time.monotonic()
    scored = open_scored(job.output)
    todo = [i for i, row in enumerate(scored.rows) if row.get(job.col_name) is None]
    tally = Tally()
    answered_before = clip.stats().items_by_replica
    if todo:
        _check_server(clip, "--retry-failed")
        urls = _url_map(job)
        updates: Updates = {}
        bar = _progress(progress, len(todo), 0, job.output.name)
        try:
            for chunk in _chunks(todo, chunk_size):
                results, error = _score_rows(clip, [scored.rows[i] for i in chunk], job, urls)
                for i, result in zip(chunk, results):
                    columns = job.result_columns(result)
                    if any(
                        name not in scored.rows[i] or scored.rows[i][name] != value for name, value in columns.items()
                    ):
                        updates[i] = columns  # a row still failing as before stays as it was
                tally.add(results)
                bar.update(len(chunk))
                bar.set_postfix(ok=tally.ok, failed=tally.failed, refresh=False)
                if error is not None:
                    raise _server_failed(clip, error, "--retry-failed")
        finally:
            bar.close()
            if updates:
                scored.save(updates, job.column_types)
    return Summary(
        job.output,
        total=len(scored.rows),
        skipped=len(scored.rows) - len(todo),
        tally=tally,
        seconds=time.monotonic() - started,
        retry=True,
        replicas=_answered_since(clip, answered_before),
    )
