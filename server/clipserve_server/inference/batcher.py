"""Dynamic batching: one queue shared by every call, fed to the model's instances.

Each submitted text or image gets a future created on the event loop. The batching loop
waits for a free model instance (instances.py: one thread per instance, one instance unless
``--instances``/several devices), then for the first item, then up to ``max_delay`` (counted from
that item's arrival) for more, hands at most ``max_batch_size`` items, whole, to that instance,
and goes on to the next free one: forwards on different instances overlap. Each batch's futures
are resolved when its forward returns, with an error if it failed. If the loop itself ever dies,
an instance dies, or a forward pass outlives ``forward_timeout_s`` (a wedged GPU), every waiting
future fails and ``on_dead`` is told, so that health turns NOT_SERVING instead of requests
hanging. A wedged forward that does finish after all gives its instance back: the batcher then
serves again and ``on_alive`` is told (a slow pass is not a dead device); one that never
finishes leaves the server NOT_SERVING, for the orchestrator to restart.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..utils.errors import ErrorKind, ItemError
from .instances import Instance, InstancePool, is_fatal

log = logging.getLogger(__name__)


class WedgedError(RuntimeError):
    """A model instance stopped answering (its forward ran past ``--forward-timeout-s``)."""


class InstanceDied(RuntimeError):
    """A model instance cannot run forwards any more (instances.is_fatal)."""


@dataclass
class _Job:
    is_text: bool
    payload: Any
    future: asyncio.Future = field(repr=False)
    enqueued_at: float


class Batcher:
    def __init__(
        self,
        instances: InstancePool,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_size: int,
        forward_timeout_s: float,
        on_dead: Callable[[BaseException], None],
        on_batch: Callable[[int, float], None],
        on_alive: Callable[[], None],
    ) -> None:
        """``instances``: the model's forward workers; ``forward_timeout_s``: how long a forward
        may run before its instance counts as wedged (0: forever); ``on_dead``: told when the
        batcher can take no more work; ``on_batch``: (items, seconds) after each successful
        forward; ``on_alive``: told when it serves again after a wedged forward finished."""
        self._instances = instances
        self._forward_timeout_s = forward_timeout_s or None
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._max_queue_size = max_queue_size
        self._on_dead = on_dead
        self._on_batch = on_batch
        self._on_alive = on_alive  # serving again after a wedged forward finished
        self._wedged: set[Instance] = set()  # instances whose forward outlived the timeout and may yet finish
        self._recoverable = True  # every death so far was a wedge
        self._stopping = False
        self._queue: collections.deque[_Job] = collections.deque()
        self._work = asyncio.Event()
        self._space = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._in_flight: set[asyncio.Task] = set()  # one per batch an instance is running
        self._dead = False
        self._failure: ItemError | None = None  # set once the batcher can take no more work

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="clipserve-batcher")
        self._task.add_done_callback(self._loop_finished)

    async def stop(self) -> None:
        """Fail whatever is still queued and stop the loop (in-flight forwards finish first)."""
        self._stopping = True
        if self._failure is None:
            self._failure = ItemError(ErrorKind.UNAVAILABLE, "the server is shutting down")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass  # a crash was already reported by _loop_finished
        for task in list(self._in_flight):
            task.cancel()
        await asyncio.gather(*self._in_flight, return_exceptions=True)
        self._fail_queued(self._failure)
        self._instances.close()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done() and not self._dead

    @property
    def instances(self) -> InstancePool:
        return self._instances

    @property
    def queue_depth(self) -> int:
        return sum(1 for job in self._queue if not job.future.done())

    # -- submitting ------------------------------------------------------------------------
    async def encode_text(self, text: str, *, wait: bool) -> np.ndarray:
        return await self._submit(True, text, wait)

    async def encode_image(self, pixels: Any, *, wait: bool) -> np.ndarray:
        return await self._submit(False, pixels, wait)

    async def _submit(self, is_text: bool, payload: Any, wait: bool) -> np.ndarray:
        """Queue one item and wait for its embedding.

        When the queue is full, ``wait=False`` fails at once with OVERLOADED (unary calls);
        ``wait=True`` waits for room (streams: the caller stops reading, so gRPC flow control
        pushes back on the client instead of memory growing here).
        """
        while True:
            if self._failure is not None:
                raise self._failure
            if len(self._queue) < self._max_queue_size or self._prune() < self._max_queue_size:
                break
            if not wait:
                raise ItemError(
                    ErrorKind.OVERLOADED, f"the server's queue is full ({self._max_queue_size} items); retry later"
                )
            self._space.clear()
            await self._space.wait()
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(is_text, payload, future, time.monotonic()))
        if len(self._queue) == 1 or len(self._queue) >= self._max_batch_size:
            # The loop waits for a first item, then for a full batch or the deadline: waking
            # it for every item in between cost a wake-up and a scan of the queue per image.
            self._work.set()
        # A caller that is cancelled cancels `future`; the loop then skips the job, so
        # abandoned items never reach the model.
        return await future

    def _prune(self) -> int:
        """Drop abandoned jobs; return the queue length."""
        if any(job.future.done() for job in self._queue):
            self._queue = collections.deque(job for job in self._queue if not job.future.done())
        return len(self._queue)

    # -- the loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            # A batch is formed once an instance is free to take it: while every instance is
            # busy, items pile up into full batches instead of leaving one by one.
            instance = await self._instances.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                self._instances.release(instance)
                raise
            task = asyncio.get_running_loop().create_task(self._forward(instance, batch), name="clipserve-forward")
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _forward(self, instance: Instance, batch: list[_Job]) -> None:
        """Run ``batch`` on ``instance`` and answer each of its items."""
        texts = [job.payload for job in batch if job.is_text]
        images = [job.payload for job in batch if not job.is_text]
        try:  # tokenized off the forward's thread, and before its --forward-timeout-s starts
            prepared = await instance.prepare(texts)
        except asyncio.CancelledError:
            self._fail_jobs(batch, ItemError(ErrorKind.UNAVAILABLE, "the server is shutting down"))
            raise
        except Exception as exc:
            log.error("tokenizing failed for a batch of %d texts", len(texts), exc_info=exc)
            self._fail_jobs(
                batch, ItemError(ErrorKind.INTERNAL, f"the model failed on this batch: {type(exc).__name__}: {exc}")
            )
            self._instances.release(instance)
            return
        started = time.monotonic()
        forward = instance.forward(prepared, images)
        try:
            text_embeddings, image_embeddings = await asyncio.wait_for(asyncio.shield(forward), self._forward_timeout_s)
        except asyncio.TimeoutError:
            # A thread cannot be killed: fail this batch, then die so that health turns
            # NOT_SERVING and the orchestrator restarts us, instead of hanging every caller.
            self._fail_jobs(
                batch,
                ItemError(
                    ErrorKind.INTERNAL, f"the model did not finish this batch within {self._forward_timeout_s:g}s"
                ),
            )
            self._wedged.add(instance)
            forward.add_done_callback(lambda _: self._unwedged(instance))
            self._died(
                instance,
                WedgedError(
                    f"a forward pass has been running for over {self._forward_timeout_s:g}s "
                    "(--forward-timeout-s): health is NOT_SERVING "
                    "until it finishes, and turns SERVING again by itself if it does; "
                    "if it never does, restart the server"
                ),
                recoverable=True,
            )
            return
        except asyncio.CancelledError:
            self._fail_jobs(batch, ItemError(ErrorKind.UNAVAILABLE, "the server is shutting down"))
            raise
        except BaseException as exc:
            if is_fatal(exc):
                self._fail_jobs(
                    batch,
                    ItemError(
                        ErrorKind.INTERNAL, f"the model instance failed on this batch: {type(exc).__name__}: {exc}"
                    ),
                )
                self._died(
                    instance,
                    InstanceDied(
                        f"model instance {instance.index} on {instance.device or 'its device'} died: "
                        f"{type(exc).__name__}: {exc}"
                    ),
                )
                return
            # The model failed on this batch: its items fail, the instance goes on.
            log.error(
                "forward pass failed for a batch of %d texts and %d images", len(texts), len(images), exc_info=exc
            )
            self._fail_jobs(
                batch, ItemError(ErrorKind.INTERNAL, f"the model failed on this batch: {type(exc).__name__}: {exc}")
            )
            self._instances.release(instance)
            return
        seconds = time.monotonic() - started
        self._instances.release(instance, len(batch), seconds)
        self._on_batch(len(batch), seconds)
        text_rows = iter(text_embeddings)
        image_rows = iter(image_embeddings)
        for job in batch:
            row = next(text_rows) if job.is_text else next(image_rows)
            if not job.future.done():
                job.future.set_result(row)

    async def _next_batch(self) -> list[_Job]:
        while True:
            while self._prune() == 0:
                self._work.clear()
                await self._work.wait()
            # The delay runs from the oldest item's arrival: a batch that filled up while the
            # model was busy goes at once.
            deadline = self._queue[0].enqueued_at + self._max_delay_s
            while len(self._queue) < self._max_batch_size or self._prune() < self._max_batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._work.clear()  # set again by the item that fills the batch
                try:
                    await asyncio.wait_for(self._work.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch: list[_Job] = []
            while self._queue and len(batch) < self._max_batch_size:
                job = self._queue.popleft()
                if not job.future.done():
                    batch.append(job)
            self._space.set()
            if batch:
                return batch

    # -- failure handling ------------------------------------------------------------------
    @staticmethod
    def _fail_jobs(jobs: list[_Job], error: ItemError) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(error)

    def _fail_queued(self, error: ItemError) -> None:
        jobs = list(self._queue)
        self._queue.clear()
        self._fail_jobs(jobs, error)
        self._space.set()

    def _loop_finished(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        log.critical("the batching loop died; failing queued items", exc_info=exc)
        self._die(
            ItemError(ErrorKind.UNAVAILABLE, f"the server's batching loop died: {type(exc).__name__}: {exc}"), exc
        )

    def _died(self, instance: Instance, exc: BaseException, *, recoverable: bool = False) -> None:
        """``instance`` cannot go on: stop taking work (the other instances finish theirs).
        ``recoverable``: it is wedged, and may come back (``_unwedged``)."""
        self._recoverable = self._recoverable and recoverable
        instance.alive = False
        log.critical("%s; failing queued items", exc)
        self._die(
            ItemError(ErrorKind.UNAVAILABLE, f"the server's model instance died: {type(exc).__name__}: {exc}"), exc
        )
        if self._task is not None:
            self._task.cancel()

    def _unwedged(self, instance: Instance) -> None:
        """A wedged instance's forward has finished after all: it takes work again, and once
        no instance is wedged (and nothing worse happened) the batcher serves again."""
        self._wedged.discard(instance)
        if self._stopping or not self._recoverable:
            return
        instance.alive = True
        self._instances.release(instance)
        if self._wedged or not self._dead:
            return
        log.warning("the wedged forward pass has finished: serving again")
        self._dead = False
        self._failure = None
        self.start()
        self._on_alive()

    def _die(self, failure: ItemError, exc: BaseException) -> None:
        if not isinstance(exc, (WedgedError, InstanceDied)):
            self._recoverable = False  # the loop itself died
        if self._dead:
            return
        self._dead = True
        self._failure = failure
        self._fail_queued(failure)
        self._on_dead(exc)
