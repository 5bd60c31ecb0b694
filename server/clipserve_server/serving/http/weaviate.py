"""Weaviate's multi2vec-clip inference API (weaviate/multi2vec-clip-inference), so that a
Weaviate with ``CLIP_INFERENCE_API=http://clipserve:PORT`` vectorizes through clipserve.

``GET /.well-known/live`` and ``/.well-known/ready``: 204 (ready: once the models are loaded,
503 before); ``GET /meta``: a JSON object describing the model; ``POST /vectorize {"texts":
[...], "images": [base64, ...]}`` -> ``{"textVectors": [...], "imageVectors": [...]}``, unit
vectors of the default model, in input order. Errors: ``{"error": message}`` with a status
above 399, which is what the module reads.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from clipserve import __version__
from ...utils.domain import EmbedItem, ImageSource
from ...utils.metrics import Metrics
from ..registry import ModelRegistry
from .common import decode_base64, embed_all, invalid, read_json

_RPC = "http.vectorize"


def routes(registry: ModelRegistry, metrics: Metrics) -> list[web.RouteDef]:
    async def live(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=204 if registry.ready and not registry.closing else 503)

    async def meta(request: web.Request) -> web.Response:
        name, engine = registry.default, registry.get()
        d = engine.description
        return web.json_response(
            {
                "server": "clipserve",
                "version": __version__,
                "model": name,
                "model_id": d.model_id,
                "text_model_id": d.text_model_id,
                "backend": d.backend,
                "embedding_dim": d.embedding_dim,
                "dtype": d.dtype,
                "device": engine.device,
            }
        )

    async def vectorize(request: web.Request) -> web.Response:
        body = await read_json(request)
        texts, images = _strings(body, "texts"), _strings(body, "images")
        engine = registry.get()
        items = [EmbedItem(text=text) for text in texts] + [
            EmbedItem(image=ImageSource(data=decode_base64(image, f"images[{i}]"))) for i, image in enumerate(images)
        ]
        names = [f"texts[{i}]" for i in range(len(texts))] + [f"images[{i}]" for i in range(len(images))]
        vectors = [
            vector.tolist()
            for vector in await embed_all(engine, items, names, rpc=_RPC, model=registry.default, metrics=metrics)
        ]
        return web.json_response({"textVectors": vectors[: len(texts)], "imageVectors": vectors[len(texts) :]})

    return [
        web.get("/.well-known/live", live),
        web.get("/.well-known/ready", ready),
        web.get("/meta", meta),
        web.post("/vectorize", vectorize),
    ]


def _strings(body: dict[str, Any], key: str) -> list[str]:
    values = body.get(key) or []  # Weaviate leaves an empty list out (omitempty)
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise invalid(f"{key} must be a list of strings")
    return values
