"""Book-keeping of one ``score_batch`` call, shared by its streams (sync and aio clients)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from ._errors import ClipServeError
from ._retry import RETRYABLE_CODES, Deadline
from ._types import SimilarityInput, SimilarityResult
from .v1 import scorer_pb2

if TYPE_CHECKING:
    from ._base import ClientBase

_RETRYABLE_NAMES = frozenset(code.name for code in RETRYABLE_CODES)


def result_from_response(item: SimilarityInput, response: scorer_pb2.ScoreResponse) -> SimilarityResult:
    if response.HasField("error"):
        return failed_result(item, response.error.code, response.error.message)
    return SimilarityResult(
        query=item.query, image_url=item.image_url, score=response.score, query_id=item.query_id, image_id=item.image_id
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


def progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="pair", desc="scoring", dynamic_ncols=True)


class BatchState:
    """One slot per input, filled at most once: duplicates are dropped, nothing is lost."""

    def __init__(self, items: Sequence[SimilarityInput], *, progress: bool) -> None:
        self.items = items
        self.results: list[SimilarityResult | None] = [None] * len(items)
        self.failed = 0
        # The last "not now" answer to an item (UNAVAILABLE: the server is stopping): such items
        # stay pending and are resent, like those of a broken stream.
        self.retryable_error: ClipServeError | None = None
        self._lock = threading.Lock()
        self._bar = progress_bar(len(items)) if progress else None

    def pending(self) -> list[int]:
        with self._lock:
            return [i for i, r in enumerate(self.results) if r is None]

    def record(self, index: int, result: SimilarityResult) -> bool:
        """Store a result; False if that slot was already filled (a duplicate answer)."""
        with self._lock:
            if self.results[index] is not None:
                return False
            self.results[index] = result
            if result.error is not None:
                self.failed += 1
        if self._bar is not None:
            self._bar.update(1)
            if result.error is not None:
                self._bar.set_postfix(failed=self.failed, refresh=False)
        return True

    def record_response(self, response: scorer_pb2.ScoreResponse) -> bool:
        """Store a server answer; False for an answer that matches no input of this call."""
        try:
            index = int(response.request_id)
        except ValueError:
            return False
        if not 0 <= index < len(self.items):
            return False
        if response.HasField("error") and response.error.code in _RETRYABLE_NAMES:
            self.retryable_error = ClipServeError(grpc.StatusCode[response.error.code], response.error.message)
            return True
        self.record(index, result_from_response(self.items[index], response))
        return True

    def attempt_error(self, stream_errors: Sequence[ClipServeError]) -> ClipServeError:
        """Why an attempt left items unanswered; decides whether to retry (and clears the
        per-item error for the next attempt)."""
        item_error, self.retryable_error = self.retryable_error, None
        if stream_errors:
            final = [e for e in stream_errors if e.code not in RETRYABLE_CODES]
            return (final or list(stream_errors))[0]
        return item_error or STREAM_ENDED_EARLY

    def fail_pending(self, error: ClipServeError) -> None:
        for index in self.pending():
            self.record(index, failed_result(self.items[index], error.code.name, error.details))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def in_order(self) -> list[SimilarityResult]:
        missing = [i for i, r in enumerate(self.results) if r is None]
        assert not missing, f"unanswered items {missing[:5]}: a bug in score_batch"
        return self.results  # type: ignore[return-value]


class WorkQueue:
    """Indices still to send in this attempt; streams take from it until it runs dry."""

    def __init__(self, indices: Sequence[int]) -> None:
        self._iter = iter(indices)
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            return next(self._iter, None)


@dataclass(frozen=True)
class Attempt:
    """One round of streams over the items still unanswered."""

    work: WorkQueue
    streams: int
    window: int  # items in flight per stream
    retrying: bool  # a retry waits for the server to be reachable (wait_for_ready)


class BatchRun:
    """The attempt loop of one ``score_batch``, without the streaming and the waiting, which
    the sync and aio clients do their own way::

        while (attempt := run.next_attempt()) is not None:
            errors = <run attempt.streams streams taking from attempt.work>
            <sleep run.settle(errors) seconds>
    """

    def __init__(self, client: ClientBase, items: Sequence[SimilarityInput], *, progress: bool) -> None:
        self.state = BatchState(items, progress=progress)
        self.deadline = Deadline(client.timeout)
        self._client = client
        self._sent: list[int] = []
        # Attempts in a row that answered nothing: occasional broken streams in a long run do
        # not use up the retries, only a server that stays unusable does.
        self._fruitless = 0

    def next_attempt(self) -> Attempt | None:
        pending = self.state.pending()
        if not pending:
            return None
        retrying = bool(self._sent)
        self._sent = pending
        streams = min(self._client.streams, len(pending))
        return Attempt(WorkQueue(pending), streams, max(1, self._client.max_in_flight // streams), retrying)

    def settle(self, stream_errors: Sequence[ClipServeError | None]) -> float:
        """Seconds to wait before the next attempt (0 when there is none to make)."""
        left = self.state.pending()
        if not left:
            return 0.0
        self._fruitless = self._fruitless + 1 if len(left) == len(self._sent) else 1
        error = self.state.attempt_error([e for e in stream_errors if e is not None])
        pause = self._client._retry_pause(error.code, self._fruitless, self.deadline)
        if pause is None:
            self.state.fail_pending(error)  # final: every unanswered pair gets this error
            return 0.0
        return pause


STREAM_ENDED_EARLY = ClipServeError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream without answering every item")
