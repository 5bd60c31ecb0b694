"""Refusing, before loading anything, a set of models whose weights plainly cannot fit.

The weights' size is read from what is on disk (a local folder, a weights file, or the Hugging
Face cache): the parameter count from safetensors headers, or the size of other weight files, at
the dtype they will be served in. A model whose files are not on disk yet (a hub id to download)
counts as unknown, not as zero: it does not make the check refuse, and the refusal says so.

Only the files the model loads from count: a repo that ships its weights for both transformers
and open_clip (``pytorch_model.bin`` and ``open_clip_pytorch_model.bin``) holds them twice.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from pathlib import Path

from ..utils.config import ModelSpec, ServerConfig
from .devices import resolve_devices
from .loading import FAKE_PREFIX, OPEN_CLIP_PREFIX

GIB = 1 << 30
_SAFETENSORS_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ModelsTooLarge(RuntimeError):
    """The models' weights need more memory than the device has (or the budget allows)."""


def _folder(source: str) -> Path | None:
    """The folder holding a source's files: a local folder, or its snapshot in the HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.count("/") != 1:
        return None
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return None
    snapshots = Path(HF_HUB_CACHE) / ("models--" + source.replace("/", "--")) / "snapshots"
    found = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return found[-1] if found else None


def _safetensors_parameters(path: Path) -> tuple[int, int]:
    """(parameters, bytes as stored) from a safetensors file's header alone."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    parameters = stored = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for size in tensor["shape"]:
            count *= size
        parameters += count
        stored += count * _SAFETENSORS_BYTES.get(tensor["dtype"], 4)
    return parameters, stored


def _loaded_files(folder: Path) -> list[Path]:
    """The weight files in ``folder`` that its model loads from: open_clip's own
    (``open_clip_*``) only when there is no transformers ``config.json`` (see loading)."""
    files = [p for p in folder.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]
    open_clip = [p for p in files if p.name.startswith("open_clip_")]
    if open_clip and not (folder / "config.json").is_file():
        return open_clip
    return [p for p in files if p not in open_clip]


def weight_bytes(source: str, dtype: str) -> int | None:
    """Bytes the weights of ``source`` (a folder, hub id or weights file) take served as
    ``dtype``; None when unknown."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in _WEIGHT_SUFFIXES:
        files = [path]
    else:
        folder = _folder(source)
        files = _loaded_files(folder) if folder is not None else []
    if not files:
        return None
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    per_parameter = _DTYPE_BYTES.get(dtype)
    if safetensors:
        counted = [_safetensors_parameters(p) for p in safetensors]
        if per_parameter is None:  # "auto": as stored
            return sum(stored for _, stored in counted)
        return sum(parameters for parameters, _ in counted) * per_parameter
    # Pickled weights: assume float32 on disk (the usual case), and that one file holds them.
    largest = max(p.stat().st_size for p in files)
    return largest if per_parameter is None else largest * per_parameter // 4


def device_bytes(device: str) -> int:
    """Memory of ``device``: the GPU's, or this machine's RAM for the CPU."""
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or torch.cuda.current_device())
        return int(torch.cuda.get_device_properties(index).total_memory)
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(specs: tuple[ModelSpec, ...], config: ServerConfig) -> None:
    """Raise ModelsTooLarge when the known weights of ``specs`` exceed the budget of a device:
    each entry of the list holds every model's weights once, so a device listed twice
    (``cpu,cpu``, ``cuda:0,cuda:0``) holds them twice."""
    for device, copies in Counter(d.torch for d in resolve_devices(config.device)).items():
        _check_device(specs, config, device, copies)


def _check_device(specs: tuple[ModelSpec, ...], config: ServerConfig, device: str, copies: int = 1) -> None:
    dtype = config.dtype if config.dtype != "auto" else ("float16" if device.startswith("cuda") else "float32")
    sizes: list[tuple[str, int | None]] = []
    for spec in specs:
        # open_clip:ARCH names an architecture, whose weights are --pretrained; fake has none.
        own = "" if spec.source.startswith((OPEN_CLIP_PREFIX, FAKE_PREFIX)) else spec.source
        for source in filter(None, (own, spec.text_model, spec.pretrained)):
            sizes.append((f"{spec.name} ({source})", weight_bytes(source, dtype)))
    needed = copies * sum(size for _, size in sizes if size is not None)
    budget = int(config.memory_budget_gb * GIB) if config.memory_budget_gb else device_bytes(device)
    if needed <= budget:
        return
    known = ", ".join(f"{name}: {size / GIB:.2f} GiB" for name, size in sizes if size is not None)
    unknown = [name for name, size in sizes if size is None]
    where = (
        f"the --memory-budget-gb of {config.memory_budget_gb:g} GiB per device"
        if config.memory_budget_gb
        else f"the {budget / GIB:.1f} GiB of {device}"
    )
    raise ModelsTooLarge(
        f"the models' weights need {needed / GIB:.2f} GiB as {dtype} on {device}"
        + (f" ({copies} copies: the device is listed {copies} times)" if copies > 1 else "")
        + f" ({known}"
        + (f"; not counted, not on disk yet: {', '.join(unknown)}" if unknown else "")
        + f"), more than {where}. Serve fewer or smaller models, a smaller --dtype, or raise --memory-budget-gb"
    )
