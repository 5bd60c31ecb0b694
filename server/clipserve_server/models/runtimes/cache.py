"""The conversion cache: converted towers on disk, so that the next start of the same model
does not convert again.

An entry's name is a hash of everything the conversion depends on: the runtime, its version
and its inference precision, the libraries that trace the model (torch, transformers, open_clip,
sentence-transformers), the tower, its inputs (names, dtypes, ranks), and the weights
themselves, byte for byte (a changed model is a new entry, never a stale one). Entries are
never rewritten, only added (or, for a tower that failed its check against torch, replaced by a
note of that: ``remember_refusal``): deleting the folder (``--runtime-cache``, default
``~/.cache/clipserve/runtimes``) clears it, at any time the server is not starting.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from .towers import Tower

OFF = "off"
_TRACERS = ("torch", "transformers", "open_clip_torch", "sentence-transformers")


def cache_folder(setting: str) -> Path | None:
    """Where converted towers go: ``--runtime-cache``, or the user's cache folder; None: off."""
    if setting == OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "clipserve" / "runtimes"


def weights_fingerprint(module: Any) -> str:
    """A hash of every parameter and buffer of ``module``, names and bytes (~1 s per GB)."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def entry_key(tower: Tower, runtime: str, runtime_version: str, weights: str, precision: str) -> str:
    """The entry's name; ``precision``: the runtime's inference precision (f32, bf16), which
    may differ from the weights' dtype."""
    inputs = [(name, str(value.dtype), value.dim()) for name, value in tower.probes[0].items()]
    parts = {
        "runtime": runtime,
        "runtime_version": runtime_version,
        "tracers": {name: _version(name) for name in _TRACERS},
        "tower": tower.name,
        "family": f"{type(tower.module).__module__}.{type(tower.module).__qualname__}",
        "dtype": tower.dtype,
        "inputs": inputs,
        "weights": weights,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _refusal_note(entry: Path) -> Path:
    return entry.with_name(f"{entry.name}.refused.json")


def refused_before(entry: Path, tolerance: float) -> tuple[float, Path] | None:
    """(its error, the note) if this entry's tower failed its check at an earlier start at the
    same tolerance: the check is deterministic for the entry (the same weights, runtime and
    tracers), and on a ViT-H tower it costs a conversion and minutes of CPU to fail again."""
    note = _refusal_note(entry)
    try:
        seen = json.loads(note.read_text())
        return (float(seen["error"]), note) if float(seen["tolerance"]) == tolerance else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember_refusal(entry: Path, error: float, tolerance: float) -> None:
    """Note that this entry's tower differs from torch's by ``error``, more than ``tolerance``,
    and drop its converted files (never used: gigabytes for a large tower). Best effort."""
    note = _refusal_note(entry)
    try:
        scratch = note.with_name(f"{note.name}.{os.getpid()}.tmp")
        scratch.write_text(json.dumps({"error": error, "tolerance": tolerance}))
        os.replace(scratch, note)
        for suffix in (".xml", ".bin"):
            entry.with_suffix(suffix).unlink(missing_ok=True)
    except OSError:
        pass
