"""The asyncio SDK: ``AsyncCLIP`` has ``CLIP``'s methods as coroutines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc

from ._base import ClientBase
from ._batch import Attempt, BatchRun, BatchState, failed_result
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
        run = BatchRun(self, [coerce_input(x) for x in inputs], progress=self.progress if progress is None else progress)
        try:
            while (attempt := run.next_attempt()) is not None:
                errors = await asyncio.gather(*(self._stream(run.state, attempt, run.deadline) for _ in range(attempt.streams)))
                await asyncio.sleep(run.settle(errors))
        finally:
            run.state.close()
        return run.state.in_order()

    async def _should_retry(self, code: grpc.StatusCode, attempt: int, deadline: Deadline) -> bool:
        pause = self._retry_pause(code, attempt, deadline)
        if pause is not None:
            await asyncio.sleep(pause)
        return pause is not None

    async def _stream(self, state: BatchState, attempt: Attempt, deadline: Deadline) -> ClipServeError | None:
        """One ScoreBatch stream taking items from ``attempt.work`` until it is empty."""
        window = asyncio.Semaphore(attempt.window)

        async def requests() -> AsyncIterator[scorer_pb2.ScoreRequest]:
            while True:
                await window.acquire()
                index = attempt.work.take()
                if index is None:
                    return
                try:
                    request = await _build(state.items[index], str(index), self.max_upload_bytes)
                except ClipServeError as exc:
                    state.record(index, failed_result(state.items[index], exc.code.name, exc.details))
                    window.release()
                    continue
                yield request

        call = self._stub.ScoreBatch(requests(), timeout=deadline.remaining(), metadata=self._metadata, wait_for_ready=attempt.retrying)
        try:
            async for response in call:
                if state.record_response(response):
                    window.release()
        except grpc.RpcError as exc:
            return ClipServeError.from_rpc_error(exc)
        finally:
            call.cancel()
        return None
