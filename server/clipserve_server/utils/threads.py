"""The threads' settings: OS names the profilers see, and torch's intra-op threads per thread.

Decode threads and decode worker processes run torch on one intra-op thread each; a model
thread keeps the count the process started with, or its share of it when several model
instances run on the CPU.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def _set_torch_threads(torch: Any, threads: int) -> None:
    """This thread's intra-op threads, for good. Torch sets a thread's count lazily, at its first
    op, from the count the process set last, unless that first look already happened: so look
    first (``get_num_threads``), then set. Otherwise whichever thread set a count between this
    call and this thread's first op would decide it (seen: the model thread's tokenizer running
    while decode threads started, then every forward pass on one core, in some runs only)."""
    torch.get_num_threads()
    torch.set_num_threads(threads)


def name_os_thread(name: str) -> None:
    """Give this thread ``name`` (15 bytes at most) in the OS, as Python before 3.14 does not:
    `top -H`, py-spy and the feed benchmark's CPU split then tell the model thread and the decode
    threads apart. Linux only; elsewhere a no-op."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def decode_thread_setup() -> None:
    name_os_thread("clipserve-decod")
    single_threaded_torch()


def single_threaded_torch() -> None:
    """Torch's per-image ops in a decode worker run on one intra-op thread: N workers times the
    default one thread per core would oversubscribe the cores. Each thread keeps its own count
    (OpenMP), but torch starts every thread created afterwards with the last one set: the model
    thread sets its own back (``model_thread_setup``)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        _set_torch_threads(torch, 1)


def model_threads(share: int = 1) -> int:
    """The intra-op threads one of ``share`` model threads on the CPU gets: this process's torch
    threads now, divided so that together they use the cores once (0 without torch)."""
    torch = sys.modules.get("torch")
    return max(1, torch.get_num_threads() // max(1, share)) if torch is not None else 0


def model_thread_setup(share: int = 1) -> Callable[[], None]:
    """An initializer for a model thread that gives it the intra-op threads this process has
    now (call it before any decode thread starts), divided by ``share``: the number of model
    threads that run on the CPU at once (``--instances`` on CPU devices), so that together they
    use the cores once, not ``share`` times over. Without it, a model thread started after a
    decode thread would run every forward pass on one core (measured: half the images/s of a
    compiled ViT-B/32 on two cores)."""
    torch = sys.modules.get("torch")
    threads = model_threads(share)

    def setup() -> None:
        name_os_thread("clipserve-model")
        if torch is not None and threads:
            _set_torch_threads(torch, threads)

    return setup
