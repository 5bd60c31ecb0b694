"""The synchronous SDK: ``CLIP`` mirrors the in-process adapter's ``score`` / ``score_batch``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from ._batch import STREAM_ENDED_EARLY, BatchState, WorkQueue, failed_result, pick_error
from ._channel import Connection, PemSource, resolve_address
from ._config import DEFAULT_COL_NAME, load_client_config
from ._errors import ClipServeError
from ._requests import DEFAULT_MAX_UPLOAD_BYTES, build_request, coerce_input
from ._retry import RETRYABLE_CODES, Deadline, RetryPolicy
from ._types import SimilarityInput, SimilarityResult
from .v1 import scorer_pb2, scorer_pb2_grpc


class CLIP:
    """Scores (query, image) pairs on a remote clipserve server.

    Args:
        address: ``host:port`` of the server, any gRPC target (e.g. ``dns:///svc:50051``,
            whose replicas round_robin spreads calls over), or several ``host:port`` (a list
            or comma-separated) to spread over those. Defaults to ``[similarity_config].address`` from ``config``, then the
            ``CLIPSERVE_ADDRESS`` environment variable, then ``localhost:50051``.
        config: Path to a config.toml whose ``[similarity_config]`` table has ``address``
            (and ``col_name``, the score column for file scoring).
        timeout: Total seconds allowed for one ``score`` or ``score_batch`` call, retries
            included. None waits as long as it takes.
        max_in_flight: Items ``score_batch`` keeps outstanding; enough to fill the server's
            batches without queueing the whole input on the server.
        streams: Parallel ScoreBatch streams per ``score_batch``. Load balancing is per call,
            so with several replicas (a list of addresses or a ``dns:///`` name) use at least
            as many streams as replicas.
        retry: When to retry UNAVAILABLE / RESOURCE_EXHAUSTED (see ``RetryPolicy``).
        progress: Show a tqdm progress bar in ``score_batch`` by default.
        tls, root_certificates, certificate_chain, private_key, auth_token: how to reach a
            server that uses TLS, mutual TLS or a bearer token (see ``Connection``).
        max_upload_bytes: local files larger than this fail locally with INVALID_ARGUMENT
            instead of being sent (match the server's ``--max-image-bytes``).

    Use it as a context manager, or call ``close()``, to release the connection.
    """

    def __init__(
        self,
        address: str | list[str] | None = None,
        *,
        config: str | Path | None = None,
        timeout: float | None = None,
        max_in_flight: int = 256,
        streams: int = 4,
        retry: RetryPolicy | None = None,
        progress: bool = False,
        tls: bool = False,
        root_certificates: PemSource = None,
        certificate_chain: PemSource = None,
        private_key: PemSource = None,
        auth_token: str | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ) -> None:
        file_config = load_client_config(config) if config is not None else None
        self.address = resolve_address(address, file_config.address if file_config else None)
        self.connection = Connection(self.address, tls, root_certificates, certificate_chain, private_key, auth_token)
        self.max_upload_bytes = max_upload_bytes
        self.col_name = file_config.col_name if file_config else DEFAULT_COL_NAME
        self.timeout = timeout if timeout is not None else (file_config.timeout if file_config else None)
        if max_in_flight < 1 or streams < 1:
            raise ValueError("max_in_flight and streams must be at least 1")
        self.max_in_flight = max_in_flight
        self.streams = streams
        self.retry = retry or RetryPolicy()
        self.progress = progress
        self._metadata = self.connection.metadata
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
        items = [coerce_input(x) for x in inputs]
        state = BatchState(items, progress=self.progress if progress is None else progress)
        deadline = Deadline(self.timeout)
        attempt = 0
        try:
            while pending := state.pending():
                attempt += 1
                work = WorkQueue(pending)
                streams = min(self.streams, len(pending))
                window = max(1, self.max_in_flight // streams)
                with ThreadPoolExecutor(max_workers=streams, thread_name_prefix="clipserve-stream") as pool:
                    outcomes = list(pool.map(lambda _: self._stream(state, work, window, deadline, attempt > 1), range(streams)))
                errors = [e for e in outcomes if e is not None]
                if not errors and len(state.pending()) < len(pending):
                    continue
                error = pick_error(errors) if errors else STREAM_ENDED_EARLY
                if not self._should_retry(error.code, attempt, deadline):
                    state.fail_pending(error)
        finally:
            state.close()
        return state.in_order()

    # -- internals -------------------------------------------------------------------------
    def _should_retry(self, code: grpc.StatusCode, attempt: int, deadline: Deadline) -> bool:
        if code not in RETRYABLE_CODES or attempt >= self.retry.max_attempts:
            return False
        pause = self.retry.backoff(attempt)
        remaining = deadline.remaining()
        if remaining is not None and remaining <= pause:
            return False
        time.sleep(pause)
        return True

    def _stream(self, state: BatchState, work: WorkQueue, window_size: int, deadline: Deadline, wait_for_ready: bool) -> ClipServeError | None:
        """One ScoreBatch stream taking items from ``work`` until it is empty.

        Returns None when the stream ended normally, else the error that broke it; items it
        sent but got no answer for stay pending for the next attempt.
        """
        window = threading.Semaphore(window_size)
        stop = threading.Event()

        def requests() -> Iterator[scorer_pb2.ScoreRequest]:
            # Runs on a gRPC thread: blocks here, not on the server, when the window is full.
            while True:
                while not window.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                index = None if stop.is_set() else work.take()
                if index is None:
                    return
                try:
                    request = build_request(state.items[index], request_id=str(index), max_upload_bytes=self.max_upload_bytes)
                except ClipServeError as exc:
                    state.record(index, failed_result(state.items[index], exc.code.name, exc.details))
                    window.release()
                    continue
                yield request

        call = self._stub.ScoreBatch(requests(), timeout=deadline.remaining(), metadata=self._metadata, wait_for_ready=wait_for_ready)
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
