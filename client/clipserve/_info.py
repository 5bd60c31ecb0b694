"""What a server says about its models (``model_info()``, ``list_models()``), as plain
dataclasses like every other result of the SDK. Field names and meanings are the protobuf's
(``protos/clipserve/v1/scorer.proto``, ``ModelInfo``); each object keeps the message it was
read from as ``.proto``, for anything the dataclass does not carry."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from .v1 import scorer_pb2


T = TypeVar("T")
_NESTED = ("text_cache", "image_cache", "instances", "proto")


def _plain(cls: type[T], message: Any, **nested: Any) -> T:
    """``cls`` with each plain field read from the same-named field of ``message``."""
    plain = {f.name: getattr(message, f.name) for f in fields(cls) if f.name not in _NESTED}  # type: ignore[arg-type]
    return cls(**plain, **nested)


@dataclass(frozen=True)
class CacheStats:
    """One embedding cache: ``capacity`` 0 when caching is off; ``hit_rate`` 0 before the first lookup."""

    capacity: int
    entries: int
    hits: int
    misses: int
    hit_rate: float


@dataclass(frozen=True)
class InstanceInfo:
    """One forward worker of a model (a thread on one device) and what it has done."""

    device: str
    index: int
    alive: bool  # False once it has failed for good
    forwards: int
    items: int
    busy_seconds: float


@dataclass(frozen=True)
class ModelInfo:
    """One model of a server: what it is, where and how it runs, how it scores and batches,
    its caches, and which replica answered."""

    # What it is, and who answered.
    name: str
    model_id: str
    text_model_id: str
    backend: str
    replica: str
    server_version: str
    # Where and how it runs.
    device: str
    dtype: str
    instances: tuple[InstanceInfo, ...]
    compiled: bool
    image_runtime: str
    text_runtime: str
    # How it scores (logit_scale * cosine + logit_bias) and embeds.
    logit_scale: float
    logit_bias: float
    embedding_dim: int
    normalized: bool
    max_text_tokens: int
    # What it keeps, and how it batches.
    text_cache: CacheStats
    image_cache: CacheStats
    max_batch_size: int
    max_batch_delay_ms: float
    proto: scorer_pb2.ModelInfo = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, message: scorer_pb2.ModelInfo) -> ModelInfo:
        return _plain(
            cls,
            message,
            instances=tuple(_plain(InstanceInfo, instance) for instance in message.instances),
            text_cache=_plain(CacheStats, message.text_cache),
            image_cache=_plain(CacheStats, message.image_cache),
            proto=message,
        )


@dataclass(frozen=True)
class ModelList:
    """Every model a server holds, and the name of the one that answers requests naming none."""

    models: tuple[ModelInfo, ...]
    default_model: str
    proto: scorer_pb2.ListModelsResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, message: scorer_pb2.ListModelsResponse) -> ModelList:
        return cls(tuple(ModelInfo.from_proto(model) for model in message.models), message.default_model, message)
