"""What a streamed call sends and gets back, per kind of call (scoring pairs, embedding).

The run machinery (``_run``) is the same for both: it hands out indices and keeps results;
a job turns an index into a wire request and a wire response into a result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import grpc

from ._errors import ClipServeError
from ._types import EmbeddingResult, SimilarityInput, SimilarityResult
from ._uploads import LocalFile, Send
from .v1 import scorer_pb2

R = TypeVar("R")


def local_path(image_url: str) -> Path | None:
    """The filesystem path that ``image_url`` names, or None for anything the server fetches.

    Plain paths and ``file://`` URLs are local; every other scheme (http, https, and those the
    server refuses, such as ftp) goes to the server as a URL so that it can answer for it.
    """
    try:
        parts = urlsplit(image_url)
    except ValueError:  # a malformed URL (a bad IPv6 bracket...): the server says what is wrong
        return None
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            return None  # file://otherhost/... is for the server to refuse
        return Path(url2pathname(unquote(parts.path)))
    # A one-letter "scheme" is a Windows drive letter (C:\...).
    if parts.scheme and len(parts.scheme) > 1:
        return None
    return Path(image_url)


def check_text(name: str, value: str | None) -> None:
    # A str with lone surrogates cannot be encoded as UTF-8: protobuf would fail while sending,
    # taking the whole stream down with it. Refuse the one item here instead.
    if value:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ClipServeError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{name} is not valid Unicode text: {exc.reason} at position {exc.start}",
            ) from None


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


@dataclass(frozen=True)
class Image:
    """How one request names its image: a URL, or a local file sent by hash or with bytes."""

    url: str | None = None
    file: LocalFile | None = None
    send: Send | None = None

    def fill(self, request: Any) -> None:
        if self.url is not None:
            request.image_url = self.url
            return
        assert self.file is not None
        request.image_sha256 = self.file.sha256
        if self.send is Send.BYTES:
            request.image_bytes = self.file.read()


class Job(Generic[R]):
    """One batch call: its inputs, its RPC, and the translation both ways."""

    rpc: str  # the stub method: "ScoreBatch" or "Embed"
    chunk_rpc: str  # the same, several items per message: "ScoreChunks" or "EmbedChunks"
    chunk: type  # that method's request message

    def __init__(self, model: str) -> None:
        self.model = model

    def __len__(self) -> int:
        raise NotImplementedError

    def image_ref(self, index: int) -> str | None:
        """The image URL or local path of item ``index`` (None for a text)."""
        raise NotImplementedError

    def request(self, index: int, image: Image | None) -> Any:
        raise NotImplementedError

    def result(self, index: int, response: Any) -> R:
        raise NotImplementedError

    def failure(self, index: int, code: str, message: str) -> R:
        raise NotImplementedError


class ScoreJob(Job[SimilarityResult]):
    rpc = "ScoreBatch"
    chunk_rpc = "ScoreChunks"
    chunk = scorer_pb2.ScoreRequestChunk

    def __init__(self, items: Sequence[SimilarityInput], model: str = "") -> None:
        super().__init__(model)
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def image_ref(self, index: int) -> str | None:
        return self.items[index].image_url

    def request(self, index: int, image: Image | None) -> scorer_pb2.ScoreRequest:
        item = self.items[index]
        for name in ("query", "image_url", "query_id", "image_id"):
            check_text(name, getattr(item, name))
        request = scorer_pb2.ScoreRequest(
            request_id=str(index),
            query=item.query,
            query_id=item.query_id or "",
            image_id=item.image_id or "",
            model=self.model,
        )
        if image is not None:
            image.fill(request)
        return request

    def result(self, index: int, response: scorer_pb2.ScoreResponse) -> SimilarityResult:
        if response.HasField("error"):
            return self.failure(index, response.error.code, response.error.message)
        item = self.items[index]
        return SimilarityResult(
            query=item.query,
            image_url=item.image_url,
            score=response.score,
            query_id=item.query_id,
            image_id=item.image_id,
        )

    def failure(self, index: int, code: str, message: str) -> SimilarityResult:
        return failed_score(self.items[index], code, message)


def failed_score(item: SimilarityInput, code: str, message: str) -> SimilarityResult:
    return SimilarityResult(
        query=item.query,
        image_url=item.image_url,
        score=None,
        query_id=item.query_id,
        image_id=item.image_id,
        error=f"{code}: {message}",
        error_code=code,
    )


class EmbedJob(Job[EmbeddingResult]):
    rpc = "Embed"
    chunk_rpc = "EmbedChunks"
    chunk = scorer_pb2.EmbedRequestChunk

    def __init__(self, inputs: Sequence[str], *, images: bool, raw: bool, model: str = "") -> None:
        super().__init__(model)
        self.inputs = inputs
        self.images = images
        self.raw = raw

    def __len__(self) -> int:
        return len(self.inputs)

    def image_ref(self, index: int) -> str | None:
        return self.inputs[index] if self.images else None

    def request(self, index: int, image: Image | None) -> scorer_pb2.EmbedRequest:
        value = self.inputs[index]
        if not isinstance(value, str):
            raise ClipServeError(grpc.StatusCode.INVALID_ARGUMENT, f"expected a str, got {type(value).__name__}")
        check_text("image" if self.images else "text", value)
        request = scorer_pb2.EmbedRequest(request_id=str(index), raw=self.raw, model=self.model)
        if image is not None:
            image.fill(request)
        else:
            request.text = value
        return request

    def result(self, index: int, response: scorer_pb2.EmbedResponse) -> EmbeddingResult:
        if response.HasField("error"):
            return self.failure(index, response.error.code, response.error.message)
        return EmbeddingResult(input=self.inputs[index], embedding=list(response.embedding))

    def failure(self, index: int, code: str, message: str) -> EmbeddingResult:
        return EmbeddingResult(input=self.inputs[index], embedding=None, error=f"{code}: {message}", error_code=code)
