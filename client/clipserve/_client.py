"""The synchronous SDK: ``CLIP`` mirrors the in-process adapter's ``score`` / ``score_batch``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from ._base import ClientBase
from ._batch import Attempt, BatchRun, BatchState, failed_result
from ._errors import ClipServeError
from ._requests import build_request, coerce_input
from ._retry import Deadline
from ._types import SimilarityInput, SimilarityResult
from .v1 import scorer_pb2, scorer_pb2_grpc


class CLIP(ClientBase):
    __doc__ = ClientBase.__doc__

    def _open(self) -> None:
        self._channel = self.connection.channel()
        self._stub = scorer_pb2_grpc.ScorerStub(self._channel)

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "CLIP":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- API -------------------------------------------------------------------------------
    def score(self, query: str, image_url: str) -> float:
        """The score of one pair; raises ClipServeError (with ``.code``) when it has none."""
        request = build_request(SimilarityInput(query=query, image_url=image_url), max_upload_bytes=self.max_upload_bytes)
        deadline = Deadline(self.timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._stub.Score(request, timeout=deadline.remaining(), metadata=self._metadata, wait_for_ready=attempt > 1)
                return response.score
            except grpc.RpcError as exc:
                error = ClipServeError.from_rpc_error(exc)
                if not self._should_retry(error.code, attempt, deadline):
                    raise error from None

    def model_info(self) -> scorer_pb2.ModelInfo:
        """The server's model, device, dtype, batching limits and cache statistics."""
        try:
            return self._stub.GetModelInfo(scorer_pb2.GetModelInfoRequest(), timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise ClipServeError.from_rpc_error(exc) from None

    def score_batch(
        self, inputs: Iterable[SimilarityInput | tuple[str, str] | dict], *, progress: bool | None = None
    ) -> list[SimilarityResult]:
        """Score every pair; one result per input, in input order.

        Pairs go out over ``streams`` parallel ScoreBatch streams with at most
        ``max_in_flight`` outstanding in all. A pair that fails gets ``score=None`` and
        ``error`` set; it never aborts the others. If a stream breaks (server restart,
        overload, a replica gone), only its unanswered pairs are sent again.
        """
        run = BatchRun(self, [coerce_input(x) for x in inputs], progress=self.progress if progress is None else progress)
        try:
            while (attempt := run.next_attempt()) is not None:
                with ThreadPoolExecutor(max_workers=attempt.streams, thread_name_prefix="clipserve-stream") as pool:
                    futures = [pool.submit(self._stream, run.state, attempt, run.deadline) for _ in range(attempt.streams)]
                    errors = [future.result() for future in futures]
                time.sleep(run.settle(errors))
        finally:
            run.state.close()
        return run.state.in_order()

    # -- internals -------------------------------------------------------------------------
    def _should_retry(self, code: grpc.StatusCode, attempt: int, deadline: Deadline) -> bool:
        pause = self._retry_pause(code, attempt, deadline)
        if pause is not None:
            time.sleep(pause)
        return pause is not None

    def _stream(self, state: BatchState, attempt: Attempt, deadline: Deadline) -> ClipServeError | None:
        """One ScoreBatch stream taking items from ``attempt.work`` until it is empty.

        Returns None when the stream ended normally, else the error that broke it; items it
        sent but got no answer for stay pending for the next attempt.
        """
        window = threading.Semaphore(attempt.window)
        stop = threading.Event()

        def requests() -> Iterator[scorer_pb2.ScoreRequest]:
            # Runs on a gRPC thread: blocks here, not on the server, when the window is full.
            while True:
                while not window.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                index = None if stop.is_set() else attempt.work.take()
                if index is None:
                    return
                try:
                    request = build_request(state.items[index], request_id=str(index), max_upload_bytes=self.max_upload_bytes)
                except ClipServeError as exc:
                    state.record(index, failed_result(state.items[index], exc.code.name, exc.details))
                    window.release()
                    continue
                yield request

        call = self._stub.ScoreBatch(requests(), timeout=deadline.remaining(), metadata=self._metadata, wait_for_ready=attempt.retrying)
        try:
            for response in call:
                if state.record_response(response):
                    window.release()
        except grpc.RpcError as exc:
            return ClipServeError.from_rpc_error(exc)
        finally:
            stop.set()
            call.cancel()
        return None
