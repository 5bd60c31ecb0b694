"""Scoring over HTTP: ``POST /v1/score``, ScoreBatch's JSON mirror.

``{"model": NAME?, "pairs": [{"query", "image_url" | "image_base64", "request_id"?,
"query_id"?, "image_id"?}, ...]}`` -> ``{"model", "results": [{"score"} | {"error": {"code",
"message"}}, ...]}``: one result per pair, in input order, each pair on its own (a bad image
costs its pair, never the request), through the same caches and batches as ScoreBatch.
``image_url`` is an http(s) URL or a data: URI; ``code`` is the gRPC status name ScoreBatch
would give.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web

from ...inference.promises import awaited
from ...utils.domain import ImageSource, ScoreItem
from ...utils.errors import ErrorKind, ItemError
from ...utils.metrics import Metrics
from ..registry import ModelRegistry
from ..status import grpc_code
from .common import decode_base64, image_of, invalid, read_json

log = logging.getLogger(__name__)
_RPC = "http.score"
_ECHOED = ("request_id", "query_id", "image_id")


def routes(registry: ModelRegistry, metrics: Metrics) -> list[web.RouteDef]:
    async def score(request: web.Request) -> web.Response:
        body = await read_json(request)
        name = body.get("model") or registry.default
        pairs = body.get("pairs")
        if not isinstance(pairs, list):
            raise invalid("pairs must be a list of {query, image_url | image_base64}", "pairs")
        engine = registry.get(name if isinstance(name, str) else "")

        async def one(index: int, pair: Any) -> dict[str, Any]:
            started = time.monotonic()
            result = {key: pair[key] for key in _ECHOED if isinstance(pair, dict) and isinstance(pair.get(key), str)}
            code = "OK"
            try:
                # wait=True: a long list waits for room in the queue, as a stream's items do.
                result["score"] = await awaited(engine.score(_item(pair, f"pairs[{index}]"), wait=True))
            except ItemError as exc:
                code = grpc_code(exc.kind).name
                result["error"] = {"code": code, "message": exc.message}
            except Exception as exc:  # a bug costs one pair, as in ScoreBatch
                log.error("a pair failed unexpectedly", exc_info=exc)
                code = "INTERNAL"
                result["error"] = {"code": code, "message": f"internal error: {type(exc).__name__}: {exc}"}
            metrics.item_answered(_RPC, code, name, time.monotonic() - started)
            return result

        results = await asyncio.gather(*(one(i, pair) for i, pair in enumerate(pairs)))
        return web.json_response({"model": name, "results": results})

    return [web.post("/v1/score", score)]


def _item(pair: Any, name: str) -> ScoreItem:
    if not isinstance(pair, dict):
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: a pair is an object {{query, image_url | image_base64}}")
    query = pair.get("query")
    if not isinstance(query, str):
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: query must be a string")
    url, data = pair.get("image_url"), pair.get("image_base64")
    if (url is None) == (data is None):
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: give one of image_url and image_base64")
    image = (
        image_of(url, name)
        if url is not None
        else ImageSource(data=decode_base64(data, name))
        if isinstance(data, str)
        else None
    )
    if image is None:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: image_base64 must be a string")
    return ScoreItem(query=query, image=image)
