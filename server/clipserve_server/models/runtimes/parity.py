"""Exactness is checked, not assumed: a converted tower runs the probes beside torch's eager one.

The score is exp(logit_scale) * cos(text, image): a feature vector off by a relative error e
(in L2) moves a cosine by about e. So each vector must stay within ``tolerance`` of torch's in
L2 relative to its own length: 1e-4 in float32 (scores within 1e-4 * exp(logit_scale)), 1e-2 for
half precision, where torch's own kernels already disagree by about that much.
"""

from __future__ import annotations

import numpy as np

from .towers import Runner, Tower

TOLERANCES = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}


def _features(output: object) -> np.ndarray:
    return output.float().cpu().numpy() if hasattr(output, "cpu") else np.asarray(output, dtype=np.float32)  # type: ignore[attr-defined]


def relative_error(tower: Tower, runner: Runner) -> float:
    """The largest L2 distance, relative to torch's vector, over every probe vector."""
    import torch

    worst = 0.0
    with torch.inference_mode():
        for probe in tower.probes:
            expected, got = _features(tower.run(**probe)), _features(runner(**probe))
            if expected.shape != got.shape:
                return float("inf")
            distance = np.linalg.norm(got - expected, axis=-1) / np.maximum(np.linalg.norm(expected, axis=-1), 1e-30)
            worst = max(worst, float(distance.max()))
    return worst if np.isfinite(worst) else float("inf")
