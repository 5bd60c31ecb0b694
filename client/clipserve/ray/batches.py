"""Callable classes for Ray Data's ``map_batches``: each actor holds one SDK client, which
spreads its batches over every replica of the fleet's address.

    ds.map_batches(ScoreBatches, fn_constructor_kwargs={"address": address},
                   compute=ray.data.ActorPoolStrategy(size=8), batch_size=1024, batch_format="pandas")

Nothing is lost, and every row comes out once:
- a replica that dies mid-batch is the SDK's business: the batch's unanswered pairs go to the
  other replicas (and back to this one once its actor has restarted it);
- an actor that dies mid-batch (its process killed, its node lost) is started again by Ray and
  its unfinished batches run again on an actor of the pool: Ray Data gives its actor pools
  ``max_restarts=-1`` and ``max_task_retries=-1`` unless told otherwise (tests/e2e/test_ray.py
  kills one mid-job). A batch's rows come out only with the task that finished it, so none
  twice. (Passing those two to ``map_batches`` as ``**ray_remote_args`` still works but is
  deprecated since Ray 2.60; do not pass ``max_restarts=0``.)
- a batch whose call fails as a whole (no replica reachable within the SDK's
  ``RetryPolicy``, a refused token) raises ``ClipServeError``: an application error, which
  Ray does not retry, so the job fails rather than write rows without scores. Rows whose
  pair failed (a 404, a broken image) get a null score and, with ``error_column``, the error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .._client import CLIP

def _column(batch: Any, name: str) -> list[Any]:
    """One column of a pandas DataFrame, a pyarrow Table or a dict of numpy arrays, as a list."""
    if hasattr(batch, "column_names"):  # pyarrow.Table
        if name not in batch.column_names:
            raise KeyError(f"the batch has no column {name!r} (it has {', '.join(batch.column_names)})")
        return list(batch.column(name).to_pylist())
    if name not in batch:
        raise KeyError(f"the batch has no column {name!r} (it has {', '.join(map(str, batch.keys()))})")
    column = batch[name]
    return list(column.tolist() if hasattr(column, "tolist") else column)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def _with_columns(batch: Any, columns: dict[str, tuple[Sequence[Any], str]]) -> Any:
    """The batch with ``columns`` (name -> (values, arrow type name)) added or replaced, in the
    batch's own format."""
    if hasattr(batch, "column_names"):  # pyarrow.Table
        import pyarrow as pa

        for name, (values, type_name) in columns.items():
            array = pa.array(
                values, type=pa.list_(pa.float32()) if type_name == "list<float32>" else pa.type_for_alias(type_name)
            )
            index = batch.schema.get_field_index(name)
            batch = batch.set_column(index, name, array) if index >= 0 else batch.append_column(name, array)
        return batch
    import numpy as np

    out = batch.copy()  # a DataFrame, or a dict of numpy arrays: the caller's stays as it was
    for name, (values, type_name) in columns.items():
        if type_name == "float64":
            out[name] = np.array([np.nan if v is None else v for v in values], dtype=np.float64)
        elif type_name == "list<float32>":
            vectors = np.empty(len(values), dtype=object)  # one array per row, None where it failed
            for i, value in enumerate(values):
                vectors[i] = None if value is None else np.asarray(value, dtype=np.float32)
            out[name] = vectors
        else:
            out[name] = np.array(values, dtype=object)
    return out


class _Batches:
    """One SDK client per actor, closed with it."""

    def __init__(self, address: str, model: str | None, client: dict[str, Any]) -> None:
        self.clip = CLIP(address, model=model or "", **client)

    def __del__(self) -> None:
        clip = getattr(self, "clip", None)  # None when __init__ failed
        if clip is not None:
            clip.close()


class ScoreBatches(_Batches):
    """Adds ``score_column`` (float64; null where the pair failed) and, if set,
    ``error_column`` (``"CODE: message"``, null where scored) to each batch.

    Args:
        address: the fleet (``Fleet``'s address list, a ``dns:///`` name, ``host:port,...``).
        query_column: the texts.
        image_column: the images: http(s) URLs the servers fetch, or paths the actor reads
            and uploads (so they must exist where the actor runs).
        score_column: the column to add.
        error_column: also add each row's error to this column.
        model: which of the servers' models; None for their default.
        **client: more ``clipserve.CLIP`` arguments (``timeout``, ``auth_token``, TLS files).
    """

    def __init__(
        self,
        address: str,
        query_column: str = "query_text",
        image_column: str = "image_url",
        score_column: str = "clip_score",
        error_column: str | None = None,
        model: str | None = None,
        **client: Any,
    ) -> None:
        super().__init__(address, model, client)
        self.query_column, self.image_column = query_column, image_column
        self.score_column, self.error_column = score_column, error_column

    def __call__(self, batch: Any) -> Any:
        pairs = list(zip(map(_text, _column(batch, self.query_column)), map(_text, _column(batch, self.image_column))))
        results = self.clip.score_batch(pairs, progress=False)
        columns: dict[str, tuple[Sequence[Any], str]] = {self.score_column: ([r.score for r in results], "float64")}
        if self.error_column:
            columns[self.error_column] = ([r.error for r in results], "string")
        return _with_columns(batch, columns)


class EmbedBatches(_Batches):
    """Adds ``embedding_column`` (a list of float32 per row, null where it failed) and, if
    set, ``error_column`` to each batch.

    Args:
        address: the fleet, as for ``ScoreBatches``.
        column: what to embed: texts, or image URLs / paths.
        kind: ``"image"`` or ``"text"``.
        embedding_column: the column to add.
        error_column: also add each row's error to this column.
        raw: the model's own features instead of unit vectors.
        model: which of the servers' models; None for their default.
        **client: more ``clipserve.CLIP`` arguments, as for ``ScoreBatches``.
    """

    def __init__(
        self,
        address: str,
        column: str,
        kind: str = "image",
        embedding_column: str = "embedding",
        error_column: str | None = None,
        raw: bool = False,
        model: str | None = None,
        **client: Any,
    ) -> None:
        if kind not in ("image", "text"):
            raise ValueError(f"kind={kind!r}: 'image' or 'text'")
        super().__init__(address, model, client)
        self.column, self.raw = column, raw
        self.embed = self.clip.embed_images if kind == "image" else self.clip.embed_texts
        self.embedding_column, self.error_column = embedding_column, error_column

    def __call__(self, batch: Any) -> Any:
        results = self.embed([_text(v) for v in _column(batch, self.column)], raw=self.raw, progress=False)
        columns: dict[str, tuple[Sequence[Any], str]] = {
            self.embedding_column: ([r.embedding for r in results], "list<float32>")
        }
        if self.error_column:
            columns[self.error_column] = ([r.error for r in results], "string")
        return _with_columns(batch, columns)
