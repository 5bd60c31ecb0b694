"""The synchronous SDK: ``CLIP`` mirrors the in-process adapter's ``score`` / ``score_batch``."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from ._channel import Connection, PemSource, resolve_address
from ._config import DEFAULT_COL_NAME, load_client_config
from ._errors import ClipServeError, status_code_from_name
from ._requests import DEFAULT_MAX_UPLOAD_BYTES, build_request, coerce_input
from ._retry import RETRYABLE_CODES, Deadline, RetryPolicy
from ._types import SimilarityInput, SimilarityResult
from .v1 import scorer_pb2, scorer_pb2_grpc

def result_from_response(item: SimilarityInput, response: scorer_pb2.ScoreResponse) -> SimilarityResult:
    if response.HasField("error"):
        return failed_result(item, response.error.code, response.error.message)
    return SimilarityResult(
        query=item.query,
        image_url=item.image_url,
        score=response.score,
        query_id=item.query_id,
        image_id=item.image_id,
    )


def failed_result(item: SimilarityInput, code: str, message: str) -> SimilarityResult:
    return SimilarityResult(
        query=item.query,
        image_url=item.image_url,
        score=None,
        query_id=item.query_id,
        image_id=item.image_id,
        error=f"{code}: {message}",
        error_code=code,
    )


class CLIP:
    """Scores (query, image) pairs on a remote clipserve server.

    Args:
        address: ``host:port`` of the server (any gRPC target, e.g. ``dns:///svc:50051``).
            Defaults to ``[similarity_config].address`` from ``config``, then the
            ``CLIPSERVE_ADDRESS`` environment variable, then ``localhost:50051``.
        config: Path to a config.toml whose ``[similarity_config]`` table has ``address``
            (and ``col_name``, the score column for file scoring).
        timeout: Total seconds allowed for one ``score`` or ``score_batch`` call, retries
            included. None waits as long as it takes.
        max_in_flight: Items a ``score_batch`` stream keeps outstanding; enough to fill the
            server's batches without queueing the whole input on the server.
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
        address: str | None = None,
        *,
        config: str | Path | None = None,
        timeout: float | None = None,
        max_in_flight: int = 256,
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
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
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

        Pairs stream to the server with at most ``max_in_flight`` outstanding. A pair that
        fails gets ``score=None`` and ``error`` set; it never aborts the others. If the stream
        breaks (server restart, overload), only the unanswered pairs are sent again.
        """
        items = [coerce_input(x) for x in inputs]
        results: list[SimilarityResult | None] = [None] * len(items)
        show = self.progress if progress is None else progress
        bar = _progress_bar(len(items)) if show else None
        deadline = Deadline(self.timeout)
        attempt = 0
        try:
            while True:
                pending = [i for i, r in enumerate(results) if r is None]
                if not pending:
                    break
                attempt += 1
                error = self._stream_once(items, pending, results, deadline, bar, wait_for_ready=attempt > 1)
                if error is None:
                    continue
                if not self._should_retry(error.code, attempt, deadline):
                    for i in pending:
                        if results[i] is None:
                            results[i] = failed_result(items[i], error.code.name, error.details)
                    break
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]  # every slot is filled above

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

    def _stream_once(
        self,
        items: Sequence[SimilarityInput],
        pending: Sequence[int],
        results: list[SimilarityResult | None],
        deadline: Deadline,
        bar: Any,
        *,
        wait_for_ready: bool,
    ) -> ClipServeError | None:
        """Send ``pending`` over one ScoreBatch stream, filling ``results``.

        Returns None when the stream ended normally (every sent item was answered or is to be
        resent), else the error that broke it.
        """
        window = threading.Semaphore(self.max_in_flight)
        stop = threading.Event()
        lock = threading.Lock()

        def record(index: int, result: SimilarityResult) -> None:
            with lock:
                if results[index] is not None:
                    return  # a duplicate answer (e.g. after a resend): keep the first
                results[index] = result
            if bar is not None:
                bar.update(1)
                if result.error is not None:
                    bar.set_postfix_str(f"failed={sum(1 for r in results if r is not None and r.error)}")

        def requests() -> Iterator[scorer_pb2.ScoreRequest]:
            # Runs on a gRPC thread: blocks here, not on the server, when the window is full.
            for index in pending:
                while not window.acquire(timeout=0.1):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                try:
                    request = build_request(items[index], request_id=str(index), max_upload_bytes=self.max_upload_bytes)
                except ClipServeError as exc:
                    record(index, failed_result(items[index], exc.code.name, exc.details))
                    window.release()
                    continue
                yield request

        call = self._stub.ScoreBatch(requests(), timeout=deadline.remaining(), metadata=self._metadata, wait_for_ready=wait_for_ready)
        try:
            for response in call:
                index = _parse_index(response.request_id, len(items))
                if index is None:
                    continue
                record(index, result_from_response(items[index], response))
                window.release()
        except grpc.RpcError as exc:
            return ClipServeError.from_rpc_error(exc)
        finally:
            stop.set()
            call.cancel()
        return None


def _parse_index(request_id: str, size: int) -> int | None:
    try:
        index = int(request_id)
    except ValueError:
        return None
    return index if 0 <= index < size else None


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="pair", desc="scoring", dynamic_ncols=True)
