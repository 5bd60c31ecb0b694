"""What a server says about its models (``model_info()``, ``list_models()``), as plain
dataclasses like every other result of the SDK. Field names and meanings are the protobuf's
(``protos/clipserve/v1/scorer.proto``, ``ModelInfo``); each object keeps the message it was
read from as ``.proto``, for anything the dataclass does not carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .v1 import scorer_pb2


@dataclass(frozen=True)
class CacheStats:
    """One embedding cache: ``capacity`` 0 when caching is off; ``hit_rate`` 0 before the first lookup."""

    capacity: int
    entries: int
    hits: int
    misses: int
    hit_rate: float

    @classmethod
    def from_proto(cls, message: Any) -> CacheStats:
        return cls(message.capacity, message.entries, message.hits, message.misses, message.hit_rate)


@dataclass(frozen=True)
class InstanceInfo:
    """One forward worker of a model (a thread on one device) and what it has done."""

    device: str
    index: int
    forwards: int
    items: int
    busy_seconds: float
    alive: bool

    @classmethod
    def from_proto(cls, message: Any) -> InstanceInfo:
        return cls(message.device, message.index, message.forwards, message.items, message.busy_seconds, message.alive)


@dataclass(frozen=True)
class ModelInfo:
    """One model of a server: where it came from, where and how it runs, its batching limits,
    its caches and its instances, and which replica answered."""

    name: str
    model_id: str
    text_model_id: str
    backend: str
    device: str
    dtype: str
    embedding_dim: int
    logit_scale: float
    logit_bias: float
    max_text_tokens: int
    max_batch_size: int
    max_batch_delay_ms: float
    text_cache: CacheStats
    image_cache: CacheStats
    server_version: str
    compiled: bool
    normalized: bool
    replica: str
    instances: tuple[InstanceInfo, ...]
    image_runtime: str
    text_runtime: str
    proto: scorer_pb2.ModelInfo = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, message: scorer_pb2.ModelInfo) -> ModelInfo:
        return cls(
            name=message.name,
            model_id=message.model_id,
            text_model_id=message.text_model_id,
            backend=message.backend,
            device=message.device,
            dtype=message.dtype,
            embedding_dim=message.embedding_dim,
            logit_scale=message.logit_scale,
            logit_bias=message.logit_bias,
            max_text_tokens=message.max_text_tokens,
            max_batch_size=message.max_batch_size,
            max_batch_delay_ms=message.max_batch_delay_ms,
            text_cache=CacheStats.from_proto(message.text_cache),
            image_cache=CacheStats.from_proto(message.image_cache),
            server_version=message.server_version,
            compiled=message.compiled,
            normalized=message.normalized,
            replica=message.replica,
            instances=tuple(InstanceInfo.from_proto(instance) for instance in message.instances),
            image_runtime=message.image_runtime,
            text_runtime=message.text_runtime,
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
