"""Domain types that cross the servicer edge; nothing below the servicer sees protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageSource:
    """Where an image comes from: a URL, uploaded bytes, the SHA-256 of bytes uploaded
    earlier, or decoded pixels (``pixels``: a float32 (H, W, 3) array of RGB values 0..255, as
    the Open Inference Protocol's ``clip`` model takes them). ``sha256`` beside ``data`` is the
    caller's claim about those bytes (checked)."""

    url: str | None = None
    data: bytes | None = None
    sha256: str | None = None
    pixels: Any = field(default=None, compare=False)  # numpy: no __eq__ that a dataclass can use

    def describe(self) -> str:
        """A short name for error messages."""
        if self.url is not None:
            return self.url if len(self.url) <= 200 else self.url[:197] + "..."
        if self.data is not None:
            return f"<{len(self.data)} uploaded bytes>"
        if self.pixels is not None:
            return f"<{'x'.join(map(str, self.pixels.shape))} pixel array>"
        return f"<image sha256:{(self.sha256 or '')[:16]}...>"


@dataclass(frozen=True)
class ScoreItem:
    query: str
    image: ImageSource


@dataclass(frozen=True)
class EmbedItem:
    """A text or an image to embed; ``raw``: the model's own features, not unit length."""

    text: str | None = None
    image: ImageSource | None = None
    raw: bool = False


@dataclass(frozen=True)
class CacheStats:
    capacity: int
    entries: int
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass(frozen=True)
class ModelDescription:
    """What a loaded model is; filled by the model, reported by GetModelInfo."""

    model_id: str
    device: str
    dtype: str
    embedding_dim: int
    logit_scale: float  # exp(logit_scale parameter): the factor on the cosine
    logit_bias: float
    max_text_tokens: int
    compiled: bool = False  # the image tower runs through torch.compile
    backend: str = "transformers"  # how it was loaded: transformers, open_clip, ...
    text_model_id: str = ""  # a separate text model paired with the image tower, if any
    image_runtime: str = "torch"  # what runs the image tower's forward (models/runtimes/)
    text_runtime: str = "torch"  # what runs the text tower's forward
