"""A model's towers as a runtime sees them: a torch callable, its inputs, and probes to check.

A family (clip_model, openclip_model, text_tower) exposes each of its towers as a ``Tower``;
a runtime turns it into a ``Runner`` (same keyword tensors in, features out) that the family
then calls instead of the eager one. Tokenising, preprocessing, batching and scoring stay where
they are: only the forward changes hands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Keyword torch tensors (pixel_values, input_ids, attention_mask, ...) -> features tensor.
Runner = Callable[..., Any]

IMAGE, TEXT = "image", "text"


@dataclass(frozen=True)
class Tower:
    name: str  # IMAGE or TEXT
    run: Runner  # the eager torch forward
    module: Any  # the torch module whose weights ``run`` uses: what the conversion cache fingerprints
    probes: tuple[dict[str, Any], ...]  # inputs as the family builds them: the first is traced, all are checked
    dtype: str  # the weights' dtype (float32, float16, bfloat16)
    device: str  # cpu, cuda, cuda:N

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.probes[0])


def traceable(tower: Tower) -> Any:
    """``tower.run`` as a torch module taking its inputs by position (in ``input_names`` order),
    with the model's weights as its own: what torch.jit.trace and the converters need."""
    import torch

    names = tower.input_names

    class Traceable(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = tower.module

        def forward(self, *inputs: Any) -> Any:
            return tower.run(**dict(zip(names, inputs)))

    return Traceable().eval()


# Probe inputs: the first batch is what a conversion traces; the others differ from it in every
# dimension a batch can (batch size, text length, image size and aspect), so that a conversion
# that froze a shape or a branch fails the parity check instead of serving.
PROBE_TEXTS = (
    ("a photo of a dog", "probe"),
    ("a",),
    ("a much longer text, to probe the text tower with 12 words or so", "x y", "ünïcode 🚗"),
)
PROBE_IMAGE_SIZES = (((64, 48), (50, 90)), ((40, 40),), ((300, 200), (17, 17), (128, 64)))


def _probe_image(width: int, height: int, seed: int) -> Any:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def family_towers(
    module: Any,
    *,
    dtype: str,
    device: str,
    image: tuple[Runner, Callable[[list[Any]], dict[str, Any]]] | None = None,
    text: tuple[Runner, Callable[[list[str]], dict[str, Any]]] | None = None,
) -> dict[str, Tower]:
    """A family's towers from its eager forwards and the functions that build their inputs
    (decoded images -> keyword tensors; texts -> keyword tensors), with the probes built here."""
    towers = {}
    if image is not None:
        run, inputs = image
        batches = [[_probe_image(w, h, seed) for seed, (w, h) in enumerate(sizes)] for sizes in PROBE_IMAGE_SIZES]
        towers[IMAGE] = Tower(IMAGE, run, module, tuple(inputs(batch) for batch in batches), dtype, device)
    if text is not None:
        run, inputs = text
        towers[TEXT] = Tower(TEXT, run, module, tuple(inputs(list(batch)) for batch in PROBE_TEXTS), dtype, device)
    return towers
