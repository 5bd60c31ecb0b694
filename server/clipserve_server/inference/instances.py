"""Model instances: the forward workers that one model's batcher feeds.

An instance is one thread that runs the model's ``forward`` on one device. With ``--instances
N`` and a device list, a model has N instances per device; the batcher hands each batch, whole,
to whichever instance is free, so forward passes overlap: while one instance's thread does its
Python and launches kernels, another's forward keeps the device busy (Triton's ``instance_group
{ count: N }``). Instances on one device share its model object (its weights are loaded once
per device): torch inference is thread-safe, and each call gets its own inputs.

What is per model stays one: the queue, the batching, the caches and the decode pool, so an
input is encoded once whatever the instances.

An instance that cannot go on (its thread never started, its forward raised something that is
not an ordinary error, or the accelerator reported a fault that leaves its context unusable)
is *dead*: the batcher then fails what waits and health turns NOT_SERVING, as for a dead
batching loop. An ordinary exception from ``forward`` fails only its batch.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

ForwardFn = Callable[[Any, list[Any]], tuple[np.ndarray, np.ndarray]]  # texts, or what prepare made of them


@dataclass(frozen=True)
class InstanceStats:
    """What one instance has done: metrics and GetModelInfo report it."""

    device: str
    index: int  # 0..N-1 on its device
    forwards: int
    items: int
    busy_s: float  # seconds spent in forward
    alive: bool


def is_fatal(exc: BaseException) -> bool:
    """Whether ``exc`` from a forward means its instance cannot go on (see the module doc)."""
    if not isinstance(exc, Exception) or isinstance(exc, BrokenExecutor):
        return True
    torch = sys.modules.get("torch")
    # A CUDA fault (an illegal address, a device-side assert) poisons the context: every later
    # forward on that device fails too, so failing its batches one by one would only hide it.
    accelerator_error = getattr(torch, "AcceleratorError", None) if torch is not None else None
    return accelerator_error is not None and isinstance(exc, accelerator_error)


class Instance:
    """One forward worker: a thread of its own (named ``clipserve-model``) on one device."""

    def __init__(
        self,
        device: str,
        index: int,
        forward: ForwardFn,
        thread_setup: Callable[[], None] | None = None,
        prepare: Callable[[list[str]], Any] | None = None,
    ) -> None:
        """``thread_setup`` runs first on the thread (see threads.model_thread_setup);
        ``prepare``: the model's ``prepare_texts``, run on a thread of its own (none: the
        forward takes the texts as they are)."""
        self.device = device
        self.index = index
        self._forward = forward
        self._prepare = prepare
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="clipserve-model", initializer=thread_setup
        )
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipserve-tokenize")
        self.busy = False
        self.alive = True
        self._forwards = 0
        self._items = 0
        self._busy_s = 0.0

    async def prepare(self, texts: list[str]) -> Any:
        """``texts`` as the forward takes them (tokenized), made on this instance's tokenizer
        thread: a batch of long queries holds neither the forward's thread nor its timeout."""
        if self._prepare is None or not texts:
            return texts
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer, self._prepare, texts)

    def forward(self, texts: Any, images: list[Any]) -> asyncio.Future:
        """Run one batch (its texts as ``prepare`` made them) on this instance's thread."""
        return asyncio.get_running_loop().run_in_executor(self._executor, self._forward, texts, images)

    def record(self, items: int, seconds: float) -> None:
        self._forwards += 1
        self._items += items
        self._busy_s += seconds

    def stats(self) -> InstanceStats:
        return InstanceStats(self.device, self.index, self._forwards, self._items, self._busy_s, self.alive)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._tokenizer.shutdown(wait=False, cancel_futures=True)


class InstancePool:
    """The instances of one model, and which of them are free."""

    def __init__(self, instances: Sequence[Instance]) -> None:
        if not instances:
            raise ValueError("a model needs at least one instance")
        self.instances = list(instances)
        self._freed = asyncio.Event()

    async def acquire(self) -> Instance:
        """Wait for a free instance and take it: on the device with the fewest busy instances,
        so that two devices share the work before either runs two forwards at once."""
        while True:
            idle = [instance for instance in self.instances if not instance.busy and instance.alive]
            if idle:
                busy = {instance.device: 0 for instance in self.instances}
                for instance in self.instances:
                    busy[instance.device] += instance.busy
                chosen = min(idle, key=lambda instance: busy[instance.device])
                chosen.busy = True
                return chosen
            self._freed.clear()
            await self._freed.wait()

    def release(self, instance: Instance, items: int = 0, seconds: float = 0.0) -> None:
        """``instance`` is free again, having encoded ``items`` in ``seconds`` (none: it did
        not get to, or its forward failed)."""
        if items:
            instance.record(items, seconds)
        instance.busy = False
        self._freed.set()

    def stats(self) -> list[InstanceStats]:
        return [instance.stats() for instance in self.instances]

    @property
    def devices(self) -> list[str]:
        """The devices, in the order of the device list."""
        return list(dict.fromkeys(instance.device for instance in self.instances))

    def close(self) -> None:
        for instance in self.instances:
            instance.close()
