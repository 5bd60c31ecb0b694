"""Small JPEG thumbnails inside the page (``--embed-thumbnails``), so that it travels alone.

Each image is read (an http(s) URL, a file:// URL or a local path) and decoded by the server's
own decoding code (``clipserve_server.images.decode``: first frame, RGB, the same pixel limit),
so that the thumbnail is the picture the model was given. That code comes with the server
extra (Pillow); without it, ``missing()`` says so before any work.
"""

from __future__ import annotations

import base64
import io
import urllib.parse
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

THUMBNAIL_PX = 160  # the longest side: the widest a card shows it, in CSS px
JPEG_QUALITY = 75
FETCH_TIMEOUT_S = 30.0
FETCHERS = 8  # images fetched at a time: the work is mostly waiting on hosts


def missing() -> str | None:
    """Why thumbnails cannot be made here; None when they can."""
    try:
        import clipserve_server.images.decode  # noqa: F401
    except ImportError as exc:
        return (
            "--embed-thumbnails decodes images with the server's code, "
            f"which is not installed ({exc}): pip install 'clipserve[server]'"
        )
    return None


def read_source(src: str, max_bytes: int) -> bytes:
    """The bytes of an http(s) or file:// URL (what ``data.page_src`` makes)."""
    if src.startswith("file://"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(src).path))
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    elif src.startswith(("http://", "https://")):
        with urllib.request.urlopen(src, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 - the user's own image URLs
            data = response.read(max_bytes + 1)
    else:
        raise ValueError(f"{src}: not an http(s) or file:// URL")
    if len(data) > max_bytes:
        raise ValueError(f"{src}: over {max_bytes} bytes")
    return data


def thumbnail(data: bytes, name: str, max_pixels: int) -> str:
    """A data: URI of a JPEG at most THUMBNAIL_PX on its longest side."""
    from clipserve_server.images.decode import decode_image

    image = decode_image(data, max_pixels=max_pixels, name=name, draft_size=(THUMBNAIL_PX, THUMBNAIL_PX))
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


@dataclass
class Thumbnails:
    by_src: dict[str, str] = field(default_factory=dict)  # src -> data: URI
    failures: dict[str, str] = field(default_factory=dict)  # src -> why not

    def summary(self) -> str:
        line = f"{len(self.by_src)} thumbnails embedded"
        if self.failures:
            src, why = next(iter(self.failures.items()))
            line += f", {len(self.failures)} could not be made (the page links those; e.g. {src}: {why})"
        return line


def make_thumbnails(sources: Iterable[str]) -> Thumbnails:
    """One thumbnail per distinct source, fetched FETCHERS at a time."""
    from clipserve_server.utils.config import ServerConfig

    limits = ServerConfig()  # the server's default limits on what it fetches and decodes
    todo = sorted({src for src in sources if not src.startswith("data:")})

    def one(src: str) -> tuple[str, Any]:
        try:
            return src, thumbnail(read_source(src, limits.max_image_bytes), src, limits.max_image_pixels)
        except Exception as exc:  # any image that cannot be had: the page falls back to its URL
            return src, exc

    result = Thumbnails()
    with ThreadPoolExecutor(FETCHERS) as pool:
        for src, made in pool.map(one, todo):
            if isinstance(made, str):
                result.by_src[src] = made
            else:
                result.failures[src] = str(made) or type(made).__name__
    return result
