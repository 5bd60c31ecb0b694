"""clipserve on Ray (the ``clipserve[ray]`` extra): a fleet of servers as Ray actors, and
callable classes for Ray Data's ``map_batches`` that score or embed through it.

    import ray
    from clipserve.ray import Fleet, ScoreBatches

    with Fleet("openai/clip-vit-base-patch32", replicas=4, num_gpus=1) as address:
        scored = ray.data.read_parquet("s3://bucket/qrels/").map_batches(
            ScoreBatches, fn_constructor_kwargs={"address": address},
            compute=ray.data.ActorPoolStrategy(size=8), batch_size=1024, batch_format="pandas")
        scored.write_parquet("s3://bucket/scored/")

``import clipserve`` never imports this package; this package imports ray only when ``Fleet``
or the engine is first used, so that the CLI's flags need no ray (docs/ray.md).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"Fleet": "fleet", "ScoreBatches": "batches", "EmbedBatches": "batches", "RayEngine": "engine"}

__all__ = ["EmbedBatches", "Fleet", "RayEngine", "ScoreBatches"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'clipserve.ray' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
