"""The transformers backend: any Hugging Face CLIP-family checkpoint (CLIP, SigLIP, SigLIP2).

SigLIP and SigLIP2 were trained with a sigmoid loss: their ``logits_per_image`` add
``logit_bias``, and their text tower pools the last position, so texts are padded to the full
length as in training (CLIP pads to the longest text of the batch). SigLIP2's fixed-resolution
checkpoints are ``SiglipModel``s with a Gemma tokenizer; its NaFlex ones (``Siglip2Model``) take
each image as its own grid of patches, with a mask and the grid's shape (``NaFlexPipeline``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from ..images.device_decode import BatchDecodeFn, jpeg_batch_decoder
from ..images.preprocess import NaFlexPipeline, build_pipeline
from ..utils.domain import ModelDescription
from .model import TOKENIZING, Tokens, TorchTowersModel, logit_parameters
from .runtimes.towers import IMAGE, TEXT, Runner

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was asked for, but CUDA is not available on this machine")
    return device


def _to_numpy(features: Any) -> np.ndarray:
    # float32 whatever the model's dtype: scores and norms are computed in float32 or more.
    return features.float().cpu().numpy()


def compile_image_tower(features: Callable[..., Any]) -> Callable[..., Any]:
    """``features`` through torch.compile, for the image tower only: it is where the time goes
    (one forward per distinct image), and its input shape varies in the batch dimension alone.
    dynamic=True compiles one graph for every batch size >= 2 (size 1 gets its own; warm-up
    builds both), and freezing folds the weights in as constants so that inductor can pre-pack
    them for the CPU GEMM kernels. On a 2-core CPU this is ~25% faster per image than eager.
    (Inductor reads `freezing` from its global config when it compiles; passing it in
    torch.compile(options=...) is silently not applied. This process is the server, so setting it
    globally affects nothing else.)"""
    import torch
    import torch._inductor.config

    torch._inductor.config.freezing = True
    return torch.compile(features, dynamic=True)


def _features(output: Any) -> Any:
    """transformers < 5 returns the projected features; 5.x wraps them in ``pooler_output``."""
    import torch

    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFClipModel(TorchTowersModel):
    """Loads ``AutoModel`` + ``AutoProcessor`` from a hub id or a local folder (``name``: what
    to call it in GetModelInfo, when the folder stands for something else)."""

    def __init__(
        self,
        model_id: str,
        *,
        device: str = "auto",
        dtype: str = "float32",
        use_safetensors: bool | None = None,
        compile: bool = False,
        name: str | None = None,
    ) -> None:
        import torch
        import transformers
        from transformers import AutoModel, AutoProcessor

        self._torch = torch
        self._device = torch.device(resolve_device(device))
        if dtype == "auto":
            dtype = "float16" if self._device.type == "cuda" else "float32"
        self._dtype = getattr(torch, dtype)
        kwargs: dict[str, Any] = {}
        # `torch_dtype` was renamed `dtype` in transformers 4.56.
        major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
        kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = self._dtype
        if use_safetensors is not None:
            kwargs["use_safetensors"] = use_safetensors
        transformers.utils.logging.disable_progress_bar()  # a progress bar is noise in server logs
        log.info("loading %s on %s as %s", model_id, self._device, dtype)
        model = AutoModel.from_pretrained(model_id, **kwargs)
        if not (
            hasattr(model, "get_text_features")
            and hasattr(model, "get_image_features")
            and hasattr(model, "logit_scale")
        ):
            raise ValueError(
                f"{model_id} is a {type(model).__name__}, not a CLIP-family model with text and image towers"
            )
        self._model = model.to(self._device).eval()
        # What runs each tower: eager torch, torch.compile'd, or a runtime's (use_tower).
        self._runs: dict[str, Runner] = {
            IMAGE: compile_image_tower(self._eager_image_features) if compile else self._eager_image_features,
            TEXT: self._eager_text_features,
        }
        processor = AutoProcessor.from_pretrained(model_id)
        self._tokenizer = processor.tokenizer
        self._pipeline = build_pipeline(processor.image_processor)
        config = model.config
        self._max_tokens = int(getattr(config.text_config, "max_position_embeddings", 77))
        # SigLIP and SigLIP2 pool the last position: padded to the full length, as in training
        # (their processors' documented call); CLIP pools the end token and pads to the longest.
        self._padding: str | bool = "max_length" if "siglip" in config.model_type else True
        with torch.inference_mode():
            self._dim = int(self._encode_texts(["probe"]).shape[1])
            logit_scale, logit_bias = logit_parameters(model)
        self.description = ModelDescription(
            model_id=name or str(model_id),
            device=str(self._device),
            dtype=dtype,
            embedding_dim=self._dim,
            logit_scale=logit_scale,
            logit_bias=logit_bias,
            max_text_tokens=self._max_tokens,
            compiled=compile,
        )

    def device_jpeg_decoder(self) -> BatchDecodeFn:
        if self._device.type != "cuda":
            raise RuntimeError(
                "--gpu-decode decodes on the model's CUDA device, "
                f"but the model is on {self._device}: use --device cuda"
            )
        if isinstance(self._pipeline, NaFlexPipeline):
            raise RuntimeError(
                "--gpu-decode does not support NaFlex image processors (SigLIP2 NaFlex): leave it off for this model"
            )
        # nvJPEG decodes a batch straight into GPU memory; the processor's resize and crop then
        # run there too.
        return jpeg_batch_decoder(self._pipeline.on_device, self._device)

    def forward(self, texts: list[str] | Tokens, images: list[Any]) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        empty = np.zeros((0, self._dim), dtype=np.float32)
        with torch.inference_mode():
            text_out = self._encode_texts(texts) if texts else empty
            image_out = self._encode_images(images) if images else empty
        return text_out, image_out

    def _encode_texts(self, texts: list[str] | Tokens) -> np.ndarray:
        return _to_numpy(self._runs[TEXT](**self._text_inputs(texts)))

    def _tokenize(self, texts: list[str]) -> dict[str, Any]:
        # Queries longer than the model's context are truncated (the reference adapter crashes).
        with TOKENIZING:
            tokens = self._tokenizer(
                texts, padding=self._padding, truncation=True, max_length=self._max_tokens, return_tensors="pt"
            )
        return dict(tokens)

    def _encode_images(self, images: list[Any]) -> np.ndarray:
        return _to_numpy(self._runs[IMAGE](**self._image_inputs(images)))

    def _image_inputs(self, images: list[Any]) -> dict[str, Any]:
        # Preprocessed on the CPU (numpy arrays) or, with --gpu-decode, already on the device;
        # pixels in the model's dtype, NaFlex masks and grid shapes as they are.
        inputs = self._pipeline.inputs(images, self._device)
        return {name: value.to(self._dtype) if value.is_floating_point() else value for name, value in inputs.items()}

    def _eager_image_features(self, **inputs: Any) -> Any:
        return _features(self._model.get_image_features(**inputs))

    def _eager_text_features(self, **tokens: Any) -> Any:
        return _features(self._model.get_text_features(**tokens))

    def warmup(self) -> None:
        super().warmup()
        if self.description.compiled:
            # super().warmup() compiled the graph for a batch of one; a batch of two compiles
            # the one that every other size shares, so that no request pays for compiling.
            image = self.preprocess_image(Image.new("RGB", (64, 64), (127, 127, 127)))
            self.forward([], [image, image])
