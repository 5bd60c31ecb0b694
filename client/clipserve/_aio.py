"""The asyncio SDK: ``AsyncCLIP`` has ``CLIP``'s methods as coroutines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from ._base import ClientBase, UnaryAttempts
from ._chunks import Packer, answers
from ._errors import ClipServeError
from ._info import ModelInfo, ModelList
from ._replicas import Replicas
from ._run import STOP, Lane, Run, Take
from ._types import EmbeddingResult, SimilarityInput, SimilarityResult
from .v1 import scorer_pb2, scorer_pb2_grpc

_POLL_S = 0.25
_CLOSE_S = 2.0  # how long finished streams get to close cleanly before they are cancelled


class _Signal:
    """Wakes every coroutine waiting for the run to change (set from the event loop only)."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, timeout: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass


class AsyncCLIP(ClientBase):
    """``CLIP`` for asyncio: the same arguments and the same results, on the caller's event
    loop. Every method is a coroutine; use ``async with`` or ``await close()``.

        >>> async with clipserve.AsyncCLIP("gpu-box:50051") as clip:
        ...     results = await clip.score_batch(pairs)
    """

    def _open(self) -> None:
        self._replicas = Replicas(self.discovery, self.connection.aio_channel, scorer_pb2_grpc.ScorerStub)

    async def close(self) -> None:
        """Close the connections to every replica."""
        for channel in self._replicas.channels():
            await channel.close()

    async def __aenter__(self) -> "AsyncCLIP":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- API (see CLIP) --------------------------------------------------------------------
    async def score(self, query: str, image_url: str) -> float:
        """The score of one pair; raises ClipServeError (with ``.code``) when it has none."""
        request = await asyncio.to_thread(self._score_request, query, image_url)
        return (await self._unary(lambda stub: stub.Score, request)).score

    async def model_info(self, model: str | None = None) -> ModelInfo:
        """Like ``CLIP.model_info``: this client's model (or ``model``), where and how it runs,
        its caches, and which replica answered; the message itself is its ``.proto``."""
        request = scorer_pb2.GetModelInfoRequest(model=self.model if model is None else model)
        return ModelInfo.from_proto(await self._unary(lambda stub: stub.GetModelInfo, request))

    async def list_models(self) -> ModelList:
        """Like ``CLIP.list_models``: every model the server holds, and its default."""
        return ModelList.from_proto(await self._unary(lambda stub: stub.ListModels, scorer_pb2.ListModelsRequest()))

    async def score_batch(
        self, inputs: Iterable[SimilarityInput | tuple[str, str] | dict[str, Any]], *, progress: bool | None = None
    ) -> list[SimilarityResult]:
        """Like ``CLIP.score_batch``: one result per input, in input order, never lost or doubled."""
        return await self._batch(self._score_job(inputs), progress)

    async def embed_texts(
        self, texts: Iterable[str], *, raw: bool = False, progress: bool | None = None
    ) -> list[EmbeddingResult]:
        """Like ``CLIP.embed_texts``: each text's embedding, in order; unit length unless ``raw``."""
        return await self._batch(self._embed_job(texts, images=False, raw=raw), progress)

    async def embed_images(
        self, images: Iterable[str], *, raw: bool = False, progress: bool | None = None
    ) -> list[EmbeddingResult]:
        """Like ``CLIP.embed_images``: each image's embedding (URL or local file), in order."""
        return await self._batch(self._embed_job(images, images=True, raw=raw), progress)

    # -- internals -------------------------------------------------------------------------
    async def _current_replicas(self) -> list[Any]:
        # Resolving a DNS name blocks: off the event loop.
        return await asyncio.to_thread(self._replicas.current) if self.discovery.dynamic else self._replicas.current()

    async def _unary(self, method: Callable[[Any], Any], request: Any) -> Any:
        attempts = UnaryAttempts(
            self,
            self._replicas.rotate() if not self.discovery.dynamic else await asyncio.to_thread(self._replicas.rotate),
        )
        while True:
            stub = self._replicas.stub(attempts.replica())
            try:
                return await method(stub)(request, timeout=attempts.deadline.remaining(), metadata=self._metadata)
            except grpc.RpcError as exc:
                await asyncio.sleep(attempts.failed(ClipServeError.from_rpc_error(exc)))

    async def _batch(self, job: Any, progress: bool | None) -> list[Any]:
        signal = _Signal()
        run = self._run(job, progress, on_change=signal.notify)
        workers: list[asyncio.Task[None]] = []
        try:
            while not run.done:
                replicas = await self._current_replicas()
                workers.extend(
                    asyncio.ensure_future(self._work(run, lane, signal)) for lane in run.sync_replicas(replicas)
                )
                run.check(None if replicas else self.discovery.resolution_error())
                await signal.wait(_POLL_S)
        finally:
            # Done: every stream half-closes and ends by itself; give up on that after a moment.
            if run.done and workers:
                await asyncio.wait(workers, timeout=_CLOSE_S)
            run.cancel()
            run.close()
            await asyncio.gather(*workers, return_exceptions=True)
        return run.in_order()

    async def _work(self, run: Run[Any], lane: Lane, signal: _Signal) -> None:
        stub = self._replicas.stub(lane.replica)
        while (pause := run.before_stream(lane)) is not None:
            if pause > 0:
                await asyncio.sleep(min(pause, _POLL_S))
                continue
            run.stream_ended(lane, await self._stream(run, lane, stub, signal))

    async def _stream(
        self, run: Run[Any], lane: Lane, stub: scorer_pb2_grpc.ScorerStub, signal: _Signal
    ) -> ClipServeError | None:
        stream, chunked = lane.stream, lane.chunked
        packer = Packer(run.job.chunk if chunked else None)

        async def requests() -> AsyncIterator[Any]:
            while True:
                take = run.take(lane, stream)
                if not isinstance(take, Take):  # STOP or WAIT
                    for message in packer.flush():  # nothing more ready: send what is packed
                        yield message
                    if take is STOP:
                        return
                    await signal.wait(_POLL_S)
                    continue
                try:
                    # Hashing or reading a local file would block the event loop.
                    if self._needs_thread(run, take):
                        request = await asyncio.to_thread(self._build, run, lane, take)
                    else:
                        request = self._build(run, lane, take)
                except ClipServeError as exc:
                    run.fail_item(lane, take.index, exc)
                    continue
                for message in packer.add(request):
                    yield message

        call = getattr(stub, run.rpc(lane))(requests(), timeout=run.deadline.remaining(), metadata=self._metadata)
        run.attach(lane, call)
        try:
            run.stream_opened(lane, stream, await call.initial_metadata())  # sent before any answer
            async for response in call:
                run.answer(lane, answers(response, chunked))
        except grpc.RpcError as exc:
            return ClipServeError.from_rpc_error(exc)
        finally:
            call.cancel()
        return None
