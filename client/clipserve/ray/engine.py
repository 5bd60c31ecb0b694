"""``RayEngine``: what ``score-file`` / ``embed-file --engine ray`` score and embed with.

It answers the calls the file tools make of a ``clipserve.CLIP`` (``score_batch``,
``embed_texts``, ``embed_images``, ``model_info``, ``stats``), each batch call run as one Ray
Data job: the inputs cut into blocks of ``batch_size``, ``map_batches`` over a pool of
``concurrency`` actors (``ScoreBatches`` / ``EmbedBatches``, one SDK client each, over the
whole fleet), and the results put back in input order. So the file tools keep their own
reading, writing, ``--resume`` and summaries, and write the same file as with the SDK.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import grpc
import ray

from .._client import CLIP
from .._errors import ClipServeError
from .._jobs import coerce_input
from .._run import ClientStats
from .._types import EmbeddingResult, SimilarityResult
from .batches import EmbedBatches, ScoreBatches

_ROW = "__clipserve_row"  # each input's position, carried through the job


def quiet_ray_data() -> None:
    """No progress bars or per-job log lines from Ray Data: the file tools have their own."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    # ERROR: its warnings are about its own settings ("progress bars disabled") or false alarms
    # (a pool whose actors hold every CPU "will hang": it does not, it needs no other task).
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _clip_error(exc: BaseException) -> ClipServeError:
    """The ClipServeError an actor raised, from the Ray exceptions wrapping it; else one
    saying the job failed."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ClipServeError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
    return ClipServeError(grpc.StatusCode.UNAVAILABLE, f"the Ray job failed: {exc}")


def _code(error: str | None) -> str | None:
    return None if error is None else error.partition(":")[0]


class RayEngine:
    """Batch calls as Ray Data jobs over the fleet at ``address``.

    Args:
        address: the fleet's address list (``Fleet``), or any address ``clipserve.CLIP`` takes.
        model: which of the servers' models ("" for their default).
        batch_size: rows per ``map_batches`` batch (one SDK ``score_batch`` call in an actor).
        concurrency: actors in the pool, each one SDK client.
        num_cpus: CPUs each actor reserves.
        **client: more ``clipserve.CLIP`` arguments (``timeout``, TLS, ``auth_token``).
    """

    def __init__(
        self,
        address: str,
        *,
        model: str = "",
        batch_size: int = 1024,
        concurrency: int = 2,
        num_cpus: float = 1,
        **client: Any,
    ) -> None:
        self.address = address
        self.model = model
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.num_cpus = num_cpus
        self._client = client
        self._clip = CLIP(address, model=model, **client)  # the driver's own calls: model_info

    def model_info(self, model: str | None = None) -> Any:
        return self._clip.model_info(model)

    def stats(self) -> ClientStats:
        return ClientStats()  # the answers per replica are counted in the actors, not here

    def close(self) -> None:
        self._clip.close()

    def __enter__(self) -> "RayEngine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the batch calls ---------------------------------------------------------------------
    def score_batch(self, inputs: Iterable[Any], *, progress: bool | None = None) -> list[SimilarityResult]:
        items = [coerce_input(item) for item in inputs]
        columns = {"query": [i.query for i in items], "image": [i.image_url for i in items]}
        kwargs = {"query_column": "query", "image_column": "image", "score_column": "score", "error_column": "error"}
        out = self._run(ScoreBatches, columns, kwargs)
        return [
            SimilarityResult(item.query, item.image_url, score, item.query_id, item.image_id, error, _code(error))
            for item, score, error in zip(items, out["score"], out["error"])
        ]

    def embed_texts(
        self, texts: Iterable[str], *, raw: bool = False, progress: bool | None = None
    ) -> list[EmbeddingResult]:
        return self._embed(list(texts), "text", raw)

    def embed_images(
        self, images: Iterable[str], *, raw: bool = False, progress: bool | None = None
    ) -> list[EmbeddingResult]:
        return self._embed(list(images), "image", raw)

    def _embed(self, values: list[str], kind: str, raw: bool) -> list[EmbeddingResult]:
        kwargs = {"column": "value", "kind": kind, "raw": raw, "embedding_column": "embedding", "error_column": "error"}
        out = self._run(EmbedBatches, {"value": values}, kwargs)
        return [
            EmbeddingResult(value, vector, error, _code(error))
            for value, vector, error in zip(values, out["embedding"], out["error"])
        ]

    def _run(self, fn: type, columns: dict[str, list[Any]], kwargs: dict[str, Any]) -> dict[str, list[Any]]:
        """One Ray Data job over ``columns``; the output columns, in input order, every row
        exactly once (checked: a row missing or twice is a RuntimeError, never a wrong file)."""
        import pyarrow as pa
        import ray.data

        total = len(next(iter(columns.values())))
        if total == 0:
            return {name: [] for name in ("score", "embedding", "error")}
        table = pa.table({_ROW: pa.array(range(total), pa.int64()), **columns})
        # One block per batch, so that every actor of the pool gets work from the start.
        blocks = [table.slice(start, self.batch_size) for start in range(0, total, self.batch_size)]
        dataset = ray.data.from_arrow(blocks).map_batches(
            fn,
            fn_constructor_kwargs={"address": self.address, "model": self.model, **kwargs, **self._client},
            # No more actors than blocks. Actors restarted, batches retried: see batches.py.
            compute=ray.data.ActorPoolStrategy(size=min(self.concurrency, len(blocks))),
            batch_size=self.batch_size,
            batch_format="pyarrow",
            num_cpus=self.num_cpus,
        )
        try:
            parts = [ray.get(ref) for ref in dataset.to_arrow_refs()]
        except Exception as exc:  # a batch's call failed as a whole (batches.py), or Ray did
            raise _clip_error(exc) from exc
        out = pa.concat_tables(parts) if parts else table.slice(0, 0)
        rows = out.column(_ROW).to_pylist()
        order = sorted(range(len(rows)), key=rows.__getitem__)
        if [rows[i] for i in order] != list(range(total)):
            raise RuntimeError(f"the Ray job returned {len(rows)} rows for {total} inputs ({len(set(rows))} distinct)")
        answers = {name: out.column(name).to_pylist() for name in out.column_names if name not in columns}
        return {name: [values[i] for i in order] for name, values in answers.items()}


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` ("auto": the one this machine runs; None: a local
    one started here), unless this process already has; quietly."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    quiet_ray_data()
