"""What the Open Inference Protocol's models do: two signatures over the scoring engines.

``ClipFeatures`` (the alias, ``clip`` by default) is the signature of the Triton python-backend
CLIP model that Triton users already call (waggle-sensor's sage-nrp-image-search): a text and
an image in, each one's features out, zeros standing for the missing one. ``BatchScores`` is
each served model under its own name: N texts and N images in, N scores and N error strings
out, item by item as ``ScoreBatch`` answers them (same caches, batching, fetch guard, limits).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from ..inference.engine import ScoringEngine
from ..inference.promises import awaited
from ..utils.domain import EmbedItem, ImageSource, ScoreItem
from ..utils.errors import ItemError
from .status import grpc_code
from .tensors import TensorSpec, invalid, text_of

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class ClipFeatures:
    """text BYTES [1] + image FP32 [H, W, 3] (RGB 0..255) -> text_embedding and
    image_embedding FP32 [1, D]: the model's own (unnormalised) features. An empty text (after
    stripping, as that model does) gives zeros, and so does an all-zero image (what a caller
    without an image sends: a 1x1 black one)."""

    inputs = (TensorSpec("text", "BYTES", (1,)), TensorSpec("image", "FP32", (-1, -1, 3)))
    outputs = (TensorSpec("text_embedding", "FP32", (1, -1)), TensorSpec("image_embedding", "FP32", (1, -1)))

    def __init__(self, engine: ScoringEngine) -> None:
        self._engine = engine

    async def infer(self, arrays: Arrays) -> Arrays:
        for spec in self.inputs:
            if spec.name not in arrays:
                raise invalid(f"missing input {spec.name!r} ({spec.datatype} {list(spec.shape)})")
        text = text_of(arrays["text"][0], "text").strip()
        pixels = arrays["image"]
        zeros = np.zeros(self._engine.description.embedding_dim, dtype=np.float32)
        text_features = self._engine.embed(EmbedItem(text=text, raw=True), wait=False) if text else zeros
        image_features = (
            self._engine.embed(EmbedItem(image=ImageSource(pixels=pixels), raw=True), wait=False)
            if pixels.any()
            else zeros
        )
        text_vector, image_vector = await asyncio.gather(awaited(text_features), awaited(image_features))
        return {"text_embedding": text_vector[None, :], "image_embedding": image_vector[None, :]}


class BatchScores:
    """text BYTES [N] + image_url or image_bytes BYTES [N] -> score FP32 [N] (NaN where the
    item failed) and error BYTES [N] ("CODE: message", empty where scored)."""

    inputs = (
        TensorSpec("text", "BYTES", (-1,)),
        TensorSpec("image_url", "BYTES", (-1,)),
        TensorSpec("image_bytes", "BYTES", (-1,)),
    )
    outputs = (TensorSpec("score", "FP32", (-1,)), TensorSpec("error", "BYTES", (-1,)))

    def __init__(self, engine: ScoringEngine) -> None:
        self._engine = engine

    async def infer(self, arrays: Arrays) -> Arrays:
        if "text" not in arrays:
            raise invalid("missing input 'text' (BYTES [N])")
        images = [name for name in ("image_url", "image_bytes") if name in arrays]
        if len(images) != 1:
            raise invalid(
                "give one of the inputs 'image_url' and 'image_bytes' (BYTES [N])"
                if not images
                else "give 'image_url' or 'image_bytes', not both"
            )
        texts, sources = arrays["text"], arrays[images[0]]
        if len(texts) != len(sources):
            raise invalid(
                f"input 'text' has {len(texts)} elements and {images[0]!r} {len(sources)}: one image per text"
            )
        outcomes = await asyncio.gather(*(self._score(text, images[0], source) for text, source in zip(texts, sources)))
        scores = np.array([score for score, _ in outcomes], dtype=np.float32)
        errors = np.array([error.encode() for _, error in outcomes], dtype=object)
        return {"score": scores, "error": errors}

    async def _score(self, text: bytes, kind: str, source: bytes) -> tuple[float, str]:
        try:
            image = ImageSource(url=text_of(source, kind)) if kind == "image_url" else ImageSource(data=source)
            # wait=True: a large request waits for room in the queue, as a stream's items do.
            return await awaited(self._engine.score(ScoreItem(query=text_of(text, "text"), image=image), wait=True)), ""
        except ItemError as exc:
            return float("nan"), f"{grpc_code(exc.kind).name}: {exc.message}"
        except Exception as exc:  # a bug must cost one item, never the call (as in ScoreBatch)
            log.error("an item failed unexpectedly", exc_info=exc)
            return float("nan"), f"INTERNAL: internal error: {type(exc).__name__}: {exc}"


def describe(model: Any) -> dict[str, Any]:
    """A model's inputs and outputs as ModelMetadata lists them."""
    return {
        "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in model.inputs],
        "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in model.outputs],
    }
