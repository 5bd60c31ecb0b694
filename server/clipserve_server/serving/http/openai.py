"""OpenAI's embeddings API: ``POST /v1/embeddings``, ``GET /v1/models``.

Texts by default; images with ``"modality": "image"`` (infinity's convention; the openai
client passes it in ``extra_body``), each an http(s) URL or a ``data:image/...;base64,`` URI.
The vectors are the unit vectors scoring uses, as gRPC's Embed gives them; ``base64`` (what the
openai client asks for by default) is their little-endian float32 bytes. clipserve does not
count tokens: ``usage`` reports 0.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from aiohttp import web

from ...utils.domain import EmbedItem
from ...utils.errors import ErrorKind, ItemError
from ...utils.metrics import Metrics
from ..registry import ModelRegistry
from .common import embed_all, image_of, invalid, read_json

_RPC = "http.embeddings"
_ENCODINGS = ("float", "base64")
_MODALITIES = ("text", "image")


def routes(registry: ModelRegistry, metrics: Metrics) -> list[web.RouteDef]:
    async def embeddings(request: web.Request) -> web.Response:
        body = await read_json(request)
        name = body.get("model") or registry.default
        if not isinstance(name, str):
            raise invalid("'model' must be a string: a model this server serves", "model")
        try:
            engine = registry.get(name)
        except ItemError as exc:
            if exc.kind is ErrorKind.NOT_FOUND:
                raise ItemError(exc.kind, f"{exc.message}; GET /v1/models lists them") from None
            raise
        encoding = body.get("encoding_format") or "float"
        if encoding not in _ENCODINGS:
            raise invalid(f"encoding_format must be float or base64, not {encoding!r}", "encoding_format")
        dimension = engine.description.embedding_dim
        if body.get("dimensions") not in (None, dimension):
            raise invalid(
                f"dimensions: the model {name!r} gives {dimension}-dimensional embeddings only; "
                f"omit dimensions or give {dimension}",
                "dimensions",
            )
        modality = body.get("modality") or "text"
        if modality not in _MODALITIES:
            raise invalid(f"modality must be text or image, not {modality!r}", "modality")
        inputs = _inputs(body.get("input"))
        if modality == "text":
            items = [EmbedItem(text=_text(value, i)) for i, value in enumerate(inputs)]
        else:
            items = [EmbedItem(image=image_of(value, f"input[{i}]")) for i, value in enumerate(inputs)]
        vectors = await embed_all(
            engine, items, [f"input[{i}]" for i in range(len(items))], rpc=_RPC, model=name, metrics=metrics
        )
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"object": "embedding", "embedding": _encoded(vector, encoding), "index": i}
                    for i, vector in enumerate(vectors)
                ],
                "model": name,
                "usage": {"prompt_tokens": 0, "total_tokens": 0},
            }
        )

    async def models(request: web.Request) -> web.Response:
        if not registry.ready:
            raise ItemError(ErrorKind.UNAVAILABLE, "the models are still loading; retry shortly")
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "clipserve"}
                    for name, _ in registry.engines()
                ],
            }
        )

    return [web.post("/v1/embeddings", embeddings), web.get("/v1/models", models)]


def _inputs(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        return value
    raise invalid("input must be a string or a non-empty list of strings", "input")


def _text(value: Any, index: int) -> str:
    if not isinstance(value, str):  # token arrays: the server tokenizes with the model's own tokenizer
        raise invalid(f"input[{index}] must be a string (token arrays are not taken)", "input")
    return value


def _encoded(vector: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()
