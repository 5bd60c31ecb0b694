"""Which runtime runs a loaded model's towers, and handing them over (``apply_runtime``).

``auto``: OpenVINO for float32 and bfloat16 towers on the CPU when it is installed, torch
otherwise (float16 on the CPU, and CUDA: the CUDA runtimes are opt-in until measured faster
there). ``--compile`` is torch.compile of torch's image tower, so with it auto means torch. Each tower converts on its
own and is checked on its own: one that fails to convert, or whose features differ from torch's
by more than the parity tolerance, runs in torch, and one log line says which and why. A
runtime asked for by name that cannot run on this machine at all (not installed, no CUDA)
refuses to start instead; one that does not suit a model's device or dtype (OpenVINO for a
CUDA or float16 model) leaves its towers in torch, with the same one log line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ...utils.config import ServerConfig
from ...utils.threads import model_threads
from ..devices import resolve_devices
from . import openvino, torch_cuda
from .cache import cache_folder, entry_key, refused_before, remember_refusal, weights_fingerprint
from .parity import TOLERANCES, relative_error
from .towers import IMAGE, TEXT, Tower

if TYPE_CHECKING:
    from ..model import EmbeddingModel

log = logging.getLogger(__name__)

TORCH = "torch"
# A tower left in torch because the runtime's features are too far from torch's.
_INEXACT = "%s tower of %s runs in torch: in %s its features differ from torch's by %.2g relative, more than %g"
_INEXACT_BEFORE = _INEXACT + " (checked at an earlier start: %s; delete it to check again)"


def choose(runtime: str, device: str, dtype: str, compile: bool) -> str:
    """The runtime the towers of a model on ``device`` in ``dtype`` are to run in."""
    if runtime == "auto":
        if compile or device != "cpu" or dtype not in openvino.PRECISIONS or not openvino.available():
            return TORCH
        return openvino.NAME
    if runtime == openvino.NAME and not openvino.available():
        raise RuntimeError(
            "--runtime openvino needs the openvino package, which is not installed: pip install 'clipserve[server]'"
        )
    if runtime in (torch_cuda.CUDA_GRAPHS, torch_cuda.TENSORRT) and not torch_cuda.available(runtime):
        what = "CUDA" if runtime == torch_cuda.CUDA_GRAPHS else "CUDA and torch-tensorrt"
        raise RuntimeError(f"--runtime {runtime} needs {what}, which this machine does not have")
    return runtime


def apply_runtime(model: EmbeddingModel, config: ServerConfig) -> None:
    """Convert ``model``'s towers to the configured runtime, check them, and hand them over."""
    towers = model.towers()
    described = model.description
    runtime = choose(config.runtime, described.device, described.dtype, config.compile)
    if runtime == TORCH or not towers:
        return
    if runtime == openvino.NAME and described.dtype == "bfloat16":
        _say_how_bf16_runs()
    folder = cache_folder(config.runtime_cache)
    fingerprints: dict[int, str] = {}  # towers of one model share its weights: hash them once
    chosen = {}
    owners = {
        name: described.text_model_id if name == TEXT and described.text_model_id else described.model_id
        for name in towers
    }
    for tower in towers.values():
        started = time.monotonic()
        owner = owners[tower.name]
        tolerance = TOLERANCES.get(tower.dtype, TOLERANCES["float32"])
        cached = None
        try:
            if runtime == openvino.NAME:
                if folder is not None:
                    if id(tower.module) not in fingerprints:
                        fingerprints[id(tower.module)] = weights_fingerprint(tower.module)
                    cached = folder / entry_key(
                        tower,
                        runtime,
                        openvino.version(),
                        fingerprints[id(tower.module)],
                        openvino.precision(tower.dtype),
                    )
                    refused = refused_before(cached, tolerance)
                    if refused is not None:
                        log.warning(
                            _INEXACT_BEFORE,
                            tower.name,
                            owner,
                            runtime,
                            refused[0],
                            tolerance,
                            refused[1],
                        )
                        continue
                # As many threads as torch's forward would use (see openvino.py): each instance
                # on a CPU device gets its share of the cores, as torch's do (app.py), and a
                # stream of its own on this model (the instances of its device).
                share = config.instances * sum(device.is_cpu for device in resolve_devices(config.device))
                with _progress(
                    f"{tower.name} tower of {owner} for {runtime} ({openvino.precision(tower.dtype)})"
                ) as progress:
                    runner, from_cache = openvino.build(
                        tower, cached, model_threads(share), streams=config.instances, progress=progress
                    )
                    progress("checking against torch")
                how = "from the cache" if from_cache else ("converted, cached" if cached is not None else "converted")
            else:
                runner, how = torch_cuda.build(tower, runtime), "compiled"
            error = relative_error(tower, runner)
        except Exception as exc:  # whatever a converter raises: the tower stays in torch
            log.warning(
                "%s tower of %s runs in torch: %s could not convert it (%s: %s)",
                tower.name,
                owner,
                runtime,
                type(exc).__name__,
                _first_line(exc),
            )
            continue
        if not error <= tolerance:
            if cached is not None:
                remember_refusal(cached, error, tolerance)
            log.warning(
                _INEXACT,
                tower.name, owner, runtime, error, tolerance,
            )
            continue
        model.use_tower(tower.name, runner)
        chosen[tower.name] = runtime
        if runtime == openvino.NAME and cached is not None:
            openvino.drop_source_pages(cached)
        log.info(
            "%s tower of %s runs in %s (%s, %.1f s; features within %.1g of torch's)",
            tower.name,
            owner,
            runtime,
            how,
            time.monotonic() - started,
            error,
        )
    if runtime == openvino.NAME:
        release_torch_weights(towers, chosen, owners)
        _return_freed_memory()
    model.description = dataclasses.replace(
        model.description,
        image_runtime=chosen.get(IMAGE, model.description.image_runtime),
        text_runtime=chosen.get(TEXT, model.description.text_runtime),
    )


@contextlib.contextmanager
def _progress(doing: str, first_s: float = 15.0, every_s: float = 60.0) -> Iterator[Callable[[str], None]]:
    """Log lines while ``doing`` takes long (a ViT-H tower takes minutes to convert on a few
    cores), nothing for the usual few seconds: one at each stage the converter reports once
    ``first_s`` have gone by, and one every ``every_s`` in between (when the converter lets go
    of the GIL: tracing and converting a large model can hold it for minutes)."""
    done = threading.Event()
    started = time.monotonic()

    def say(stage: str) -> None:
        if time.monotonic() - started >= first_s:
            log.info("%s: %s, %.0f s so far", doing, stage, time.monotonic() - started)

    def tell() -> None:
        wait = first_s
        while not done.wait(wait):
            say("still working")
            wait = every_s

    teller = threading.Thread(target=tell, name="clipserve-progress", daemon=True)
    teller.start()
    try:
        yield say
    finally:
        done.set()
        teller.join()


def _say_how_bf16_runs() -> None:
    """On a CPU without native bf16, one line: what --dtype bfloat16 runs as here, and its cost."""
    if not openvino.native_bf16():
        log.warning(
            "this CPU has no native bfloat16 (no AVX512_BF16 or AMX): OpenVINO runs the bfloat16 towers at float32 "
            "precision, float32's speed and compute (no gain over --dtype float32, which is exact; a tower left in "
            "torch emulates bfloat16, slower than float32)"
        )


def release_torch_weights(towers: dict[str, Tower], chosen: dict[str, str], owners: dict[str, str]) -> None:
    """Drop torch's copy of the weights of each module whose every tower now runs in OpenVINO.

    Nothing calls those eager forwards again, and the converted towers hold their own copy
    (openvino.py): kept, the weights would sit in memory twice (measured on ViT-B/32,
    in-process: 2.7 GB against torch's 1.4, 2.1 GB without them). A module with a tower left
    in torch keeps its weights. Moved to the meta device, so that a stray eager call fails
    instead of computing.
    """
    shared: dict[int, list[Tower]] = {}
    for tower in towers.values():
        shared.setdefault(id(tower.module), []).append(tower)
    for group in shared.values():
        if all(tower.name in chosen for tower in group):
            group[0].module.to("meta")
            names = [tower.name for tower in group]
            log.info(
                "torch's copy of the %s weights of %s released: OpenVINO runs them",
                " and ".join(names),
                owners[names[0]],
            )


def _return_freed_memory() -> None:
    """Hand the heap that tracing and converting freed back to the system (glibc keeps it for
    reuse otherwise: measured on ViT-B/32, 180 MB of RSS after a conversion). A no-op where
    the C library has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""
