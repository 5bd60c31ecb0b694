"""Choosing the backend that loads a model (one module per family, one interface).

- ``fake`` or ``fake:forward_ms=30,dim=16``: the deterministic stand-in model (tests, demos,
  and benchmarks that simulate accelerator time with a forward pass that sleeps per batch);
- anything else: a Hugging Face hub id or local folder, loaded through transformers.
"""

from __future__ import annotations

from .config import ModelSpec, ServerConfig
from .model import EmbeddingModel

FAKE_PREFIX = "fake"


def load_model(spec: ModelSpec, config: ServerConfig) -> EmbeddingModel:
    source = spec.source
    if source == FAKE_PREFIX or source.startswith(FAKE_PREFIX + ":"):
        return _fake(source)
    from .clip_model import load_model as load_transformers

    return load_transformers(source, device=config.device, dtype=config.dtype, use_safetensors=config.use_safetensors, compile=config.compile)


def _fake(source: str) -> EmbeddingModel:
    from .fake_model import FakeModel

    options: dict[str, float] = {}
    for part in filter(None, source.partition(":")[2].split(",")):
        key, _, value = part.partition("=")
        try:
            options[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--model {source}: {part!r} is not key=number") from None
    unknown = set(options) - {"forward_ms", "dim", "logit_scale"}
    if unknown:
        raise ValueError(f"--model {source}: unknown option(s) {', '.join(sorted(unknown))} (forward_ms, dim, logit_scale)")
    return FakeModel(
        dim=int(options.get("dim", 16)),
        logit_scale=options.get("logit_scale", 100.0),
        forward_delay_s=options.get("forward_ms", 0.0) / 1000.0,
    )
