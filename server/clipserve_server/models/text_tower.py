"""A separate text tower: a sentence-transformers model paired with a CLIP model's image tower.

This is how multilingual CLIP students are used, e.g. sentence-transformers/clip-ViT-B-32-multilingual-v1
(a multilingual DistilBERT, mean pooling and a dense layer into CLIP's 512-d space), trained to
put texts where the image tower of OpenAI's CLIP ViT-B/32 puts the matching images. Texts go
through the sentence-transformers model (its own tokenizer, pooling and dense layers), images
through the CLIP model; the score is the CLIP model's ``exp(logit_scale) * cos`` (+ its bias,
if it has one).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from ..images.device_decode import BatchDecodeFn
from .model import TOKENIZING, EmbeddingModel, Tokens
from .runtimes.towers import TEXT, Runner, Tower, family_towers

log = logging.getLogger(__name__)


class TextTowerModel(EmbeddingModel):
    def __init__(self, image_model: EmbeddingModel, text_model_id: str) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        self._torch = torch
        self._images = image_model
        described = image_model.description
        log.info(
            "loading the text model %s through sentence-transformers on %s as %s",
            text_model_id,
            described.device,
            described.dtype,
        )
        text_model = SentenceTransformer(text_model_id, device=described.device)
        self._text = text_model.to(getattr(torch, described.dtype)).eval()
        # Kept: the module's own .device follows its weights, which go once a runtime runs it.
        self._text_device = self._text.device
        # A runtime's text tower (use_tower); None: sentence-transformers' own encode.
        self._run_text: Runner | None = None
        dim = text_model.get_sentence_embedding_dimension()
        if dim != described.embedding_dim:
            raise ValueError(
                f"the text model {text_model_id} gives {dim}-d embeddings, the image tower of {described.model_id} "
                f"{described.embedding_dim}-d: they must be a pair trained for one space"
            )
        self.description = dataclasses.replace(
            described,
            backend=described.backend + "+sentence_transformers",
            text_model_id=text_model_id,
            max_text_tokens=int(text_model.max_seq_length),
        )

    def preprocess_image(self, image: Image.Image) -> Any:
        return self._images.preprocess_image(image)

    def image_preprocessor(self) -> Callable[[Image.Image], Any]:
        return self._images.image_preprocessor()

    def preprocess_array(self, pixels: np.ndarray) -> Any:
        return self._images.preprocess_array(pixels)

    @property
    def decode_size(self) -> tuple[int, int] | None:
        return self._images.decode_size

    def device_jpeg_decoder(self) -> BatchDecodeFn:
        return self._images.device_jpeg_decoder()

    def forward(self, texts: list[str] | Tokens, images: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        _, image_out = self._images.forward([], images)
        if not texts:
            return np.zeros((0, self.description.embedding_dim), dtype=np.float32), image_out
        with self._torch.inference_mode():
            if self._run_text is None:
                # One batch as the batcher formed it; truncated to the model's max_seq_length.
                text_out = self._text.encode(
                    texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False
                )
            else:
                text_out = self._run_text(**self._text_inputs(texts)).float().cpu().numpy()
        return text_out.astype(np.float32, copy=False), image_out

    def prepare_texts(self, texts: list[str]) -> list[str] | Tokens:
        # sentence-transformers' own encode (no runner) tokenizes as it goes: it takes the texts.
        return texts if self._run_text is None else Tokens(len(texts), self._tokenize(texts))

    def _tokenize(self, texts: list[str]) -> dict[str, Any]:
        # What encode does with one batch: tokenised together, padded to the longest text,
        # truncated to max_seq_length. Only the tensors: what a converted tower takes.
        with TOKENIZING:
            tokens = (getattr(self._text, "preprocess", None) or self._text.tokenize)(texts)
        return {name: value for name, value in tokens.items() if isinstance(value, self._torch.Tensor)}

    def _text_inputs(self, texts: list[str] | Tokens) -> dict[str, Any]:
        tokens = texts.tensors if isinstance(texts, Tokens) else self._tokenize(texts)
        return {name: value.to(self._text_device) for name, value in tokens.items()}

    def _eager_text_features(self, **tokens: Any) -> Any:
        # A fresh dict: the modules add their outputs (token embeddings, ...) to the one they get.
        return self._text(dict(tokens))["sentence_embedding"]

    def towers(self) -> dict[str, Tower]:
        described = self.description
        text = family_towers(
            self._text,
            dtype=described.dtype,
            device=described.device,
            text=(self._eager_text_features, self._text_inputs),
        )
        return {**self._images.towers(), **text}

    def use_tower(self, name: str, runner: Runner) -> None:
        if name == TEXT:
            self._run_text = runner
        else:
            self._images.use_tower(name, runner)
