"""The gRPC edge: protobuf in, domain types to the engine, protobuf (or a status) out."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from clipserve.v1 import scorer_pb2, scorer_pb2_grpc

from clipserve import __version__
from clipserve._wire import MAX_IN_FLIGHT_KEY
from ..inference.engine import ScoringEngine
from ..inference.promises import Later, Soon, awaited
from ..utils.callers import begin_call
from ..utils.domain import CacheStats, EmbedItem, ImageSource, ScoreItem
from ..utils.errors import ErrorKind, ItemError
from ..utils.metrics import Metrics
from . import parsing
from .lenient_decoding import (
    MalformedRequest,
    parse_embed_chunk,
    parse_embed_request,
    parse_score_chunk,
    parse_score_request,
)
from .registry import ModelRegistry
from .status import call_id, grpc_code, guarded_unary, reason

log = logging.getLogger(__name__)

_END_OF_INPUT = object()
# Most answers in one ScoreResponseChunk / EmbedResponseChunk: 128 embeddings of 1024 floats
# are ~0.5 MiB, well inside a client's default 4 MiB receive limit.
_ANSWERS_PER_CHUNK = 128

ScoreRequest = scorer_pb2.ScoreRequest | MalformedRequest
EmbedRequest = scorer_pb2.EmbedRequest | MalformedRequest
Deliver = Callable[[Any], None]  # takes an item's finished response


def _checked(request: Any) -> Any:
    if isinstance(request, MalformedRequest):
        raise ItemError(ErrorKind.INVALID_INPUT, f"request {request.request_id!r}: {request.reason}")
    return request


def to_item(request: ScoreRequest) -> ScoreItem:
    request = _checked(request)
    return ScoreItem(query=request.query, image=image_source(request, request.WhichOneof("image")))


def to_embed_item(request: EmbedRequest) -> EmbedItem:
    request = _checked(request)
    which = request.WhichOneof("input")
    if which == "text":
        return EmbedItem(text=request.text, raw=request.raw)
    return EmbedItem(image=image_source(request, which), raw=request.raw)


def image_source(request: scorer_pb2.ScoreRequest | scorer_pb2.EmbedRequest, which: str | None) -> ImageSource:
    sha256 = request.image_sha256.lower() or None
    if which == "image_url":
        return ImageSource(url=request.image_url)
    if which == "image_bytes":
        return ImageSource(data=request.image_bytes, sha256=sha256)
    return ImageSource(sha256=sha256)


def _score_response(request: ScoreRequest) -> scorer_pb2.ScoreResponse:
    return scorer_pb2.ScoreResponse(request_id=request.request_id, query_id=request.query_id, image_id=request.image_id)


def _cache_stats(stats: CacheStats) -> scorer_pb2.CacheStats:
    return scorer_pb2.CacheStats(
        capacity=stats.capacity, entries=stats.entries, hits=stats.hits, misses=stats.misses, hit_rate=stats.hit_rate
    )


class ScorerServicer(scorer_pb2_grpc.ScorerServicer):
    def __init__(self, registry: ModelRegistry, *, stream_max_in_flight: int, metrics: Metrics) -> None:
        self._registry = registry
        self._stream_max_in_flight = stream_max_in_flight
        self._metrics = metrics

    # -- scoring -----------------------------------------------------------------------------
    async def Score(self, request: ScoreRequest, context: grpc.aio.ServicerContext) -> scorer_pb2.ScoreResponse:
        started = time.monotonic()
        self._received(request)
        model = ""

        async def score() -> scorer_pb2.ScoreResponse:
            nonlocal model
            model, engine = self._engine(request)
            response = _score_response(request)
            response.score = await awaited(engine.score(to_item(request), wait=False))
            return response

        def answered(code: str) -> None:  # the pair is an item too: its latency, by model
            self._metrics.item_answered("Score", code, model, time.monotonic() - started)

        extra = {"request_id": getattr(request, "request_id", "")}
        return await guarded_unary("Score", context, self._metrics, score, on_done=answered, log_extra=extra)

    async def ScoreBatch(
        self, requests: AsyncIterator[ScoreRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scorer_pb2.ScoreResponse]:
        async for response in self._stream("ScoreBatch", requests, context, self._score_item):
            yield response

    async def ScoreChunks(
        self, chunks: AsyncIterator[list[ScoreRequest]], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scorer_pb2.ScoreResponseChunk]:
        async for chunk in self._stream(
            "ScoreChunks", chunks, context, self._score_item, pack=scorer_pb2.ScoreResponseChunk
        ):
            yield chunk

    def _score_item(self, rpc: str, request: ScoreRequest, ids: dict[str, str], deliver: Deliver) -> Later | None:
        response = _score_response(request)

        def fill(score: float) -> None:
            response.score = score

        return self._answer(
            rpc, request, ids, response, lambda engine: engine.score(to_item(request), wait=True), fill, deliver
        )

    # -- embedding ---------------------------------------------------------------------------
    async def Embed(
        self, requests: AsyncIterator[EmbedRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scorer_pb2.EmbedResponse]:
        async for response in self._stream("Embed", requests, context, self._embed_item):
            yield response

    async def EmbedChunks(
        self, chunks: AsyncIterator[list[EmbedRequest]], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scorer_pb2.EmbedResponseChunk]:
        async for chunk in self._stream(
            "EmbedChunks", chunks, context, self._embed_item, pack=scorer_pb2.EmbedResponseChunk
        ):
            yield chunk

    def _embed_item(self, rpc: str, request: EmbedRequest, ids: dict[str, str], deliver: Deliver) -> Later | None:
        response = scorer_pb2.EmbedResponse(request_id=request.request_id)

        def fill(vector: Any) -> None:
            response.embedding[:] = vector.tolist()

        return self._answer(
            rpc, request, ids, response, lambda engine: engine.embed(to_embed_item(request), wait=True), fill, deliver
        )

    # -- models ------------------------------------------------------------------------------
    async def GetModelInfo(
        self, request: scorer_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.ModelInfo:
        async def info() -> scorer_pb2.ModelInfo:
            return self._model_info(*self._engine(request))

        return await guarded_unary("GetModelInfo", context, self._metrics, info)

    async def ListModels(
        self, request: scorer_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> scorer_pb2.ListModelsResponse:
        async def models() -> scorer_pb2.ListModelsResponse:
            if not self._registry.ready:
                raise ItemError(ErrorKind.UNAVAILABLE, "the models are still loading; retry shortly")
            listed = [self._model_info(name, engine) for name, engine in self._registry.engines()]
            return scorer_pb2.ListModelsResponse(models=listed, default_model=self._registry.default)

        return await guarded_unary("ListModels", context, self._metrics, models)

    def _model_info(self, name: str, engine: ScoringEngine) -> scorer_pb2.ModelInfo:
        d = engine.description
        text_stats, image_stats = engine.cache_stats()
        return scorer_pb2.ModelInfo(
            model_id=d.model_id,
            device=engine.device,
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
            replica=self._registry.replica,
            name=name,
            backend=d.backend,
            text_model_id=d.text_model_id,
            image_runtime=d.image_runtime,
            text_runtime=d.text_runtime,
            instances=[
                scorer_pb2.InstanceInfo(
                    device=i.device,
                    index=i.index,
                    forwards=i.forwards,
                    items=i.items,
                    busy_seconds=i.busy_s,
                    alive=i.alive,
                )
                for i in engine.instance_stats()
            ],
        )

    # -- what every call shares --------------------------------------------------------------
    def _engine(self, request: Any) -> tuple[str, ScoringEngine]:
        name = getattr(request, "model", "") or self._registry.default
        return name, self._registry.get(name)

    def _received(self, request: Any) -> None:
        if not isinstance(request, MalformedRequest) and request.image_bytes:
            self._metrics.upload_bytes.inc(len(request.image_bytes))

    def _answer(
        self,
        rpc: str,
        request: Any,
        ids: dict[str, str],
        response: Any,
        work: Callable[[ScoringEngine], Soon[Any]],
        fill: Callable[[Any], None],
        deliver: Deliver,
    ) -> Later | None:
        """Start one item's ``work`` (see ``_ItemCall``); returns what is still to come, if
        anything (the stream cancels it when it ends early)."""
        self._received(request)
        return _ItemCall(self, rpc, request, ids, response, fill, deliver).start(work)

    async def _stream(
        self,
        rpc: str,
        messages: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        answer_one: Callable[[str, Any, dict[str, str], Deliver], Later | None],
        *,
        pack: Callable[..., Any] | None = None,
    ) -> AsyncIterator[Any]:
        """Answer a stream of items, each as soon as it is done, in any order. ``pack``: the
        chunk message type of a chunked RPC, whose messages carry a list of items each way;
        the answers ready at one moment (at most _ANSWERS_PER_CHUNK) then go in one message."""
        if self._registry.closing or not self._registry.ready:
            error = ItemError(
                ErrorKind.UNAVAILABLE,
                "the server is shutting down"
                if self._registry.closing
                else "the model is still loading; retry shortly",
            )
            self._metrics.calls.labels(rpc=rpc, code=grpc_code(error.kind).name).inc()
            await context.abort(grpc_code(error.kind), error.message)
        ids = {"call_id": call_id(context), "peer": context.peer()}
        begin_call()  # the stream's reader task inherits it
        started = time.monotonic()
        failed = 0
        final_code = grpc.StatusCode.CANCELLED
        window = _StreamWindow(self._stream_max_in_flight)
        # Told to the client up front: the SDK keeps that many outstanding, so that a server
        # set up for a big model on a GPU is fed as deep as it reads, with no setting per client.
        await context.send_initial_metadata(((MAX_IN_FLIGHT_KEY, str(window.limit)),))

        async def read() -> None:
            try:
                async for message in messages:
                    for request in message if pack is not None else (message,):
                        await window.room()
                        window.sent(answer_one(rpc, request, ids, window.deliver))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reading failed (the client went away): end the stream with it
                window.deliver(exc)
                return
            window.deliver(_END_OF_INPUT)

        reader = asyncio.ensure_future(read())
        try:
            while not window.drained:
                batch = await window.ready_batch()
                done = [x for x in batch if x is not _END_OF_INPUT and not isinstance(x, Exception)]
                if any(x is _END_OF_INPUT for x in batch):
                    window.input_done = True
                if done:
                    if pack is not None:
                        yield pack(items=done)
                    else:
                        for response in done:
                            yield response
                    window.answered(len(done))
                    failed += sum(response.HasField("error") for response in done)
                for error in (x for x in batch if isinstance(x, Exception)):
                    if isinstance(error, ItemError):  # a message refused whole (lenient_decoding.TooManyItems)
                        final_code = grpc_code(error.kind)
                        await context.abort(final_code, error.message)
                    raise error  # reading failed: after the answers that were ready
            final_code = grpc.StatusCode.OK
        finally:
            reader.cancel()
            window.cancel_waiting()
            self._metrics.calls.labels(rpc=rpc, code=final_code.name).inc()
            log.info(
                "%s %s",
                rpc,
                "finished" if final_code is grpc.StatusCode.OK else "ended early",
                extra={
                    **ids,
                    "items": window.answered_count,
                    "failed": failed,
                    "seconds": round(time.monotonic() - started, 3),
                    "code": final_code.name,
                },
            )


class _ItemCall:
    """One item of a call: its request, the response being filled, and how its outcome is
    counted and handed over (``deliver``) when it comes: now, if it is ready (a cached pair),
    else from a callback. No task per item: see promises.py."""

    __slots__ = ("_servicer", "_rpc", "_request", "_ids", "_response", "_fill", "_deliver", "_model", "_started")

    def __init__(
        self,
        servicer: ScorerServicer,
        rpc: str,
        request: Any,
        ids: dict[str, str],
        response: Any,
        fill: Callable[[Any], None],
        deliver: Deliver,
    ) -> None:
        self._servicer = servicer
        self._rpc = rpc
        self._request = request
        self._ids = ids
        self._response = response
        self._fill = fill
        self._deliver = deliver
        self._model = ""
        self._started = time.monotonic()

    def start(self, work: Callable[[ScoringEngine], Soon[Any]]) -> Later | None:
        error: Exception | None = None
        try:
            self._model, engine = self._servicer._engine(self._request)
            outcome = work(engine)
            if isinstance(outcome, Later):
                outcome.add_callback(self._landed)
                return outcome
            self._fill(outcome)
        except Exception as exc:
            error = exc
        self._finish(error)
        return None

    def _landed(self, outcome: Later) -> None:
        """A waiting item's outcome has come: fill, count and hand over its response."""
        error: Exception | None = None
        try:
            self._fill(outcome.result())
        except Exception as exc:
            error = exc
        self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        """Put ``error`` (if any) into the response; count and log the outcome; deliver."""
        response, metrics = self._response, self._servicer._metrics
        if isinstance(error, ItemError):
            response.error.code = grpc_code(error.kind).name
            response.error.message = error.message
            response.error.reason = reason(error.kind)
        elif error is not None:  # a bug must cost one item, never the stream or a lost answer
            log.error(
                "an item failed unexpectedly",
                exc_info=error,
                extra={**self._ids, "request_id": self._request.request_id},
            )
            response.error.code = grpc.StatusCode.INTERNAL.name
            response.error.message = f"internal error: {type(error).__name__}: {error}"
        if response.error.reason:
            # Not an outcome but a step of the upload protocol: the caller resends the item.
            metrics.bytes_requested.inc()
        else:
            code = response.error.code or grpc.StatusCode.OK.name
            model = (
                self._model if self._model in self._servicer._registry.names else ""
            )  # never a label per unknown name
            metrics.item_answered(self._rpc, code, model, time.monotonic() - self._started)
            if error is not None:
                log.info(
                    "item failed",
                    extra={
                        **self._ids,
                        "request_id": self._request.request_id,
                        "code": code,
                        "error": response.error.message,
                    },
                )
        self._deliver(response)


class _StreamWindow:
    """What a stream has read and not yet answered. At most ``limit`` items are out: then the
    reader waits, and gRPC flow control slows the client down. Answers queue in completion
    order, then the reader's end (or its failure): a deque and an event rather than an
    asyncio.Queue, two cheap calls per item instead of coroutines."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.input_done = False
        self.answered_count = 0
        self._sent = 0
        self._room = asyncio.Event()
        self._ready: collections.deque[Any] = collections.deque()
        self._arrived = asyncio.Event()
        self._waiting: set[Later] = set()  # items whose outcome is still to come

    def deliver(self, answer: Any) -> None:
        self._ready.append(answer)
        self._arrived.set()

    async def room(self) -> None:
        """Until the window has room for one more item."""
        while self._sent - self.answered_count >= self.limit:
            self._room.clear()
            await self._room.wait()

    def sent(self, later: Later | None) -> None:
        """One more item is out; ``later``: its outcome, if still to come."""
        if later is not None and not later.settled:
            self._waiting.add(later)
            later.add_callback(self._waiting.discard)
        self._sent += 1

    @property
    def drained(self) -> bool:
        """The input has ended and every item read is answered."""
        return self.input_done and self.answered_count == self._sent

    async def ready_batch(self) -> list[Any]:
        """What is ready (at most _ANSWERS_PER_CHUNK), once something is."""
        while not self._ready:
            self._arrived.clear()
            await self._arrived.wait()
        return [self._ready.popleft() for _ in range(min(len(self._ready), _ANSWERS_PER_CHUNK))]

    def answered(self, count: int) -> None:
        self.answered_count += count
        self._room.set()

    def cancel_waiting(self) -> None:
        """The stream ended early: withdraw from every outcome still to come."""
        for later in list(self._waiting):
            later.cancel()


def add_scorer_to_server(servicer: ScorerServicer, server: grpc.aio.Server, *, max_items_per_message: int) -> None:
    """Like the generated ``add_ScorerServicer_to_server``, but requests are decoded by
    ``lenient_decoding`` so that one malformed message costs one item, not the stream; large
    ones off the event loop (parsing.py); chunks of more than ``max_items_per_message`` refused
    unparsed."""
    score_response = scorer_pb2.ScoreResponse.SerializeToString
    score_chunk = functools.partial(parse_score_chunk, max_items=max_items_per_message)
    embed_chunk = functools.partial(parse_embed_chunk, max_items=max_items_per_message)
    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            parsing.unary(servicer.Score, parse_score_request), response_serializer=score_response
        ),
        "ScoreBatch": grpc.stream_stream_rpc_method_handler(
            parsing.streaming(servicer.ScoreBatch, parse_score_request), response_serializer=score_response
        ),
        "Embed": grpc.stream_stream_rpc_method_handler(
            parsing.streaming(servicer.Embed, parse_embed_request),
            response_serializer=scorer_pb2.EmbedResponse.SerializeToString,
        ),
        "ScoreChunks": grpc.stream_stream_rpc_method_handler(
            parsing.streaming(servicer.ScoreChunks, score_chunk),
            response_serializer=scorer_pb2.ScoreResponseChunk.SerializeToString,
        ),
        "EmbedChunks": grpc.stream_stream_rpc_method_handler(
            parsing.streaming(servicer.EmbedChunks, embed_chunk),
            response_serializer=scorer_pb2.EmbedResponseChunk.SerializeToString,
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=scorer_pb2.GetModelInfoRequest.FromString,
            response_serializer=scorer_pb2.ModelInfo.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=scorer_pb2.ListModelsRequest.FromString,
            response_serializer=scorer_pb2.ListModelsResponse.SerializeToString,
        ),
    }
    service = scorer_pb2.DESCRIPTOR.services_by_name["Scorer"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
