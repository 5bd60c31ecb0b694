"""The open_clip backend: checkpoints made by (or for) open_clip, which transformers cannot load.

``name`` is what ``open_clip.create_model`` takes: ``local-dir:FOLDER`` or ``hf-hub:ID`` (a folder
or hub repo holding ``open_clip_config.json``, whose ``model_cfg`` and ``preprocess_cfg`` describe
the model, and its weights, ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``;
the hub's files come from the Hugging Face cache when they are there), or one of open_clip's
built-in architectures (``ViT-B-32``) with ``pretrained``, a weights file. The tokenizer
(``open_clip.get_tokenizer``) and the eval image transform come from the same config, as
``open_clip.create_model_from_pretrained`` builds them.

The score is open_clip's own ``logits_per_image``: ``logit_scale.exp() * cos``, plus
``logit_bias`` for the sigmoid-trained (SigLIP-style) models that have one.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from PIL import Image

from ..images.preprocess import build_transform_pipeline
from ..utils.domain import ModelDescription
from .clip_model import compile_image_tower, resolve_device
from .model import TOKENIZING, Tokens, TorchTowersModel, logit_parameters
from .runtimes.towers import IMAGE, TEXT, Runner

log = logging.getLogger(__name__)

# open_clip's names for the dtypes: "fp16" / "bf16" keep LayerNorm in float32, as OpenAI's
# original half-precision CLIP did, and are what open_clip itself evaluates with.
_PRECISIONS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


class OpenClipModel(TorchTowersModel):
    def __init__(
        self,
        name: str,
        *,
        model_id: str,
        pretrained: str = "",
        device: str = "auto",
        dtype: str = "float32",
        compile: bool = False,
    ) -> None:
        import open_clip
        import torch
        from open_clip.transform import PreprocessCfg, image_transform_v2

        self._torch = torch
        self._device = torch.device(resolve_device(device))
        if dtype == "auto":
            dtype = "float16" if self._device.type == "cuda" else "float32"
        precision = _PRECISIONS[dtype]
        log.info("loading %s through open_clip on %s as %s", model_id, self._device, dtype)
        # require_pretrained: a config without weights would otherwise serve random ones.
        model = open_clip.create_model(
            name, pretrained=pretrained or None, precision=precision, device=self._device, require_pretrained=True
        )
        self._model = model.eval()
        self._input_dtype = open_clip.get_input_dtype(precision) or torch.float32
        # What runs each tower: eager torch, torch.compile'd, or a runtime's (use_tower).
        self._runs: dict[str, Runner] = {
            IMAGE: compile_image_tower(self._eager_image_features) if compile else self._eager_image_features,
            TEXT: self._eager_text_features,
        }
        self._tokenizer = open_clip.get_tokenizer(name)
        cfg = PreprocessCfg(**open_clip.get_model_preprocess_cfg(model))
        size = cfg.size if isinstance(cfg.size, tuple) else (cfg.size, cfg.size)
        self._pipeline = build_transform_pipeline(image_transform_v2(cfg, is_train=False), size)
        with torch.inference_mode():
            self._dim = int(self._encode_texts(["probe"]).shape[1])
            logit_scale, logit_bias = logit_parameters(model)
        self.description = ModelDescription(
            model_id=model_id,
            device=str(self._device),
            dtype=dtype,
            embedding_dim=self._dim,
            logit_scale=logit_scale,
            logit_bias=logit_bias,
            max_text_tokens=int(self._tokenizer.context_length),
            compiled=compile,
            backend="open_clip",
        )

    def forward(self, texts: list[str] | Tokens, images: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros((0, self._dim), dtype=np.float32)
        with self._torch.inference_mode():
            text_out = self._encode_texts(texts) if texts else empty
            image_out = self._encode_images(images) if images else empty
        return text_out, image_out

    def _encode_texts(self, texts: list[str] | Tokens) -> np.ndarray:
        return self._runs[TEXT](**self._text_inputs(texts)).float().cpu().numpy()

    def _tokenize(self, texts: list[str]) -> dict[str, Any]:
        # open_clip's tokenizers pad to the context length and truncate longer queries (keeping
        # the end token), as open_clip's own encode_text expects.
        with TOKENIZING:
            return {"tokens": self._tokenizer(texts)}

    def _encode_images(self, images: list[Any]) -> np.ndarray:
        return self._runs[IMAGE](**self._image_inputs(images)).float().cpu().numpy()

    def _image_inputs(self, images: list[Any]) -> dict[str, Any]:
        return {"pixels": self._pipeline.inputs(images, self._device)["pixel_values"].to(self._input_dtype)}

    def _eager_image_features(self, pixels: Any) -> Any:
        return self._model.encode_image(pixels)

    def _eager_text_features(self, tokens: Any) -> Any:
        return self._model.encode_text(tokens)

    def warmup(self) -> None:
        super().warmup()
        if self.description.compiled:
            # As in the transformers backend: the graph shared by every batch size >= 2.
            image = self.preprocess_image(Image.new("RGB", (64, 64), (127, 127, 127)))
            self.forward([], [image, image])
