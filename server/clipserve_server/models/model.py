"""The model interface the batcher and engine program against.

An implementation turns decoded images into model inputs (``preprocess_image``, run on the
decode pool: threads, or worker processes that get it through ``image_preprocessor``) and
encodes batches of texts and images into the model's own features (``forward``, run on the
model's instance threads, ``--instances`` of them per device; transformers'
``get_text_features`` / ``get_image_features``). ``score``
is the model's ``logits_per_image`` for one pair, computed from those features.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from ..images.device_decode import BatchDecodeFn
from ..images.preprocess import pil_image
from ..utils.domain import ModelDescription
from .runtimes.towers import IMAGE, TEXT, Runner, Tower, family_towers


@dataclass(frozen=True)
class Tokens:
    """A batch of texts tokenized ahead of its forward (``prepare_texts``): the tensors, still on
    the CPU; ``forward`` takes it where it takes the texts."""

    count: int
    tensors: dict[str, Any]

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True, slots=True)
class Embedding:
    """A model's own (unnormalised) features for one text or image, and their length: what the
    caches keep. Scoring and Embed's default use the unit vector; Embed ``raw`` the features.
    Slotted: no ``__dict__``, so a cached embedding is one object for the collector, not two."""

    raw: np.ndarray  # float32, shape (dim,)
    norm: float

    @classmethod
    def of(cls, features: np.ndarray) -> Embedding:
        return cls(features, float(np.linalg.norm(features)))

    def unit(self) -> np.ndarray:
        return self.raw / np.float32(self.norm)


class EmbeddingModel(ABC):
    description: ModelDescription

    @abstractmethod
    def preprocess_image(self, image: Image.Image) -> Any:
        """Turn one decoded RGB image into whatever ``forward`` takes. Thread-safe."""

    def image_preprocessor(self) -> Callable[[Image.Image], Any]:
        """``preprocess_image`` as a picklable callable, for decode worker processes."""
        return self.preprocess_image

    def preprocess_array(self, pixels: np.ndarray) -> Any:
        """``preprocess_image`` of a float32 (H, W, 3) array of RGB values 0..255 (what a
        Triton CLIP model is sent). By default the values are rounded into an 8-bit image;
        models whose processor takes float arrays override this to give exactly what their
        processor gives on the array itself. Thread-safe."""
        return self.preprocess_image(pil_image(pixels))

    @property
    def decode_size(self) -> tuple[int, int] | None:
        """(width, height) that preprocessing resizes images down to, at least: how small a
        JPEG may be decoded (``--jpeg-draft``). None: unknown, decode at full size."""
        return None

    def device_jpeg_decoder(self) -> BatchDecodeFn:
        """A function that decodes a list of JPEG files and preprocesses them on the model's
        accelerator in one go (``--gpu-decode``; images/device_decode.py); raises RuntimeError,
        saying why, where that is not possible."""
        raise RuntimeError(f"{type(self).__name__} cannot decode images on an accelerator")

    @abstractmethod
    def forward(self, texts: list[str] | Tokens, images: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        """Encode texts (or what ``prepare_texts`` made of them) and preprocessed images in one go.

        Returns the model's own features, not normalised, as float32 arrays of shape
        (len(texts), dim) and (len(images), dim). Called from several threads at once with
        ``--instances`` (torch inference is thread-safe; tokenizers are not: ``TOKENIZING``);
        may be slow.
        """

    def prepare_texts(self, texts: list[str]) -> list[str] | Tokens:
        """``texts`` as ``forward`` takes them, made on a thread of their own before the forward
        (inference/instances.py): tokenizing a batch of long queries holds neither the forward's
        thread nor its --forward-timeout-s. By default the texts themselves."""
        return texts

    def towers(self) -> dict[str, Tower]:
        """The towers a runtime may convert (``runtimes.towers``), by name; none by default."""
        return {}

    def use_tower(self, name: str, runner: Runner) -> None:
        """Run the tower ``name`` with ``runner`` from now on (called before serving starts)."""
        raise NotImplementedError(f"{type(self).__name__} has no {name} tower to hand over")

    def score(self, text: Embedding, image: Embedding) -> float:
        """``exp(logit_scale) * cos + logit_bias``: the pair's ``logits_per_image``."""
        cosine = float(np.dot(text.raw, image.raw)) / (text.norm * image.norm)
        return self.description.logit_scale * cosine + self.description.logit_bias

    def warmup(self) -> None:
        """Run one tiny batch so that the first real request pays no start-up cost."""
        self.forward(["warmup"], [self.preprocess_image(Image.new("RGB", (64, 64), (127, 127, 127)))])


class PipelineModel(EmbeddingModel):
    """A model whose images go through one preprocessing pipeline (``self._pipeline``): callable on
    a decoded image, picklable for decode worker processes, and knowing its decode size."""

    _pipeline: Any

    def preprocess_image(self, image: Image.Image) -> Any:
        return self._pipeline(image)

    def image_preprocessor(self) -> Callable[[Image.Image], Any]:
        return self._pipeline

    def preprocess_array(self, pixels: np.ndarray) -> Any:
        return self._pipeline.from_array(pixels)

    @property
    def decode_size(self) -> tuple[int, int] | None:
        return self._pipeline.decode_size


# Several instances call one model's ``forward`` at once (``--instances``), and Hugging Face's fast
# tokenizers are not safe for that: each call resets their padding and truncation, and two at a
# time raise "Already borrowed" (huggingface/tokenizers#537). Tokenising is a small part of a
# text batch's time, so every tokenizer call of the server takes this one lock.
TOKENIZING = threading.Lock()


class TorchTowersModel(PipelineModel):
    """A PipelineModel whose towers are torch forwards (``_eager_image_features``,
    ``_eager_text_features``, taking what ``_image_inputs`` / ``_text_inputs`` build, the latter
    from ``_tokenize``'s tensors, made ahead by ``prepare_texts`` or in the forward), each run
    by ``self._runs[name]``: eager, torch.compile'd, or a runtime's (``runtimes``)."""

    _runs: dict[str, Runner]
    _model: Any  # the torch module holding both towers' weights
    _device: Any

    @abstractmethod
    def _image_inputs(self, images: list[Any]) -> dict[str, Any]: ...

    @abstractmethod
    def _tokenize(self, texts: list[str]) -> dict[str, Any]:
        """The text tower's inputs for ``texts``, on the CPU (under ``TOKENIZING``)."""

    def prepare_texts(self, texts: list[str]) -> Tokens:
        return Tokens(len(texts), self._tokenize(texts))

    def _text_inputs(self, texts: list[str] | Tokens) -> dict[str, Any]:
        tokens = texts.tensors if isinstance(texts, Tokens) else self._tokenize(texts)
        return {name: value.to(self._device) for name, value in tokens.items()}

    @abstractmethod
    def _eager_image_features(self, **inputs: Any) -> Any: ...

    @abstractmethod
    def _eager_text_features(self, **inputs: Any) -> Any: ...

    def towers(self) -> dict[str, Tower]:
        preprocessed = lambda images: self._image_inputs([self.preprocess_image(image) for image in images])  # noqa: E731
        return family_towers(
            self._model,
            dtype=self.description.dtype,
            device=str(self._device),
            image=(self._eager_image_features, preprocessed),
            text=(self._eager_text_features, self._text_inputs),
        )

    def use_tower(self, name: str, runner: Runner) -> None:
        if name not in (IMAGE, TEXT):
            raise ValueError(f"no tower named {name!r}")
        self._runs[name] = runner


def logit_parameters(model: Any) -> tuple[float, float]:
    """(exp(logit_scale), logit_bias or 0) of a CLIP-family torch model (transformers or open_clip)."""
    bias = getattr(model, "logit_bias", None)
    return float(model.logit_scale.exp().float().item()), float(bias.float().item()) if bias is not None else 0.0
