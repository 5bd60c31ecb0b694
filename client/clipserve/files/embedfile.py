"""Embedding a whole file of texts or images (``clipserve embed-file``), to build an index.

Reads rows (JSONL, CSV or Parquet by extension), embeds one column of each row (texts, or
image URLs / local paths), and writes the vectors in input order: a Parquet file with the input
columns plus ``embedding`` (a fixed-size list of float32, null where the row failed) and
``error``; or a ``.npy`` matrix (a NaN row where the row failed) with a ``.ids.jsonl`` beside it
(one line per row: its id and error).

It is resumable: each chunk's vectors are saved in ``OUTPUT.parts/`` as soon as they arrive;
``--resume`` keeps the chunks found there and embeds the rest, and the output is assembled
(atomically) when every row has its vector.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ClipServeError
from .._types import EmbeddingResult
from .rows import RunFailed, pyarrow, read_rows, replace_atomically
from .tally import Tally

if TYPE_CHECKING:
    from .._client import CLIP


@dataclass(frozen=True)
class EmbedFileJob:
    input: Path
    output: Path
    column: str
    images: bool  # the column holds image URLs / paths, not texts
    id_column: str | None = None
    raw: bool = False

    @property
    def parts(self) -> Path:
        return self.output.with_name(self.output.name + ".parts")


@dataclass(frozen=True)
class EmbedSummary:
    output: Path
    total: int
    skipped: int  # rows whose vectors a previous run had saved (--resume)
    tally: Tally
    seconds: float

    def lines(self) -> list[str]:
        done = self.tally.ok + self.tally.failed
        rate = done / self.seconds if self.seconds > 0 else 0.0
        skipped = f", {self.skipped} embedded before" if self.skipped else ""
        lines = [
            (
                f"{self.output}: {self.total} rows: {self.tally.ok} embedded, {self.tally.failed} failed{skipped}; "
                f"{done} in {self.seconds:.1f}s ({rate:.1f}/s)"
            )
        ]
        if self.tally.failed:
            lines.append(f"{self.tally.failed} failed: {self.tally.reasons()}")
        return lines


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise RunFailed("embed-file needs numpy: pip install numpy") from None
    return numpy


def embed_file(
    clip: CLIP, job: EmbedFileJob, *, resume: bool = False, chunk_size: int = 1024, progress: bool = True
) -> EmbedSummary:
    """Embed ``job.column`` of every row of ``job.input`` into ``job.output`` with ``clip``."""
    _numpy()  # before any work: say at once that it is missing
    started = time.monotonic()
    suffix = job.output.suffix.lower()
    if suffix not in (".parquet", ".npy"):
        raise RunFailed(f"{job.output}: write embeddings to a .parquet or a .npy file")
    if suffix == ".parquet":
        pyarrow()  # before any work: say at once that it is missing
    try:
        dim = clip.model_info().embedding_dim  # also: fail fast when the server is not there
    except ClipServeError as exc:
        raise RunFailed(f"{exc}; rerun with --resume to carry on") from None
    rows = read_rows(job.input)
    if rows and job.column not in rows[0]:
        raise RunFailed(f"{job.input} has no column {job.column!r} (it has {', '.join(rows[0])})")
    if not resume and job.parts.exists():
        shutil.rmtree(job.parts)
    job.parts.mkdir(parents=True, exist_ok=True)
    done = _saved_rows(job.parts, len(rows))
    tally = Tally()
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(rows),
        initial=done,
        unit="row",
        desc=f"embedding {job.input.name}",
        dynamic_ncols=True,
        disable=not progress,
    )
    embed = clip.embed_images if job.images else clip.embed_texts
    try:
        for start in range(done, len(rows), chunk_size):
            chunk = rows[start : start + chunk_size]
            values = [str(row.get(job.column) or "") for row in chunk]
            try:
                results = embed(values, raw=job.raw, progress=False)
            except ClipServeError as exc:
                raise RunFailed(f"{exc}; rerun with --resume to carry on") from None
            _save_part(job.parts, start, results, dim)
            tally.add(results)
            bar.update(len(chunk))
            bar.set_postfix(ok=tally.ok, failed=tally.failed, refresh=False)
    finally:
        bar.close()
    _assemble(job, rows, dim)
    shutil.rmtree(job.parts)
    return EmbedSummary(job.output, total=len(rows), skipped=done, tally=tally, seconds=time.monotonic() - started)


# -- parts: one file per chunk, saved as it arrives ----------------------------------------------

def _part_name(start: int, count: int) -> str:
    return f"{start:012d}-{start + count:012d}.npz"


def _saved_rows(parts: Path, total: int) -> int:
    """How many rows, from the first, the saved parts cover; parts past a gap are dropped."""
    covered = 0
    for part in sorted(parts.glob("*.npz")):
        start, end = (int(x) for x in part.stem.split("-"))
        if start != covered or end > total:
            raise RunFailed(f"{parts} does not belong to this input ({part.name}): remove it or drop --resume")
        covered = end
    return covered


def _save_part(parts: Path, start: int, results: Sequence[EmbeddingResult], dim: int) -> None:
    np = _numpy()
    matrix = np.full((len(results), dim), np.nan, dtype=np.float32)
    for i, result in enumerate(results):
        if result.embedding is not None:
            matrix[i] = result.embedding
    errors = np.array([json.dumps(r.error) for r in results])
    replace_atomically(parts / _part_name(start, len(results)), lambda path: _write_npz(path, matrix, errors))


def _write_npy(path: Path, matrix: Any) -> None:
    with path.open("wb") as fh:
        _numpy().save(fh, matrix)


def _write_npz(path: Path, matrix: Any, errors: Any) -> None:
    with path.open("wb") as fh:
        _numpy().savez(fh, embedding=matrix, error=errors)


def _load_parts(parts: Path) -> tuple[Any, list[str | None]]:
    np = _numpy()
    matrices: list[Any] = []
    errors: list[str | None] = []
    for part in sorted(parts.glob("*.npz")):
        with np.load(part) as data:
            matrices.append(data["embedding"])
            errors.extend(json.loads(e) for e in data["error"])
    return np.concatenate(matrices) if matrices else np.zeros((0, 0), np.float32), errors


# -- the output ---------------------------------------------------------------------------------------

def _assemble(job: EmbedFileJob, rows: list[dict[str, Any]], dim: int) -> None:
    matrix, errors = _load_parts(job.parts)
    if job.output.suffix.lower() == ".npy":
        replace_atomically(job.output, lambda path: _write_npy(path, matrix.reshape(len(rows), dim)))
        ids = job.output.with_name(job.output.stem + ".ids.jsonl")
        lines = "".join(
            json.dumps({"id": row.get(job.id_column) if job.id_column else i, "error": error}) + "\n"
            for i, (row, error) in enumerate(zip(rows, errors))
        )
        replace_atomically(ids, lambda path: path.write_text(lines, encoding="utf-8"))
        return
    pa = pyarrow()
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    if job.id_column is not None:
        table = table.select([job.id_column])
    failed = pa.array([error is not None for error in errors], type=pa.bool_())
    table = table.append_column(
        "embedding",
        pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1), type=pa.float32()), dim, mask=failed),
    )
    table = table.append_column("error", pa.array(errors, type=pa.string()))
    replace_atomically(job.output, lambda path: pa.parquet.write_table(table, path))
