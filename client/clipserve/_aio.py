"""The asyncio SDK: ``AsyncCLIP`` has ``CLIP``'s methods as coroutines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc

from ._base import ClientBase
from ._batch import BatchState, WorkQueue, failed_result
from ._errors import ClipServeError
from ._requests import build_request, coerce_input, local_path
from ._retry import Deadline
from ._types import SimilarityInput, SimilarityResult
from .v1 import scorer_pb2, scorer_pb2_grpc


async def _build(item: SimilarityInput, request_id: str, max_upload_bytes: int) -> scorer_pb2.ScoreRequest:
    # Reading a local file would block the event loop: do that in a thread.
    if local_path(item.image_url) is None:
        return build_request(item, request_id, max_upload_bytes=max_upload_bytes)
    return await asyncio.to_thread(build_request, item, request_id, max_upload_bytes=max_upload_bytes)


class AsyncCLIP(ClientBase):
    __doc__ = (ClientBase.__doc__ or "") + "\n    Every method is a coroutine; use ``async with`` or ``await close()``.\n"

    def _open(self) -> None:
        self._channel = self.connection.aio_channel()
        self._stub = scorer_pb2_grpc.ScorerStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncCLIP":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def score(self, query: str, image_url: str) -> float:
        """The score of one pair; raises ClipServeError (with ``.code``) when it has none."""
        request = await _build(SimilarityInput(query=query, image_url=image_url), "", self.max_upload_bytes)
        deadline = Deadline(self.timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._stub.Score(request, timeout=deadline.remaining(), metadata=self._metadata, wait_for_ready=attempt > 1)
                return response.score
            except grpc.RpcError as exc:
                error = ClipServeError.from_rpc_error(exc)
                if not await self._should_retry(error.code, attempt, deadline):
                    raise error from None

    async def model_info(self) -> scorer_pb2.ModelInfo:
        try:
            return await self._stub.GetModelInfo(scorer_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise ClipServeError.from_rpc_error(exc) from None

    async def score_batch(
        self, inputs: Iterable[SimilarityInput | tuple[str, str] | dict], *, progress: bool | None = None
    ) -> list[SimilarityResult]:
        """Like ``CLIP.score_batch``: one result per input, in input order, never lost or doubled."""
        items = [coerce_input(x) for x in inputs]
        state = BatchState(items, progress=self.progress if progress is None else progress)
        deadline = Deadline(self.timeout)
        # Attempts in a row that answered nothing: occasional broken streams in a long run do
        # not use up the retries, only a server that stays unusable does.
        attempt = 0
        retrying = False
        try:
            while pending := state.pending():
                work = WorkQueue(pending)
                streams = min(self.streams, len(pending))
                window = max(1, self.max_in_flight // streams)
                outcomes = await asyncio.gather(*(self._stream(state, work, window, deadline, retrying) for _ in range(streams)))
                if not state.pending():
                    break
                attempt = attempt + 1 if len(state.pending()) == len(pending) else 1
                retrying = True
                error = state.attempt_error([e for e in outcomes if e is not None])
                if not await self._should_retry(error.code, attempt, deadline):
                    state.fail_pending(error)
        finally:
            state.close()
        return state.in_order()

    async def _should_retry(self, code: grpc.StatusCode, attempt: int, deadline: Deadline) -> bool:
        pause = self._retry_pause(code, attempt, deadline)
        if pause is not None:
            await asyncio.sleep(pause)
        return pause is not None

    async def _stream(self, state: BatchState, work: WorkQueue, window_size: int, deadline: Deadline, wait_for_ready: bool) -> ClipServeError | None:
        window = asyncio.Semaphore(window_size)

        async def requests() -> AsyncIterator[scorer_pb2.ScoreRequest]:
            while True:
                await window.acquire()
                index = work.take()
                if index is None:
                    return
                try:
                    request = await _build(state.items[index], str(index), self.max_upload_bytes)
                except ClipServeError as exc:
                    state.record(index, failed_result(state.items[index], exc.code.name, exc.details))
                    window.release()
                    continue
                yield request

        call = self._stub.ScoreBatch(requests(), timeout=deadline.remaining(), metadata=self._metadata, wait_for_ready=wait_for_ready)
        try:
            async for response in call:
                if state.record_response(response):
                    window.release()
        except grpc.RpcError as exc:
            return ClipServeError.from_rpc_error(exc)
        finally:
            call.cancel()
        return None
