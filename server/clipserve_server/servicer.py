"""The gRPC edge: protobuf in, domain types to the engine, protobuf (or a status) out."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from clipserve.v1 import scorer_pb2, scorer_pb2_grpc

from . import __version__
from .domain import CacheStats, ImageSource, ScoreItem
from .engine import ScoringEngine
from .errors import ErrorKind, ItemError
from .metrics import Metrics
from .status import grpc_code, reason
from .wire import MalformedRequest, parse_score_request

log = logging.getLogger(__name__)

_END_OF_INPUT = object()


class EngineSlot:
    """Holds the engine once the model has loaded; calls before that get UNAVAILABLE."""

    def __init__(self) -> None:
        self.engine: ScoringEngine | None = None
        self.closing = False
        self.replica = ""  # this server's name in GetModelInfo (set once the port is bound)

    def get(self) -> ScoringEngine:
        if self.closing:
            raise ItemError(ErrorKind.UNAVAILABLE, "the server is shutting down")
        if self.engine is None:
            raise ItemError(ErrorKind.UNAVAILABLE, "the model is still loading; retry shortly")
        return self.engine


Request = scorer_pb2.ScoreRequest | MalformedRequest


def to_item(request: Request) -> ScoreItem:
    if isinstance(request, MalformedRequest):
        raise ItemError(ErrorKind.INVALID_INPUT, f"request {request.request_id!r}: {request.reason}")
    return ScoreItem(query=request.query, image=image_source(request))


def image_source(request: scorer_pb2.ScoreRequest) -> ImageSource:
    sha256 = request.image_sha256.lower() or None
    which = request.WhichOneof("image")
    if which == "image_url":
        return ImageSource(url=request.image_url)
    if which == "image_bytes":
        return ImageSource(data=request.image_bytes, sha256=sha256)
    return ImageSource(sha256=sha256)


def _response(request: Request) -> scorer_pb2.ScoreResponse:
    return scorer_pb2.ScoreResponse(request_id=request.request_id, query_id=request.query_id, image_id=request.image_id)


def _cache_stats(stats: CacheStats) -> scorer_pb2.CacheStats:
    return scorer_pb2.CacheStats(
        capacity=stats.capacity, entries=stats.entries, hits=stats.hits, misses=stats.misses, hit_rate=stats.hit_rate
    )


def call_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's ``x-request-id``, or a fresh id: ties a call's log lines together."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str) and value:
            return value[:64]
    return uuid.uuid4().hex[:12]


class ScorerServicer(scorer_pb2_grpc.ScorerServicer):
    def __init__(self, slot: EngineSlot, *, stream_max_in_flight: int, metrics: Metrics) -> None:
        self._slot = slot
        self._stream_max_in_flight = stream_max_in_flight
        self._metrics = metrics

    def _received(self, request: Request) -> None:
        if not isinstance(request, MalformedRequest) and request.image_bytes:
            self._metrics.upload_bytes.inc(len(request.image_bytes))

    async def Score(self, request: Request, context: grpc.aio.ServicerContext) -> scorer_pb2.ScoreResponse:
        started = time.monotonic()
        self._received(request)
        code, message = grpc.StatusCode.OK, ""
        try:
            score = await self._slot.get().score(to_item(request), wait=False)
        except ItemError as exc:
            code, message = grpc_code(exc.kind), exc.message
        except Exception as exc:
            log.exception("Score failed unexpectedly", extra={"call_id": call_id(context)})
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
        self._metrics.items.labels(rpc="Score", code=code.name).inc()
        self._metrics.calls.labels(rpc="Score", code=code.name).inc()
        self._metrics.item_seconds.labels(rpc="Score").observe(time.monotonic() - started)
        if code is not grpc.StatusCode.OK:
            log.info("Score failed", extra={"call_id": call_id(context), "request_id": request.request_id, "code": code.name, "error": message, "peer": context.peer()})
            await context.abort(code, message)
        response = _response(request)
        response.score = score
        return response

    async def ScoreBatch(
        self, request_iterator: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scorer_pb2.ScoreResponse]:
        try:
            engine = self._slot.get()
        except ItemError as exc:
            self._metrics.calls.labels(rpc="ScoreBatch", code=grpc_code(exc.kind).name).inc()
            await context.abort(grpc_code(exc.kind), exc.message)
        ids = {"call_id": call_id(context), "peer": context.peer()}
        started = time.monotonic()
        failed = 0
        final_code = grpc.StatusCode.CANCELLED
        # At most `window` items are read but not yet answered: when it is full we stop
        # reading, and gRPC flow control slows the client down.
        window = asyncio.Semaphore(self._stream_max_in_flight)
        answers: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()
        sent = 0

        async def answer(request: Request) -> None:
            await answers.put(await self._score_item(engine, request, ids))

        async def read() -> None:
            nonlocal sent
            try:
                async for request in request_iterator:
                    await window.acquire()
                    task = asyncio.ensure_future(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    sent += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reading failed (the client went away): end the stream with it
                await answers.put(exc)
                return
            await answers.put(_END_OF_INPUT)

        reader = asyncio.ensure_future(read())
        answered = 0
        input_done = False
        try:
            while not (input_done and answered == sent):
                answer_or_signal = await answers.get()
                if answer_or_signal is _END_OF_INPUT:
                    input_done = True
                    continue
                if isinstance(answer_or_signal, Exception):
                    raise answer_or_signal
                yield answer_or_signal
                answered += 1
                failed += answer_or_signal.HasField("error")
                window.release()
            final_code = grpc.StatusCode.OK
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()
            self._metrics.calls.labels(rpc="ScoreBatch", code=final_code.name).inc()
            log.info(
                "ScoreBatch %s",
                "finished" if final_code is grpc.StatusCode.OK else "ended early",
                extra={**ids, "items": answered, "failed": failed, "seconds": round(time.monotonic() - started, 3), "code": final_code.name},
            )

    async def _score_item(self, engine: ScoringEngine, request: Request, ids: dict[str, str]) -> scorer_pb2.ScoreResponse:
        started = time.monotonic()
        self._received(request)
        response = _response(request)
        try:
            response.score = await engine.score(to_item(request), wait=True)
        except ItemError as exc:
            response.error.code = grpc_code(exc.kind).name
            response.error.message = exc.message
            response.error.reason = reason(exc.kind)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must cost one item, never the stream or a lost answer
            log.exception("scoring an item failed unexpectedly", extra={**ids, "request_id": request.request_id})
            response.error.code = grpc.StatusCode.INTERNAL.name
            response.error.message = f"internal error: {type(exc).__name__}: {exc}"
        if response.error.reason:
            # Not an outcome but a step of the upload protocol: the caller resends the item.
            self._metrics.bytes_requested.inc()
            return response
        code = response.error.code or grpc.StatusCode.OK.name
        self._metrics.items.labels(rpc="ScoreBatch", code=code).inc()
        self._metrics.item_seconds.labels(rpc="ScoreBatch").observe(time.monotonic() - started)
        if response.HasField("error"):
            log.info("item failed", extra={**ids, "request_id": request.request_id, "code": code, "error": response.error.message})
        return response

    async def GetModelInfo(self, request: scorer_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> scorer_pb2.ModelInfo:
        try:
            engine = self._slot.get()
        except ItemError as exc:
            await context.abort(grpc_code(exc.kind), exc.message)
        d = engine.description
        text_stats, image_stats = engine.cache_stats()
        return scorer_pb2.ModelInfo(
            model_id=d.model_id,
            device=d.device,
            dtype=d.dtype,
            embedding_dim=d.embedding_dim,
            logit_scale=d.logit_scale,
            logit_bias=d.logit_bias,
            max_text_tokens=d.max_text_tokens,
            max_batch_size=engine.config.max_batch_size,
            max_batch_delay_ms=engine.config.max_batch_delay_ms,
            text_cache=_cache_stats(text_stats),
            image_cache=_cache_stats(image_stats),
            server_version=__version__,
            compiled=d.compiled,
            normalized=True,
            replica=self._slot.replica,
        )


def add_scorer_to_server(servicer: ScorerServicer, server: grpc.aio.Server) -> None:
    """Like the generated ``add_ScorerServicer_to_server``, but ScoreRequests are decoded by
    ``parse_score_request`` so that one malformed message costs one item, not the stream."""
    serialize = scorer_pb2.ScoreResponse.SerializeToString
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(servicer.Score, request_deserializer=parse_score_request, response_serializer=serialize),
        "ScoreBatch": grpc.stream_stream_rpc_method_handler(servicer.ScoreBatch, request_deserializer=parse_score_request, response_serializer=serialize),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=scorer_pb2.GetModelInfoRequest.FromString,
            response_serializer=scorer_pb2.ModelInfo.SerializeToString,
        ),
    }
    service = scorer_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
