"""Values that are ready now or later, without a task or an event-loop callback per item.

An item (a pair to score, an input to embed) usually needs one or two embeddings that are
either cached or being computed for other items too. A coroutine per item costs a task, its
scheduling and its suspend/resume; even an asyncio future per item costs a scheduled callback
(a ``Handle`` through the event loop) for each step from "the image is encoded" to "the answer
is queued". With thousands of items waiting on one image that was most of the event loop's
CPU per pair (docs/performance/how-it-is-fast.md, "The serial part"). So the engine answers
with a ``Soon``: the value itself, or a ``Later`` of it, whose callbacks run synchronously, in
one go, when it settles.

A ``Later`` lives on the event loop's thread. Its consumer may ``cancel()`` it (nobody wants the
value any more): its callbacks are dropped and whatever it waits on is withdrawn from (the cache
then drops work that nobody else wants). A derived value that fails because one of its inputs
failed withdraws from the inputs it still waits on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar, Union

from ..utils.errors import ErrorKind, ItemError

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")
V = TypeVar("V")


class Later(Generic[T]):
    """A value still to come (or an error). Event-loop thread only."""

    __slots__ = ("_callbacks", "_value", "_error", "_settled", "_cancelled", "_on_cancel")

    def __init__(self, on_cancel: Callable[[], None] | None = None) -> None:
        """``on_cancel``: what withdrawing from this value means upstream."""
        self._callbacks: list[Callable[[Later[T]], None]] = []
        self._value: Any = None
        self._error: BaseException | None = None
        self._settled = False
        self._cancelled = False
        self._on_cancel = on_cancel

    @property
    def settled(self) -> bool:
        """It has a value or an error, or was cancelled."""
        return self._settled

    def result(self) -> T:
        """The value; raises the error (only once settled)."""
        assert self._settled, "not settled yet"
        if self._error is not None:
            raise self._error
        return self._value

    def add_callback(self, callback: Callable[[Later[T]], None]) -> None:
        """``callback(self)`` once it settles (now, if it has); never after ``cancel()``."""
        if not self._settled:
            self._callbacks.append(callback)
        elif not self._cancelled:
            callback(self)

    def set_result(self, value: T) -> None:
        self._settle(value, None)

    def set_error(self, error: BaseException) -> None:
        self._settle(None, error)

    def cancel(self) -> None:
        """Nobody wants the value any more: drop the callbacks and withdraw upstream."""
        if self._settled:
            return
        self._settled = self._cancelled = True
        self._callbacks = []
        self._error = ItemError(ErrorKind.UNAVAILABLE, "cancelled")
        if self._on_cancel is not None:
            self._on_cancel()

    def _settle(self, value: Any, error: BaseException | None) -> None:
        if self._settled:
            return
        self._settled, self._value, self._error = True, value, error
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # one waiter's bug must not keep the value from the others
                log.exception("a callback of a settled value failed")


Soon = Union[T, Later[T]]


def then(value: Soon[T], fn: Callable[[T], U]) -> Soon[U]:
    """``fn(value)``, now if ``value`` is ready, else a ``Later`` of it."""
    if not isinstance(value, Later):
        return fn(value)
    return _derived([value], lambda: fn(value.result()))


def both(first: Soon[T], second: Soon[V], fn: Callable[[T, V], U]) -> Soon[U]:
    """``fn(first, second)``, now if both are ready, else a ``Later`` of it."""
    pending = [v for v in (first, second) if isinstance(v, Later)]
    if not pending:
        return fn(first, second)  # type: ignore[arg-type]
    return _derived(pending, lambda: fn(_ready(first), _ready(second)))


def _ready(value: Any) -> Any:
    return value.result() if isinstance(value, Later) else value


def _derived(sources: list[Later], compute: Callable[[], Any]) -> Later:
    def withdraw() -> None:
        for source in sources:
            source.cancel()  # no-op for those already settled

    out: Later = Later(on_cancel=withdraw)
    left = len(sources)

    def landed(source: Later) -> None:
        nonlocal left
        if out.settled:
            return
        if source._error is not None:
            out.set_error(source._error)
            withdraw()  # of no use now
            return
        left -= 1
        if left == 0:
            try:
                value = compute()
            except Exception as exc:  # noqa: BLE001 - it becomes this item's error
                out.set_error(exc)
            else:
                out.set_result(value)

    for source in sources:
        source.add_callback(landed)
    return out


def outcome(future: asyncio.Future) -> tuple[Any, BaseException | None]:
    """A finished future's (value, error). Cancelled, it is UNAVAILABLE to its waiters (the SDK
    retries): the work was dropped by someone else (every other waiter left, or a shutdown),
    which must not leave them without an answer."""
    if future.cancelled():
        return None, ItemError(ErrorKind.UNAVAILABLE, "the work for this item was cancelled; retry")
    error = future.exception()
    return (None, error) if error is not None else (future.result(), None)


def from_future(future: asyncio.Future) -> Later:
    """A ``Later`` of an asyncio future (a task): cancelling it cancels the future."""
    later: Later = Later(on_cancel=future.cancel)

    def landed(done: asyncio.Future) -> None:
        value, error = outcome(done)
        if error is None:
            later.set_result(value)
        else:
            later.set_error(error)

    future.add_done_callback(landed)
    return later


async def awaited(value: Soon[T]) -> T:
    """Await a ``Soon`` from a coroutine; being cancelled cancels the ``Later``."""
    if not isinstance(value, Later):
        return value
    future = asyncio.get_running_loop().create_future()

    def landed(later: Later) -> None:
        if future.done():
            return
        if later._error is not None:
            future.set_exception(later._error)
        else:
            future.set_result(later._value)

    value.add_callback(landed)
    try:
        return await future
    except asyncio.CancelledError:
        value.cancel()
        raise
