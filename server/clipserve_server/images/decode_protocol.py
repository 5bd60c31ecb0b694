"""What the server and a decode worker process agree on: the pipe's headers, the shared memory's
layout, and the job (``DecodeJob``) each request names.

Both sides import this module (``decode_pool.ProcessDecoder`` and ``decode_worker``), and it
imports neither of them: a worker that unpickles a job imports only this.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..utils.errors import ErrorKind, ItemError
from .decode import decode_image, decode_rgb_tensor, torchvision_decodes_exactly
from .geometry import DEFAULT_LIMITS, ImageLimits

# server -> worker, once: the size of the pickled (jobs, fetch settings), then the pickle.
# Then, per item: slot, job, URL bytes (0: an upload in the slot's image memory), upload bytes,
# name bytes; then the URL and the name.
REQUEST = struct.Struct("<IIIII")
# worker -> server, per item: slot, pickle bytes, out-of-band buffers; then their sizes, then the
# pickle of (ok, value, fetch events). value: the result, or (ErrorKind name, message, whether a
# download failed); fetch events: what the worker's downloads did since its last reply
# (``FetchTally.drain``), for the server's metrics.
REPLY = struct.Struct("<III")
SIZE = struct.Struct("<Q")
# 1 + the slot being decoded (0 while none is: who is to blame for a crash), and the count of
# decodes begun (the server's budget watch tells one decode from the next in the same slot).
STATUS = struct.Struct("<II")
UPLOAD_SLOTS = 2  # slots 0 and 1 carry uploads: one being decoded, the next waiting
RESULT_SLOT_BYTES = 32 << 20  # float32 pixel_values up to 3x1600x1600; larger results go in the pipe
READY = b"R"


def results_size(slots: int) -> int:
    """The results file: one result area per slot, then the status word."""
    return slots * RESULT_SLOT_BYTES + STATUS.size


@dataclass(frozen=True)
class DecodeJob:
    """Bytes -> model input, for one image. Picklable: worker processes get it at start."""

    preprocess: Callable[[Image.Image], Any]
    max_pixels: int
    draft_size: tuple[int, int] | None = None  # --jpeg-draft: the model's input size
    limits: ImageLimits = DEFAULT_LIMITS

    @property
    def _decodes_to_tensor(self) -> bool:
        return hasattr(self.preprocess, "from_chw") and self.draft_size is None

    def warm(self) -> None:
        """What the first image would pay for otherwise: checking torchvision's decoders."""
        if self._decodes_to_tensor:
            torchvision_decodes_exactly()

    def __call__(self, data: bytes, name: str) -> Any:
        if self._decodes_to_tensor:  # the exact pipeline takes a decoded tensor: skip PIL
            chw = decode_rgb_tensor(data, max_pixels=self.max_pixels, name=name, limits=self.limits)
            if chw is not None:
                return self.preprocess.from_chw(chw)  # type: ignore[attr-defined]
        image = decode_image(
            data, max_pixels=self.max_pixels, name=name, draft_size=self.draft_size, limits=self.limits
        )
        try:
            return self.preprocess(image)
        except Exception as exc:
            raise ItemError(ErrorKind.INVALID_INPUT, f"{name}: the model's image processor rejected it: {exc}") from exc
