"""What every HTTP route shares: reading a JSON body within the limits, images named by URL or
data URI, embedding a list of inputs, and errors in the shape of the face that was called."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from ...inference.engine import ScoringEngine
from ...inference.promises import awaited
from ...utils.domain import EmbedItem, ImageSource
from ...utils.errors import ErrorKind, ItemError
from ...utils.metrics import Metrics
from ..status import grpc_code

# Where a request's state lives on the aiohttp Application (its own typed keys).
METRICS = web.AppKey("metrics", Metrics)
IDLE_TIMEOUT_S = web.AppKey("idle_timeout_s", float)
# OpenAI's routes answer errors in OpenAI's shape; every other face as KServe and Weaviate do.
_OPENAI_PREFIX = "/v1/"
_DATA_URI = "data:"


@dataclass
class HttpError(Exception):
    """A request refused before (or instead of) reaching the engine."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None


def invalid(message: str, param: str | None = None) -> HttpError:
    return HttpError(400, message, param, "invalid_input")


def error_response(
    path: str, status: int, message: str, *, param: str | None = None, code: str | None = None
) -> web.Response:
    """``{"error": {"message", "type", "param", "code"}}`` (OpenAI) under /v1/, else
    ``{"error": message}`` (the Open Inference Protocol's REST shape, which Weaviate's module
    reads too)."""
    if path.startswith(_OPENAI_PREFIX):
        kind = (
            "authentication_error"
            if status == 401
            else "rate_limit_error"
            if status == 429
            else "server_error"
            if status >= 500
            else "invalid_request_error"
        )
        body: dict[str, Any] = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    else:
        body = {"error": message}
    return web.json_response(body, status=status)


async def read_body(request: web.Request) -> bytes:
    """The body, within --max-message-mb (413 past it: aiohttp's client_max_size) and
    --http-idle-timeout-s (408: a client that stops sending does not hold a handler)."""
    try:
        return await asyncio.wait_for(request.read(), request.app[IDLE_TIMEOUT_S])
    except asyncio.TimeoutError:
        raise HttpError(408, "the request body did not arrive in time") from None


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or 400 saying why not."""
    body = await read_body(request)
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise invalid(f"the body must be a JSON object, not {type(value).__name__}")
    return value


def image_of(value: Any, name: str) -> ImageSource:
    """An image given as an http(s) URL (fetched through the server's guarded fetcher) or a
    ``data:image/...;base64,`` URI."""
    if not isinstance(value, str):
        raise ItemError(
            ErrorKind.INVALID_INPUT, f"{name}: an image is a URL or a data: URI, not {type(value).__name__}"
        )
    if value[: len(_DATA_URI)].lower() == _DATA_URI:
        header, comma, payload = value.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: a data: URI must be data:image/...;base64,<base64>")
        return ImageSource(data=decode_base64(payload, name))
    if value[:7].lower() == "http://" or value[:8].lower() == "https://":
        return ImageSource(url=value)
    raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: not an http(s) URL or a data:image/...;base64, URI")


def decode_base64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: not valid base64") from None


async def embed_all(
    engine: ScoringEngine, items: list[EmbedItem], names: list[str], *, rpc: str, model: str, metrics: Metrics
) -> list[np.ndarray]:
    """Every item's unit vector, from the engine's caches and batches as gRPC's Embed, each
    counted as an item of ``rpc``. A failure ends the call: the first failed item in input order
    is raised, its message naming it (``names[i]``). Unary-call semantics: a full queue refuses
    (OVERLOADED)."""

    async def one(item: EmbedItem) -> np.ndarray:
        started = time.monotonic()
        code = "OK"
        try:
            return await awaited(engine.embed(item, wait=False))
        except ItemError as exc:
            code = grpc_code(exc.kind).name
            raise
        except asyncio.CancelledError:  # another item of the call failed first
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            metrics.item_answered(rpc, code, model, time.monotonic() - started)

    if not items:
        return []

    tasks = [asyncio.ensure_future(one(item)) for item in items]
    try:
        # The first failure ends the request (it has one answer): what is still queued for it is
        # withdrawn rather than waited for (a full queue answers at once, not after the rest).
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            task.cancel()
    for name, task in zip(names, tasks):
        if task.done() and not task.cancelled() and task.exception() is not None:
            error = task.exception()
            raise ItemError(error.kind, f"{name}: {error.message}") if isinstance(error, ItemError) else error
    return [task.result() for task in tasks]
