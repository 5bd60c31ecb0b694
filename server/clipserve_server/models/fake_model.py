"""A small deterministic stand-in for a CLIP model, for tests that need no weights.

Embeddings are pseudo-random unit vectors seeded by the text, or by the image's pixels, so
equal inputs always give equal scores. It counts what it encodes and can be told to fail or
to stall, which lets tests check batching, caching and error handling exactly.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from ..utils.domain import ModelDescription
from .model import EmbeddingModel


class FakeModel(EmbeddingModel):
    def __init__(
        self, dim: int = 16, logit_scale: float = 100.0, forward_delay_s: float = 0.0, image_delay_s: float = 0.0
    ) -> None:
        self.description = ModelDescription(
            model_id="fake",
            device="cpu",
            dtype="float32",
            embedding_dim=dim,
            logit_scale=logit_scale,
            logit_bias=0.0,
            max_text_tokens=77,
            backend="fake",
        )
        self.forward_delay_s = forward_delay_s
        self.image_delay_s = image_delay_s  # per image of a batch: an accelerator's time grows with the batch
        self.fail_with: BaseException | None = None  # raised by the next forward calls while set
        self._lock = threading.Lock()
        self.batches: list[tuple[int, int]] = []  # (texts, images) per forward call
        self.encoded_texts: list[str] = []
        self.encoded_images = 0

    def warmup(self) -> None:
        super().warmup()
        self.reset_counts()  # tests count only the work their requests cause

    def reset_counts(self) -> None:
        with self._lock:
            self.batches.clear()
            self.encoded_texts.clear()
            self.encoded_images = 0

    def preprocess_image(self, image: Image.Image) -> Any:
        return _pixels(image)

    def image_preprocessor(self) -> Callable[[Image.Image], Any]:
        return _pixels  # a plain function: decode worker processes can be handed it

    def forward(self, texts: list[str], images: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        if self.forward_delay_s or self.image_delay_s:
            time.sleep(self.forward_delay_s + self.image_delay_s * len(images))
        if self.fail_with is not None:
            raise self.fail_with
        with self._lock:
            self.batches.append((len(texts), len(images)))
            self.encoded_texts.extend(texts)
            self.encoded_images += len(images)
        dim = self.description.embedding_dim
        text_out = (
            np.stack([self._features(b"t" + t.encode("utf-8"), dim) for t in texts])
            if texts
            else np.zeros((0, dim), np.float32)
        )
        image_out = (
            np.stack([self._features(b"i" + p, dim) for p in images]) if images else np.zeros((0, dim), np.float32)
        )
        return text_out, image_out

    @staticmethod
    def _features(seed: bytes, dim: int) -> np.ndarray:
        """A unit vector times a length between 1 and 3, both from the seed: like a real model,
        its raw features are not normalised."""
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest()[:8], "little"))
        vector = rng.standard_normal(dim).astype(np.float32)
        return vector / np.linalg.norm(vector) * np.float32(1.0 + 2.0 * rng.random())


def _pixels(image: Image.Image) -> bytes:
    return np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.uint8).tobytes()
