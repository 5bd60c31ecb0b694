"""CUDA runtimes for the half-precision towers on a GPU: CUDA graphs, or TensorRT.

- ``cuda-graphs``: ``torch.compile(mode="reduce-overhead")``: inductor's kernels replayed as a
  CUDA graph per input shape, so a small batch no longer waits on Python launching ~200 kernels.
- ``tensorrt``: ``torch.compile(backend="tensorrt")`` from torch-tensorrt, when it is installed.

Neither is picked by ``--runtime auto`` yet: on CUDA, auto is torch until the GPU check
(benchmarks/gpu_check.py, ``runtime_step``) shows one faster with its parity held. Both
compile lazily, per input shape: the warm-up and the parity probes pay for the first ones.
CUDA graphs replay on the thread that captured them only; the runner is safe to call from
several threads because torch.compile keeps a graph tree per thread.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .towers import Runner, Tower

CUDA_GRAPHS, TENSORRT = "cuda-graphs", "tensorrt"


def available(runtime: str) -> bool:
    import torch

    if not torch.cuda.is_available():
        return False
    return runtime == CUDA_GRAPHS or importlib.util.find_spec("torch_tensorrt") is not None


def build(tower: Tower, runtime: str) -> Runner:
    import torch

    if not tower.device.startswith("cuda"):
        raise ValueError(f"{runtime} runs towers on CUDA, this one is on {tower.device}")
    if runtime == TENSORRT:
        import torch_tensorrt  # noqa: F401  (registers the "tensorrt" backend)

        compiled = torch.compile(tower.run, backend="tensorrt", dynamic=False)
    else:
        compiled = torch.compile(tower.run, mode="reduce-overhead", dynamic=False)

    def run(**inputs: Any) -> Any:
        # A graph's output lives in memory its next replay overwrites: clone it out.
        return compiled(**inputs).clone()

    return run
