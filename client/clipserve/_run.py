"""The book-keeping of one batch call (``score_batch``, ``embed_texts``, ``embed_images``),
shared by the sync and aio clients, which only do the streaming and the waiting.

Work distribution: every replica has a *lane* that pulls items from one shared queue as
long as fewer than its window are unanswered there, so a faster replica simply takes more
(work stealing). Windows start small and grow by one per answer, up to what the replica's
stream says it reads ahead (its initial metadata ``clipserve-max-in-flight``; 256 where it says
nothing) and to the caller's ``max_in_flight``, so that a short batch is spread over all
replicas instead of filling the first one. When the queue runs dry, an idle lane may *hedge*:
send again an item that a slower lane will answer much later than this one would; the first
answer wins and the other is dropped.

Exactly once, in order: each input has one result slot, filled by the first answer; an item
a broken stream left unanswered goes back to the front of the queue.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc

from ._errors import ClipServeError
from ._jobs import Job
from ._replicas import ReplicaAddress
from ._retry import RETRYABLE_CODES, Deadline, RetryPolicy
from ._uploads import Send, ServerImages
from ._wire import IMAGE_BYTES_NEEDED, MAX_IN_FLIGHT_KEY

log = logging.getLogger("clipserve")

R = TypeVar("R")

INITIAL_WINDOW = 16
DEFAULT_MAX_IN_FLIGHT = 256  # a server that does not say how far it reads ahead
_RETRYABLE_NAMES = frozenset(code.name for code in RETRYABLE_CODES)
_NO_CHUNKS_CODES = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL})
_LATENCY_WEIGHT = 0.1  # of each new answer in a lane's moving average latency
_HEDGE_MARGIN = 1.5  # hedge when the other lane would answer this much later than ours
_STALLED = 4.0  # a lane silent for this many of its latencies counts as stalled


@dataclass(frozen=True)
class Take:
    """An item for a lane to send; ``resend`` says how, when the server asked for bytes."""

    index: int
    resend: Send | None = None


WAIT = "wait"  # nothing to send now
STOP = "stop"  # end this stream's requests


@dataclass
class ClientStats:
    """What a client has done, cumulative over its calls (``CLIP.stats()``)."""

    items_by_replica: dict[str, int] = field(default_factory=dict)  # answers, per replica address
    upload_bytes: int = 0  # image bytes sent
    hashed_bytes: int = 0  # local file bytes read to hash them (each file once while unchanged)
    hash_seconds: float = 0.0  # time spent hashing them
    resends: int = 0  # requests sent again because a server asked for the image bytes
    hedges: int = 0  # requests also sent to a second replica at the end of a batch


class Lane:
    """One replica's part in a run."""

    def __init__(self, replica: ReplicaAddress, limit: int) -> None:
        self.replica = replica
        self.limit = limit  # most outstanding on the current stream
        self.window = min(INITIAL_WINDOW, limit)
        self.sent: dict[int, tuple[float, str | None]] = {}  # index -> (sent at, sha256), in send order
        self.ready: collections.deque[Take] = collections.deque()  # resends bound to this replica
        self.images = ServerImages()
        self.latency: float | None = None
        self.last_answer = time.monotonic()
        self.progressed = False  # this stream answered something
        self.failures = 0  # streams in a row that ended in a retryable error without progress
        self.retry_at = 0.0
        self.error: ClipServeError | None = None
        self.drain_error: ClipServeError | None = None  # the server answered "not now": stop sending
        self.dead = False  # a final error: this replica gets no more work in this run
        self.retired = False  # gone from DNS
        self.working = False  # a worker runs for it
        self.call: Any = None  # the stream in progress, cancelled when the run ends
        # Which stream of the lane is the current one. gRPC may go on pulling requests from an
        # ended stream's iterator for a while: what it takes then would be lost in a dead call.
        self.stream = 0
        self.chunked = True  # several items per message; False once the server lacks that RPC

    @property
    def down(self) -> bool:
        return self.dead or self.failures > 0


class Run(Generic[R]):
    """One batch call. Thread-safe: the sync client's stream threads share it."""

    def __init__(
        self,
        job: Job[R],
        *,
        address: str,
        max_in_flight: int | None,
        retry: RetryPolicy,
        timeout: float | None,
        stats: ClientStats,
        stats_lock: threading.Lock,
        progress: bool,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.job = job
        self.address = address
        self.deadline = Deadline(timeout)
        self.results: list[R | None] = [None] * len(job)
        self._left = len(job)
        self._queue = collections.deque(range(len(job)))
        self._outstanding: dict[int, list[Lane]] = {}
        self.lanes: dict[ReplicaAddress, Lane] = {}
        self._max_in_flight = max_in_flight
        self._retry = retry
        self._stats = stats
        self._stats_lock = stats_lock
        self._cond = threading.Condition(threading.RLock())
        self._on_change = on_change
        self._last_progress = time.monotonic()
        self._warned = False
        self._failed = 0
        self._cancelled = False
        self._no_servers: str | None = None
        self.final_error: ClipServeError | None = None  # why the items left over were failed
        self._bar = _progress_bar(len(job)) if progress and len(job) else None

    # -- state -----------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._left == 0

    def _changed(self) -> None:
        self._cond.notify_all()
        if self._on_change is not None:
            self._on_change()

    def wait(self, timeout: float) -> None:
        """Block (sync client) until something changes or ``timeout`` passes."""
        with self._cond:
            if not self.done:
                self._cond.wait(timeout)

    def attach(self, lane: Lane, call: Any) -> None:
        """The lane's stream, to be cancelled when the run no longer needs it."""
        with self._cond:
            lane.call = call
            if self.done or self._cancelled:
                call.cancel()

    def cancel(self) -> None:
        """Stop every stream (the caller is done or gave up, e.g. KeyboardInterrupt)."""
        with self._cond:
            self._cancelled = True
            for lane in self.lanes.values():
                if lane.call is not None:
                    lane.call.cancel()
            self._changed()

    def in_order(self) -> list[R]:
        """The results, in input order; raises when the call failed as a whole (servers
        unreachable, the call refused): items that ran out of time are failed one by one."""
        assert self.done, "a batch call returned with unanswered items: a bug in clipserve"
        error = self.final_error
        if error is not None and error.code != grpc.StatusCode.DEADLINE_EXCEEDED:
            raised = ClipServeError(error.code, error.details)
            raised.results = list(self.results)
            raise raised
        return self.results  # type: ignore[return-value]

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    # -- replicas --------------------------------------------------------------------------
    def sync_replicas(self, replicas: list[ReplicaAddress]) -> list[Lane]:
        """Match the lanes to the replicas now known; return the lanes that need a worker."""
        with self._cond:
            current = set(replicas)
            retiring = [lane for replica, lane in self.lanes.items() if replica not in current and not lane.retired]
            for replica, lane in self.lanes.items():
                lane.retired = replica not in current
            for replica in replicas:
                if replica not in self.lanes:
                    self.lanes[replica] = Lane(replica, self._limit())
            starting = [lane for lane in self.lanes.values() if not lane.working and not lane.retired and not lane.dead]
            for lane in starting:
                lane.working = True
            if retiring or starting:
                self._changed()
            return starting

    def before_stream(self, lane: Lane) -> float | None:
        """Seconds the lane's worker waits before its next stream; None: the worker stops."""
        with self._cond:
            if self.done or self._cancelled or lane.dead or lane.retired:
                lane.working = False
                return None
            return max(0.0, lane.retry_at - time.monotonic())

    def _limit(self, server: int | None = None) -> int:
        """Most items outstanding on one stream: what its server reads ahead, and no more than
        the caller's ``max_in_flight``."""
        limit = server or DEFAULT_MAX_IN_FLIGHT
        return min(limit, self._max_in_flight) if self._max_in_flight is not None else limit

    def stream_opened(self, lane: Lane, stream: int, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """The stream's initial metadata arrived: keep no more outstanding than it reads ahead."""
        told = next((value for key, value in metadata or () if key == MAX_IN_FLIGHT_KEY), None)
        try:
            server = int(told) if told is not None else None
        except ValueError:
            server = None
        with self._cond:
            if stream == lane.stream and server is not None and server >= 1:
                lane.limit = self._limit(server)
                lane.window = min(lane.window, lane.limit)
                self._changed()

    def rpc(self, lane: Lane) -> str:
        """The method the lane's next stream calls."""
        return self.job.chunk_rpc if lane.chunked else self.job.rpc

    def stream_ended(self, lane: Lane, error: ClipServeError | None) -> None:
        """The lane's stream is over: what it left unanswered goes back to the queue."""
        with self._cond:
            if error is not None and error.code in _NO_CHUNKS_CODES and lane.chunked and not lane.progressed:
                # A server older than the chunked RPCs answers UNIMPLEMENTED, or, to the asyncio
                # client racing its first writes against that answer, INTERNAL about half of the
                # time (grpc/grpc#36066). Either way, before any answer: the same items, one per
                # message. (A server that really failed fails the plain stream the same way.)
                log.debug(
                    "clipserve: %s refused %s (%s); using %s",
                    lane.replica.target,
                    self.job.chunk_rpc,
                    error.code.name,
                    self.job.rpc,
                )
                lane.chunked, error = False, None
            lane.call = None
            lane.stream += 1
            unanswered = [i for i in lane.sent] + [t.index for t in lane.ready]
            lane.sent.clear()
            lane.ready.clear()
            for index in reversed(unanswered):
                self._drop_outstanding(index, lane)
                if self.results[index] is None and not self._outstanding.get(index):
                    self._queue.appendleft(index)
            lane.images.reset()  # the server may be a new process: it holds nothing we sent
            lane.limit = self._limit()  # the next stream may reach a server with other settings
            lane.window = min(INITIAL_WINDOW, lane.limit)
            error = error or lane.drain_error
            lane.drain_error = None
            if error is None or self.done:
                lane.failures = 0
            else:
                if error.code in RETRYABLE_CODES:
                    lane.failures = 0 if lane.progressed else lane.failures + 1
                    lane.retry_at = time.monotonic() + self._retry.backoff(max(1, lane.failures))
                    lane.error = error
                    self._warn_waiting(lane, error)
                else:
                    lane.dead, lane.error = True, error
            lane.progressed = False
            self._check_give_up()
            self._changed()

    # -- handing out work ------------------------------------------------------------------
    def take(self, lane: Lane, stream: int) -> Take | str:
        """The next item for stream number ``stream`` of ``lane`` to send, ``WAIT`` or ``STOP``."""
        with self._cond:
            if self.done or self._cancelled or lane.dead or lane.drain_error is not None or stream != lane.stream:
                return STOP
            if len(lane.sent) >= lane.window:
                return WAIT
            while lane.ready:
                take = lane.ready.popleft()
                if self.results[take.index] is None:
                    return self._sending(lane, take)
            if lane.retired:
                return STOP
            while self._queue:
                index = self._queue.popleft()
                if self.results[index] is None:
                    return self._sending(lane, Take(index))
            hedged = self._hedge(lane)
            if hedged is not None:
                with self._stats_lock:
                    self._stats.hedges += 1
                return self._sending(lane, Take(hedged))
            return WAIT

    def take_blocking(self, lane: Lane, stream: int, timeout: float) -> Take | str:
        with self._cond:
            take = self.take(lane, stream)
            if take is WAIT:
                self._cond.wait(timeout)
                take = self.take(lane, stream)
            return take

    def _sending(self, lane: Lane, take: Take) -> Take:
        lane.sent[take.index] = (time.monotonic(), None)
        self._outstanding.setdefault(take.index, []).append(lane)
        return take

    def sending_file(self, lane: Lane, index: int, sha256: str, send: Send, size: int) -> None:
        """Note how a local file went out: the upload protocol and the byte count need it."""
        with self._cond:
            if index in lane.sent:
                lane.sent[index] = (lane.sent[index][0], sha256)
            lane.images.sent(sha256, index, send)
            if send is Send.BYTES:
                with self._stats_lock:
                    self._stats.upload_bytes += size

    def _hedge(self, lane: Lane) -> int | None:
        """An item outstanding on another lane that this one would likely answer much sooner."""
        if lane.latency is None:
            return None
        now = time.monotonic()
        for other in self.lanes.values():
            if other is lane or not other.sent:
                continue
            latency = other.latency or 0.0
            stalled = now - other.last_answer > _STALLED * max(latency, lane.latency)
            for index, (sent_at, _) in reversed(other.sent.items()):  # youngest first: answered last
                if self.results[index] is not None or len(self._outstanding.get(index, ())) > 1:
                    continue
                if stalled or latency - (now - sent_at) > _HEDGE_MARGIN * lane.latency:
                    return index
                break  # older items there are closer to done
        return None

    # -- answers ---------------------------------------------------------------------------
    def answer(self, lane: Lane, responses: Iterable[Any]) -> None:
        """The item responses of one stream message."""
        with self._cond:
            for response in responses:
                self._answer(lane, response)
            self._changed()

    def _answer(self, lane: Lane, response: Any) -> None:
        try:
            index = int(response.request_id)
        except ValueError:
            return  # not ours
        if index not in lane.sent:
            return  # a duplicate or stray answer
        sent_at, sha256 = lane.sent.pop(index)
        self._drop_outstanding(index, lane)
        now = time.monotonic()
        took = now - sent_at
        lane.latency = took if lane.latency is None else lane.latency + _LATENCY_WEIGHT * (took - lane.latency)
        lane.last_answer = now
        lane.window = min(lane.limit, lane.window + 1)
        error = response.error if response.HasField("error") else None
        if error is not None and error.reason == IMAGE_BYTES_NEEDED and sha256 is not None:
            if self.results[index] is None:
                lane.ready.append(Take(index, lane.images.resend_as(sha256, index)))
                with self._stats_lock:
                    self._stats.resends += 1
        elif error is not None and error.code in _RETRYABLE_NAMES:
            # The server is stopping or overloaded: stop sending it more on this stream;
            # this item goes to whichever lane is free.
            lane.drain_error = ClipServeError(grpc.StatusCode[error.code], error.message)
            if self.results[index] is None and not self._outstanding.get(index):
                self._queue.appendleft(index)
        else:
            lane.images.answered(index)
            lane.progressed = True
            if self._record(index, self.job.result(index, response)):
                with self._stats_lock:
                    key = lane.replica.target
                    self._stats.items_by_replica[key] = self._stats.items_by_replica.get(key, 0) + 1

    def fail_item(self, lane: Lane, index: int, error: ClipServeError) -> None:
        """The item could not be sent (e.g. its local file is unreadable): that is its result."""
        with self._cond:
            lane.sent.pop(index, None)
            self._drop_outstanding(index, lane)
            self._record(index, self.job.failure(index, error.code.name, error.details))
            self._changed()

    def _record(self, index: int, result: R) -> bool:
        if self.results[index] is not None:
            return False
        self.results[index] = result
        self._left -= 1
        self._last_progress = time.monotonic()
        self._outstanding.pop(index, None)
        if self._bar is not None:
            self._bar.update(1)
            if getattr(result, "error", None) is not None:
                self._failed += 1
                self._bar.set_postfix(failed=self._failed, refresh=False)
        if self.done:
            for other in self.lanes.values():
                if other.call is not None and other.sent:
                    other.call.cancel()  # hedged duplicates still in flight: not needed
        return True

    def _drop_outstanding(self, index: int, lane: Lane) -> None:
        lanes = self._outstanding.get(index)
        if lanes is not None and lane in lanes:
            lanes.remove(lane)

    # -- giving up -------------------------------------------------------------------------
    def check(self, no_servers: str | None = None) -> None:
        """Called periodically by the client: give up on servers that cannot be reached.
        ``no_servers`` says why there is no replica at all (a DNS name that does not resolve)."""
        with self._cond:
            self._no_servers = no_servers
            self._check_give_up()

    def _check_give_up(self) -> None:
        if self.done:
            return
        if self.deadline.expired():
            self._fail_all(
                ClipServeError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, "the call's timeout ran out before every item was answered"
                )
            )
            return
        lanes = [lane for lane in self.lanes.values() if not lane.retired]
        if lanes and all(lane.dead for lane in lanes):
            self._fail_all(next(lane.error for lane in lanes if lane.error is not None))
            return
        if lanes and not all(lane.down for lane in lanes):
            return
        waited = time.monotonic() - self._last_progress
        attempts = min((lane.failures for lane in lanes if not lane.dead), default=0)
        if not self._retry.exhausted(attempts, waited):
            return
        errors = [lane.error for lane in lanes if lane.error is not None]
        if not errors:
            why = self._no_servers or "no address to connect to"
            self._fail_all(
                ClipServeError(grpc.StatusCode.UNAVAILABLE, f"cannot reach the server at {self.address}: {why}")
            )
            return
        error = errors[-1]
        if error.code not in RETRYABLE_CODES:
            self._fail_all(error)
        else:
            self._fail_all(unreachable(self.address, error, waited))

    def _fail_all(self, error: ClipServeError) -> None:
        for index, result in enumerate(self.results):
            if result is None:
                self._record(index, self.job.failure(index, error.code.name, error.details))
        self.final_error = error
        self._changed()

    def _warn_waiting(self, lane: Lane, error: ClipServeError) -> None:
        if not self._warned and error.code == grpc.StatusCode.UNAVAILABLE and self._left == len(self.results):
            self._warned = True
            remaining = self.deadline.remaining()
            limit = min(self._retry.max_wait, remaining if remaining is not None else self._retry.max_wait)
            log.warning(
                "clipserve: waiting up to %.0fs for the server at %s: %s", limit, lane.replica.target, error.details
            )


def unreachable(address: str, error: ClipServeError, waited: float) -> ClipServeError:
    """The error a call ends with when its servers stayed unreachable (or overloaded)."""
    what = "cannot reach" if error.code == grpc.StatusCode.UNAVAILABLE else "gave up on"
    return ClipServeError(error.code, f"{what} the server at {address} (retried for {waited:.0f}s): {error.details}")


def _progress_bar(total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="item", desc="clipserve", dynamic_ncols=True)
