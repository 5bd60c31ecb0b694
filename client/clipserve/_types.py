"""Plain data types shared with the in-process reference adapter (same field names)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SimilarityInput:
    """One (query, image) pair to score.

    ``image_url`` is an http(s) URL that the server fetches, or a local path / ``file://``
    URL whose bytes the client reads and uploads.
    """

    query: str
    image_url: str
    query_id: str | None = None
    image_id: str | None = None


@dataclass(frozen=True)
class SimilarityResult:
    """The score of one pair, or why it has none.

    Exactly one of ``score`` and ``error`` is set. ``error`` reads ``"CODE: message"``
    where CODE is a gRPC status code name (``error_code`` holds it alone).
    """

    query: str
    image_url: str
    score: float | None
    query_id: str | None = None
    image_id: str | None = None
    error: str | None = None
    error_code: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class EmbeddingResult:
    """The embedding of one text or image, or why it has none.

    ``input`` is the text or image reference as given. Exactly one of ``embedding`` and
    ``error`` is set; ``error`` reads ``"CODE: message"`` as in ``SimilarityResult``.
    """

    input: str
    embedding: list[float] | None
    error: str | None = None
    error_code: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def as_array(results: Sequence[EmbeddingResult]) -> Any:
    """The embeddings as one float32 numpy matrix, a row per result, in order.

    Raises ValueError when a result has no embedding (say which), and ImportError when numpy
    is not installed (the SDK itself does not need it).
    """
    try:
        import numpy as np
    except ImportError:
        raise ImportError("clipserve.as_array needs numpy: pip install numpy") from None
    failed = [i for i, r in enumerate(results) if r.embedding is None]
    if failed:
        raise ValueError(
            f"{len(failed)} of {len(results)} results have no embedding, e.g. #{failed[0]}: {results[failed[0]].error}"
        )
    if not results:
        return np.zeros((0, 0), dtype=np.float32)
    return np.asarray([r.embedding for r in results], dtype=np.float32)
