"""OpenVINO on CPU: a tower traced once (``openvino.convert_model``), compiled for the CPU in
float32 and run from any thread.

Why: on the 2-core development CPU it ran a ViT-B/32 image tower 1.3-1.6x faster than torch eager
(one-off measurements on a busy machine; the issue's quieter run saw 2.3-2.9x) with features
within ~2e-6 relative (docs/runtimes.md), and it needs no C++ compiler at run time.

- The converted model keeps every input's dimensions dynamic (batch, sequence length), so one
  conversion serves every batch the batcher forms.
- Saved to the conversion cache uncompressed (``save_model`` would halve the weights to
  float16 otherwise). Not OpenVINO's own cache of compiled blobs (``CACHE_DIR``): measured on
  a ViT-B/32 image tower, compiling from the cached model took 0.5 s and importing the blob
  0.6-1.4 s, and the blobs doubled the cache's size on disk.
- The converted model holds its own copy of the weights (``share_weights=False``), so that
  torch's copy can go once both towers run here (``select.release_torch_weights``): shared,
  the compiled model would keep torch's tensors alive.
- Precision: a float32 tower runs at ``INFERENCE_PRECISION_HINT=f32`` (the CPU plugin would
  otherwise run in bf16 on CPUs that have it, which the 1e-4 parity check would then refuse); a
  bfloat16 tower (``--dtype bfloat16``) at ``bf16``: converted with its bfloat16 weights (half
  the cache entry), fed and read in float32 (numpy has no bfloat16; the model converts at its
  edges), and run on the CPU's bf16 dot products (AVX512_BF16, AMX) where it has them. On
  ViT-B/32 on the 2-core Zen 4 (AVX512_BF16, no AMX) that was ~2x OpenVINO's float32 image
  tower, with features within 1e-2 of torch's bfloat16 ones (docs/runtimes.md). A CPU without
  native bf16 runs the hint at float32 (``native_bf16``; select.py says so in the log).
- Threads: one stream per instance that calls the runner (``--instances``), each on as many
  threads as a torch model thread gets (each instance's share of the cores), so decode threads
  and the forwards share the cores as they do with torch. One instance: one stream
  (``PERFORMANCE_HINT=LATENCY``: each forward uses all its threads). Several: that many streams
  (``NUM_STREAMS``), so that their forwards run side by side; one stream of one instance's
  share would queue them one after another on that share, leaving the rest of the cores idle
  (measured: ``--instances 2`` at 0.55x the images/s of one instance on the 2-core Zen 4). Each
  calling thread has its own infer request (OpenVINO's requests are not thread-safe; the
  compiled model is).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .towers import Runner, Tower, traceable

NAME = "openvino"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def version() -> str:
    import openvino

    return openvino.get_version()


# The CPU plugin's inference precision for a tower's dtype (the ones it runs here).
PRECISIONS = {"float32": "f32", "bfloat16": "bf16"}


def precision(dtype: str) -> str:
    return PRECISIONS[dtype]


def native_bf16() -> bool:
    """Whether the CPU plugin runs bf16 natively here (AVX512_BF16 or AMX: its ``BF16``
    capability); elsewhere a bf16 precision hint runs at float32."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _without_telemetry() -> None:
    """OpenVINO's converter (ovc) sends usage events to Google Analytics unless the user opted out
    (it writes ~/intel/openvino_ga_cid on first use). A server must not phone home, and where the
    network is closed each event costs the conversion a wait (measured: 6 s of a tiny model's
    20). ovc falls back to its own no-op stub when openvino-telemetry is missing: route it there."""
    from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils

    convert_impl.tm = telemetry_utils.tm = telemetry_stub


def _convert(tower: Tower, progress: Callable[[str], None]) -> Any:
    import openvino
    import torch

    _without_telemetry()
    example = tuple(tower.probes[0].values())
    with torch.no_grad(), _quiet_tracing():
        # Traced here, without torch's check_trace (a second and third forward, about half the
        # time of a tiny model's conversion): the parity check runs more probes than it would.
        traced = torch.jit.trace(traceable(tower), example, check_trace=False, strict=False)
        progress("traced")
        return openvino.convert_model(traced, example_input=example, share_weights=False)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Tracing's own noise kept off the user's terminal: a TracerWarning for every Python branch
    on a tensor (each one checked here by the probes of several shapes instead), torch.jit.trace's
    deprecation, transformers' warnings on the attributes tracing touches. Conversion runs at
    load, on the main thread, before anything else could want a warning."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _load_or_convert(tower: Tower, cached: Path | None, progress: Callable[[str], None]) -> tuple[Any, bool]:
    """The converted model and whether it came from the cache."""
    import openvino

    core = openvino.Core()
    if cached is not None and cached.with_suffix(".xml").is_file():
        return core.read_model(str(cached.with_suffix(".xml"))), True
    model = _convert(tower, progress)
    progress("converted")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Written under a temporary name, then renamed: a server killed mid-write, or two
        # starting at once, never leave a half-written entry under the real name.
        scratch = cached.with_name(f"{cached.name}.{os.getpid()}.{threading.get_ident()}.tmp.xml")
        openvino.save_model(model, str(scratch), compress_to_fp16=False)
        os.replace(scratch.with_suffix(".bin"), cached.with_suffix(".bin"))
        os.replace(scratch, cached.with_suffix(".xml"))
        # Compiled from the saved entry, as a restart does: its weights are read from the file
        # (mapped, not copied), and the converted model's in-memory copy goes (measured on
        # ViT-B/32, in-process: 2.45 GB of RSS compiled from memory, 2.24 compiled from the file).
        del model
        return core.read_model(str(cached.with_suffix(".xml"))), False
    return model, False


def build(
    tower: Tower,
    cached: Path | None,
    threads: int,
    streams: int = 1,
    progress: Callable[[str], None] = lambda stage: None,
) -> tuple[Runner, bool]:
    """A runner for ``tower`` on OpenVINO's CPU plugin, and whether the conversion was cached:
    ``streams`` forwards at once (the instances calling it), each on ``threads`` threads (0: the
    plugin's choice); ``progress`` is told each stage done (traced, converted, compiled)."""
    import numpy as np
    import openvino
    import torch

    if tower.device != "cpu" or tower.dtype not in PRECISIONS:
        raise ValueError(
            f"OpenVINO runs float32 and bfloat16 towers on the CPU here, this one is {tower.dtype} on {tower.device}"
        )
    model, from_cache = _load_or_convert(tower, cached, progress)
    model = _float32_edges(model)
    core = openvino.Core()
    compiled = core.compile_model(model, "CPU", compile_config(tower.dtype, threads, streams))
    progress("compiled")
    requests = threading.local()
    names = tower.input_names

    def run(**inputs: Any) -> Any:
        request = getattr(requests, "request", None)
        if request is None:
            request = requests.request = compiled.create_infer_request()
        arrays = [np.ascontiguousarray(_numpy_able(inputs[name].detach()).numpy()) for name in names]
        output = request.infer(arrays)[0]
        # The request's output buffer is reused by its next call: copy it out.
        return torch.from_numpy(np.array(output, dtype=np.float32, copy=True))

    return run, from_cache


def compile_config(dtype: str, threads: int, streams: int) -> dict[str, Any]:
    """The CPU plugin's settings for ``streams`` concurrent forwards of ``threads`` threads each."""
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision(dtype)}
    if streams > 1:
        config.update(PERFORMANCE_HINT="THROUGHPUT", NUM_STREAMS=streams)
    else:
        config["PERFORMANCE_HINT"] = "LATENCY"
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads * max(1, streams)
    return config


def _numpy_able(tensor: Any) -> Any:
    """A bfloat16 tensor as float32 (exact: every bfloat16 is a float32); others as they are."""
    import torch

    return tensor.float() if tensor.dtype == torch.bfloat16 else tensor


def _float32_edges(model: Any) -> Any:
    """A bfloat16 model's bfloat16 inputs and outputs taken and given as float32 (converted
    inside the model); a float32 model unchanged."""
    import openvino

    bf16 = openvino.Type.bf16
    inputs = [i for i, port in enumerate(model.inputs) if port.get_element_type() == bf16]
    outputs = [i for i, port in enumerate(model.outputs) if port.get_element_type() == bf16]
    if not inputs and not outputs:
        return model
    steps = openvino.preprocess.PrePostProcessor(model)
    for i in inputs:
        steps.input(i).tensor().set_element_type(openvino.Type.f32)
    for i in outputs:
        steps.output(i).tensor().set_element_type(openvino.Type.f32)
    return steps.build()


def drop_source_pages(cached: Path) -> None:
    """Let go of the pages of a cache entry's weights file that compiling read in.

    The compiled model keeps its source model, whose weights are this file mapped into memory
    (``ENABLE_MMAP``), but runs mostly on its own repacked copy: once compiled and checked, few
    of the mapped pages are read again (measured on ViT-B/32: the server's RSS after a
    1000-pair pass 1.8 GB instead of 2.4; features bit-identical). They are clean file pages,
    so dropping them (``MADV_DONTNEED``) only means the kernel reads them from the file again
    when a forward touches them (the small constants used in place). Linux only; elsewhere (or
    if the file is not mapped) a no-op.
    """
    import ctypes
    import ctypes.util

    weights = os.path.realpath(cached.with_suffix(".bin"))  # as /proc/self/maps names it
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
        with open("/proc/self/maps") as maps:
            regions = [line.split()[0] for line in maps if line.rstrip().endswith(" " + weights)]
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for region in regions:
        start, end = (int(bound, 16) for bound in region.split("-"))
        madvise(start, end - start, _MADV_DONTNEED)


_MADV_DONTNEED = 4  # <sys/mman.h> on Linux

