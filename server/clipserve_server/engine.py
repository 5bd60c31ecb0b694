"""The pipeline of one model: caches -> fetch -> decode/preprocess -> batched forward -> a
score or an embedding.

Every stage overlaps: downloads run concurrently on the event loop (or in the decode worker
processes), decoding and preprocessing on threads or worker processes sized from the cores
(decode_pool), the forward pass on the batcher's model thread. A slow download only delays its
own item. Each distinct text and image is encoded at most once while it stays in the cache, and
concurrent requests for one share one encode.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from .batcher import Batcher
from .cache import EmbeddingCache
from .config import ServerConfig
from .decode_pool import JobDecoder
from .domain import CacheStats, EmbedItem, ImageSource, ModelDescription, ScoreItem
from .errors import ErrorKind, ItemError
from .fetch import FetchError, FetchSettings
from .metrics import Metrics
from .model import Embedding, EmbeddingModel

log = logging.getLogger(__name__)

# Hashing a large upload takes milliseconds: do it off the event loop.
_HASH_OFF_LOOP_BYTES = 256 * 1024


class ScoringEngine:
    def __init__(
        self,
        model: EmbeddingModel,
        config: ServerConfig,
        *,
        on_dead: Callable[[BaseException], None] | None = None,
        decoder: JobDecoder,
        metrics: Metrics | None = None,
        name: str = "default",
        forward: Callable[[list[str], list[Any]], tuple[np.ndarray, np.ndarray]] | None = None,
        thread_setup: Callable[[], None] | None = None,
    ) -> None:
        """``decoder``: this model's view of the server's decode pool (which the server starts
        and closes). ``forward``: the model's forward as the server runs it (one at a time per
        device; default: ``model.forward``). ``thread_setup``: run first on the model thread."""
        self.model = model
        self._metrics = metrics
        self.config = config
        self.text_cache = EmbeddingCache(config.text_cache_size)
        self.image_cache = EmbeddingCache(config.image_cache_size)
        self._batcher = Batcher(
            forward or model.forward,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_batch_delay_s,
            max_queue_size=config.max_queue_size,
            forward_timeout_s=config.forward_timeout_s,
            on_dead=on_dead,
            on_batch=metrics.batch_observer(name) if metrics else None,
            thread_setup=thread_setup,
        )
        self._fetcher = FetchSettings.of(config).fetcher()
        self._decoder = decoder

    @property
    def description(self) -> ModelDescription:
        return self.model.description

    @property
    def queue_depth(self) -> int:
        return self._batcher.queue_depth

    def cache_stats(self) -> tuple[CacheStats, CacheStats]:
        return self.text_cache.stats(), self.image_cache.stats()

    async def start(self) -> None:
        await self._fetcher.start()
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()
        await self._fetcher.close()

    # -- scoring ---------------------------------------------------------------------------
    async def score(self, item: ScoreItem, *, wait: bool) -> float:
        """Score one pair. ``wait``: queue for room when the server is full (streams) rather
        than fail with OVERLOADED (unary calls)."""
        query = validate_query(item.query)
        validate_image(item.image, self.config.max_image_bytes)
        # Most pairs find their query cached, many their image too: wait only for what is
        # missing, and run the halves side by side (a task each) only when both are.
        text_embedding = self.text_cache.peek(query)
        image_key = _image_key(item.image)
        image_embedding = self.image_cache.peek(image_key) if image_key is not None else None
        if text_embedding is None and image_embedding is None:
            text_task = asyncio.ensure_future(self._text_embedding(query, wait))
            image_task = asyncio.ensure_future(self._image_embedding(item.image, wait))
            try:
                text_embedding, image_embedding = await asyncio.gather(text_task, image_task)
            except BaseException:
                # One half failed (or we were cancelled): the other half is of no use to us.
                text_task.cancel()
                image_task.cancel()
                raise
        elif text_embedding is None:
            text_embedding = await self._text_embedding(query, wait)
        elif image_embedding is None:
            image_embedding = await self._image_embedding(item.image, wait)
        return self.model.score(text_embedding, image_embedding)

    # -- embedding -------------------------------------------------------------------------
    async def embed(self, item: EmbedItem, *, wait: bool) -> np.ndarray:
        """One text's or image's vector: unit length, or the model's own features (``raw``).
        It comes from the same caches and batches as scoring: an Embed of an image already
        scored costs no forward pass, and the other way round."""
        if item.text is not None:
            embedding = await self._text_embedding(validate_query(item.text), wait)
        else:
            assert item.image is not None
            validate_image(item.image, self.config.max_image_bytes)
            embedding = await self._image_embedding(item.image, wait)
        return embedding.raw if item.raw else embedding.unit()

    # -- both ------------------------------------------------------------------------------
    async def _text_embedding(self, query: str, wait: bool) -> Embedding:
        return await self.text_cache.get(query, lambda: self._encode_text(query, wait))

    async def _encode_text(self, query: str, wait: bool) -> Embedding:
        return Embedding.of(await self._batcher.encode_text(query, wait=wait))

    async def _image_embedding(self, source: ImageSource, wait: bool) -> Embedding:
        if source.url is not None:
            return await self.image_cache.get(_image_key(source), lambda: self._encode_image(source, wait))
        if source.data is None:
            # Named by hash alone: join what is cached or being encoded, or ask for the bytes.
            embedding = await self.image_cache.join(_image_key(source))
            if embedding is None:
                raise ItemError(
                    ErrorKind.IMAGE_NEEDED,
                    f"image sha256:{source.sha256} is not on this server (never uploaded here, or evicted): send image_bytes",
                )
            return embedding
        # A claimed hash keys the upload at once, so that references to it that arrive while
        # it is being hashed and encoded join it; the claim is checked before it is used.
        key = _image_key(source) or "sha256:" + await self._content_hash(source.data)
        return await self.image_cache.get(key, lambda: self._encode_image(source, wait, check_sha256=source.sha256))

    async def _encode_image(self, source: ImageSource, wait: bool, check_sha256: str | None = None) -> Embedding:
        if source.data is None:
            pixels = await self._fetched_pixels(source.url or "", source.describe())
        else:
            if check_sha256 is not None and await self._content_hash(source.data) != check_sha256:
                raise ItemError(ErrorKind.INVALID_INPUT, f"{source.describe()}: image_sha256 does not match the uploaded bytes")
            pixels = await self._decoder.decode(source.data, source.describe())
        return Embedding.of(await self._batcher.encode_image(pixels, wait=wait))

    async def _fetched_pixels(self, url: str, name: str) -> Any:
        try:
            if self._decoder.fetches:  # worker processes download: the event loop only hands over the URL
                return await self._decoder.fetch_and_decode(url, name)
            return await self._decoder.decode(await self._fetcher.fetch(url), name)
        except FetchError as exc:
            if self._metrics is not None:
                self._metrics.fetch_failures.labels(reason=exc.kind.name.lower()).inc()
            raise

    async def _content_hash(self, data: bytes) -> str:
        if len(data) < _HASH_OFF_LOOP_BYTES:
            return _sha256(data)
        return await asyncio.get_running_loop().run_in_executor(None, _sha256, data)  # hashlib lets go of the GIL


def _image_key(source: ImageSource) -> str | None:
    """The image cache's key for ``source``: its URL, or the hash it names; None for bytes sent
    without a hash (the key is their hash, still to be computed)."""
    if source.url is not None:
        return "url:" + source.url
    if source.data is None or source.sha256 is not None:
        return "sha256:" + (source.sha256 or "")
    return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def validate_query(query: str) -> str:
    """Any text is a query, control and zero-width characters included: the tokenizer cleans
    it exactly as the reference adapter's does. Only a query with nothing to encode fails."""
    if not query.strip():
        raise ItemError(ErrorKind.INVALID_INPUT, "the query is empty" if not query else "the query is only whitespace")
    return query


_SHA256_HEX = frozenset("0123456789abcdef")


def validate_image(source: ImageSource, max_bytes: int) -> None:
    if source.url is None and source.data is None and source.sha256 is None:
        raise ItemError(ErrorKind.INVALID_INPUT, "the request has no image_url, image_bytes or image_sha256")
    if source.sha256 is not None and (len(source.sha256) != 64 or not _SHA256_HEX.issuperset(source.sha256)):
        raise ItemError(ErrorKind.INVALID_INPUT, f"image_sha256 {source.sha256[:80]!r} is not 64 lowercase hex digits")
    if source.url is not None and not source.url.strip():
        raise ItemError(ErrorKind.INVALID_INPUT, "image_url is empty")
    if source.data is not None and len(source.data) > max_bytes:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{source.describe()}: over the {max_bytes}-byte image limit")
