"""Turning SDK inputs into wire requests: local files are read and uploaded as bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import grpc

from ._errors import ClipServeError
from ._types import SimilarityInput
from .v1 import scorer_pb2

# The server's default --max-image-bytes.
DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024


def coerce_input(item: Any) -> SimilarityInput:
    """Accept a SimilarityInput, a ``(query, image_url)`` tuple or a mapping with those keys."""
    if isinstance(item, SimilarityInput):
        return item
    if isinstance(item, tuple) and len(item) == 2:
        return SimilarityInput(query=item[0], image_url=item[1])
    if isinstance(item, dict):
        return SimilarityInput(
            query=item["query"],
            image_url=item["image_url"],
            query_id=item.get("query_id"),
            image_id=item.get("image_id"),
        )
    raise TypeError(f"cannot score {type(item).__name__}: expected SimilarityInput, (query, image_url) or dict")


def local_path(image_url: str) -> Path | None:
    """The filesystem path that ``image_url`` names, or None for anything the server fetches.

    Plain paths and ``file://`` URLs are local; every other scheme (http, https, and those the
    server refuses, such as ftp) goes to the server as a URL so that it can answer for it.
    """
    parts = urlsplit(image_url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            return None  # file://otherhost/... is for the server to refuse
        return Path(url2pathname(unquote(parts.path)))
    # A one-letter "scheme" is a Windows drive letter (C:\...).
    if parts.scheme and len(parts.scheme) > 1:
        return None
    return Path(image_url)


def _check_text(name: str, value: str | None) -> None:
    # A str with lone surrogates cannot be encoded as UTF-8: protobuf would fail while sending,
    # taking the whole stream down with it. Refuse the one item here instead.
    if value:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ClipServeError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} is not valid Unicode text: {exc.reason} at position {exc.start}") from None


def build_request(item: SimilarityInput, request_id: str = "", *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> scorer_pb2.ScoreRequest:
    """The wire request for one pair; raises ClipServeError for an item that cannot be sent
    (an unreadable or oversized local file, text that is not valid Unicode)."""
    for name in ("query", "image_url", "query_id", "image_id"):
        _check_text(name, getattr(item, name))
    request = scorer_pb2.ScoreRequest(
        request_id=request_id,
        query=item.query,
        query_id=item.query_id or "",
        image_id=item.image_id or "",
    )
    path = local_path(item.image_url)
    if path is None:
        request.image_url = item.image_url
        return request
    try:
        size = path.stat().st_size
        if size > max_upload_bytes:
            raise ClipServeError(grpc.StatusCode.INVALID_ARGUMENT, f"local image file {path} is {size} bytes, over the {max_upload_bytes}-byte upload limit")
        request.image_bytes = path.read_bytes()
    except FileNotFoundError:
        raise ClipServeError(grpc.StatusCode.NOT_FOUND, f"local image file not found: {path}") from None
    except OSError as exc:
        raise ClipServeError(grpc.StatusCode.INVALID_ARGUMENT, f"cannot read local image file {path}: {exc}") from None
    return request
