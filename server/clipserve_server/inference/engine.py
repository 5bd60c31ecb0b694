"""The pipeline of one model: caches -> fetch -> decode/preprocess -> batched forward -> a
score or an embedding.

Every stage overlaps: downloads run concurrently on the event loop (or in the decode worker
processes), decoding and preprocessing on threads or worker processes sized from the cores
(decode_pool), forward passes on the model's instances (instances.py, a thread each) that the
batcher feeds. A slow download only delays its own item. Each distinct text and image is
encoded at most once while it stays in the cache, and concurrent requests for one share one
encode.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ..images.decode_pool import JobDecoder
from ..images.fetch import FetchError, ImageFetcher
from ..images.geometry import DEFAULT_LIMITS, ImageLimits, check_size
from ..models.model import Embedding, EmbeddingModel
from ..utils.config import ServerConfig
from ..utils.domain import CacheStats, EmbedItem, ImageSource, ModelDescription, ScoreItem
from ..utils.errors import ErrorKind, ItemError
from ..utils.metrics import Metrics
from .batcher import Batcher
from .cache import EmbeddingCache
from .instances import InstancePool, InstanceStats
from .promises import Soon, awaited, both, from_future, then
from .queries import cut_query, query_char_limit
from .uploads import UploadChecks

log = logging.getLogger(__name__)

# Hashing a large upload takes milliseconds: do it off the event loop.
_HASH_OFF_LOOP_BYTES = 256 * 1024
# Cutting a query of megabytes takes milliseconds (0.3 s for 40 MB of whitespace): off the loop too.
_CUT_OFF_LOOP_CHARS = 1 << 20


class ScoringEngine:
    def __init__(
        self,
        model: EmbeddingModel,
        config: ServerConfig,
        *,
        name: str,
        instances: InstancePool,
        decoder: JobDecoder,
        fetcher: ImageFetcher,
        metrics: Metrics,
        on_dead: Callable[[BaseException], None],
        on_alive: Callable[[], None],
    ) -> None:
        """``name``: the model's, in requests and metrics; ``instances``: its forward workers,
        one or more per device; ``decoder``: its view of the server's decode pool; ``fetcher``:
        the server's, shared by its models so that its per-host cap holds for them all (the
        server starts and closes both); ``on_dead``, ``on_alive``: told when the engine can score
        no more (a dead or wedged instance), and when it serves again (a wedged forward finished)."""
        self.model = model
        self._metrics = metrics
        self.config = config
        self.text_cache = EmbeddingCache(config.text_cache_size, max_bytes=config.text_cache_mb << 20)
        self.image_cache = EmbeddingCache(config.image_cache_size)
        self._uploads = UploadChecks()
        self._batcher = Batcher(
            instances,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_batch_delay_s,
            max_queue_size=config.resolved_max_queue_size,
            forward_timeout_s=config.forward_timeout_s,
            on_dead=on_dead,
            on_alive=on_alive,
            on_batch=metrics.batch_observer(name),
        )
        self._fetcher = fetcher
        self._decoder = decoder
        self._max_query_chars = query_char_limit(config.max_query_chars, model.description.max_text_tokens)
        self._image_limits = ImageLimits.of(config)

    @property
    def description(self) -> ModelDescription:
        return self.model.description

    @property
    def alive(self) -> bool:
        """False once the batching loop or an instance has died (health says NOT_SERVING then)."""
        return self._batcher.alive

    @property
    def queue_depth(self) -> int:
        return self._batcher.queue_depth

    @property
    def device(self) -> str:
        """The devices this model runs on, as ``--device`` lists them ("cuda:0,cuda:1")."""
        return ",".join(self._batcher.instances.devices) or self.model.description.device

    def instance_stats(self) -> list[InstanceStats]:
        return self._batcher.instances.stats()

    def cache_stats(self) -> tuple[CacheStats, CacheStats]:
        return self.text_cache.stats(), self.image_cache.stats()

    async def start(self) -> None:
        self._batcher.start()

    async def stop(self) -> None:
        await self._batcher.stop()

    # -- scoring ---------------------------------------------------------------------------
    def score(self, item: ScoreItem, *, wait: bool) -> Soon[float]:
        """Score one pair: at once when both halves are cached (most pairs of a benchmark file
        find their query cached, many their image too), else a ``Later`` of it that waits
        only for what is missing. ``wait``: queue for room when the server is full (streams) rather
        than fail with OVERLOADED (unary calls). Bad input raises ItemError here."""
        if len(item.query) > _CUT_OFF_LOOP_CHARS:
            return from_future(asyncio.ensure_future(self._score_long_query(item, wait)))
        return self._score(cut_query(item.query, self._max_query_chars), item.image, wait)

    def _score(self, query: str, image: ImageSource, wait: bool) -> Soon[float]:
        """``score`` of a query already cut (queries.py)."""
        validate_query(query)
        validate_image(image, self.config.max_image_bytes, self.config.max_image_pixels, self._image_limits)
        image_embedding = self._image_embedding(image, wait)  # first: it may refuse at once (IMAGE_BYTES_NEEDED)
        return both(self._text_embedding(query, wait), image_embedding, self.model.score)

    async def _score_long_query(self, item: ScoreItem, wait: bool) -> float:
        query = await asyncio.to_thread(cut_query, item.query, self._max_query_chars)
        return await awaited(self._score(query, item.image, wait))

    # -- embedding -------------------------------------------------------------------------
    def embed(self, item: EmbedItem, *, wait: bool) -> Soon[np.ndarray]:
        """One text's or image's vector: unit length, or the model's own features (``raw``).
        It comes from the same caches and batches as scoring: an Embed of an image already
        scored costs no forward pass, and the other way round."""
        if item.text is not None and len(item.text) > _CUT_OFF_LOOP_CHARS:
            return from_future(asyncio.ensure_future(self._embed_long_text(item.text, item.raw, wait)))
        if item.text is not None:
            embedding = self._text_embedding(validate_query(cut_query(item.text, self._max_query_chars)), wait)
        else:
            assert item.image is not None
            validate_image(item.image, self.config.max_image_bytes, self.config.max_image_pixels, self._image_limits)
            embedding = self._image_embedding(item.image, wait)
        return then(embedding, _raw if item.raw else Embedding.unit)

    async def _embed_long_text(self, text: str, raw: bool, wait: bool) -> np.ndarray:
        cut = validate_query(await asyncio.to_thread(cut_query, text, self._max_query_chars))
        return await awaited(then(self._text_embedding(cut, wait), _raw if raw else Embedding.unit))

    # -- both ------------------------------------------------------------------------------
    def _text_embedding(self, query: str, wait: bool) -> Soon[Embedding]:
        return self.text_cache.lookup(query, lambda: self._encode_text(query, wait))

    async def _encode_text(self, query: str, wait: bool) -> Embedding:
        return Embedding.of(await self._batcher.encode_text(query, wait=wait))

    def _image_embedding(self, source: ImageSource, wait: bool) -> Soon[Embedding]:
        if source.pixels is not None:
            return from_future(asyncio.ensure_future(self._pixels_embedding(source.pixels, wait)))
        key = _image_key(source)
        if source.url is not None:
            return self.image_cache.lookup(key, lambda: self._encode_image(source, wait))
        if source.data is None:
            # Named by hash alone: join what is cached or being encoded, or ask for the bytes.
            found = self.image_cache.find(key)
            if found is not None:
                return found
            if self._uploads.pending(key):  # an upload of it is being checked: see what it proves
                return from_future(asyncio.ensure_future(self._after_uploads(key, source)))
            raise _bytes_needed(source)
        # Bytes join or become the entry of the hash they have, never of the one they claim:
        # a false claim fails this upload alone (uploads.py).
        if len(source.data) < _HASH_OFF_LOOP_BYTES:
            key = "sha256:" + _sha256(source.data)
            _check_claim(source, key)
            return self.image_cache.lookup(key, lambda: self._encode_image(source, wait))
        return from_future(asyncio.ensure_future(self._large_upload(source, wait)))

    async def _large_upload(self, source: ImageSource, wait: bool) -> Embedding:
        assert source.data is not None
        with self._uploads.checking(_image_key(source)):  # hash references to the claim wait for it
            key = "sha256:" + await self._content_hash(source.data)
            _check_claim(source, key)
            entry = self.image_cache.lookup(key, lambda: self._encode_image(source, wait))
        return await awaited(entry)

    async def _after_uploads(self, key: str, source: ImageSource) -> Embedding:
        """A hash reference that came while uploads claiming that hash were being checked."""
        while True:
            await self._uploads.one_ends(key)
            found = self.image_cache.find(key)
            if found is not None:
                return await awaited(found)
            if not self._uploads.pending(key):  # no upload proved it
                raise _bytes_needed(source)

    async def _pixels_embedding(self, pixels: np.ndarray, wait: bool) -> Embedding:
        """Decoded pixels are cached by their content (shape and values), like uploads."""
        values = memoryview(np.ascontiguousarray(pixels)).cast("B")  # hashed where they lie: no copy
        key = f"pixels:{'x'.join(map(str, pixels.shape))}:" + await self._content_hash(values)
        return await awaited(self.image_cache.lookup(key, lambda: self._encode_pixels(pixels, wait)))

    async def _encode_pixels(self, pixels: np.ndarray, wait: bool) -> Embedding:
        # Resizing a float array costs about what decoding a photo does: off the event loop.
        preprocessed = await asyncio.get_running_loop().run_in_executor(None, self.model.preprocess_array, pixels)
        return Embedding.of(await self._batcher.encode_image(preprocessed, wait=wait))

    async def _encode_image(self, source: ImageSource, wait: bool) -> Embedding:
        if source.data is None:
            pixels = await self._fetched_pixels(source.url or "", source.describe())
        else:
            pixels = await self._decoder.decode(source.data, source.describe())
        return Embedding.of(await self._batcher.encode_image(pixels, wait=wait))

    async def _fetched_pixels(self, url: str, name: str) -> Any:
        try:
            if self._decoder.fetches:  # worker processes download: the event loop only hands over the URL
                return await self._decoder.fetch_and_decode(url, name)
            return await self._decoder.decode(await self._fetcher.fetch(url), name)
        except FetchError as exc:
            self._metrics.fetch_failures.labels(reason=exc.kind.name.lower()).inc()
            raise

    async def _content_hash(self, data: bytes | memoryview) -> str:
        if len(data) < _HASH_OFF_LOOP_BYTES:
            return _sha256(data)
        return await asyncio.get_running_loop().run_in_executor(None, _sha256, data)  # hashlib lets go of the GIL


def _raw(embedding: Embedding) -> np.ndarray:
    return embedding.raw


def _image_key(source: ImageSource) -> str | None:
    """The image cache's key for ``source``: its URL, or the hash it names; None for bytes sent
    without a hash (the key is their hash, still to be computed)."""
    if source.url is not None:
        return "url:" + source.url
    if source.data is None or source.sha256 is not None:
        return "sha256:" + (source.sha256 or "")
    return None


def _check_claim(source: ImageSource, key: str) -> None:
    """Refuses an upload whose bytes do not have the hash it claims (naming that upload only)."""
    if source.sha256 is not None and key != "sha256:" + source.sha256:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{source.describe()}: image_sha256 does not match the uploaded bytes")


def _bytes_needed(source: ImageSource) -> ItemError:
    return ItemError(
        ErrorKind.IMAGE_NEEDED,
        f"image sha256:{source.sha256} is not on this server (never uploaded here, or evicted): send image_bytes",
    )


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def validate_query(query: str) -> str:
    """Any text is a query, control and zero-width characters included: the tokenizer cleans
    it exactly as the reference adapter's does. Only a query with nothing to encode fails."""
    if not query.strip():
        raise ItemError(ErrorKind.INVALID_INPUT, "the query is empty" if not query else "the query is only whitespace")
    return query


_SHA256_HEX = frozenset("0123456789abcdef")


def validate_image(
    source: ImageSource, max_bytes: int, max_pixels: int = 0, limits: ImageLimits = DEFAULT_LIMITS
) -> None:
    if source.pixels is not None:
        # Before the processor resizes them: the short side is scaled up to the model's input.
        height, width = source.pixels.shape[:2]
        if max_pixels:
            check_size(width, height, max_pixels=max_pixels, limits=limits, name=source.describe())
        return
    if source.url is None and source.data is None and source.sha256 is None:
        raise ItemError(ErrorKind.INVALID_INPUT, "the request has no image_url, image_bytes or image_sha256")
    if source.sha256 is not None and (len(source.sha256) != 64 or not _SHA256_HEX.issuperset(source.sha256)):
        raise ItemError(ErrorKind.INVALID_INPUT, f"image_sha256 {source.sha256[:80]!r} is not 64 lowercase hex digits")
    if source.url is not None and not source.url.strip():
        raise ItemError(ErrorKind.INVALID_INPUT, "image_url is empty")
    if source.data is not None and len(source.data) > max_bytes:
        raise ItemError(ErrorKind.INVALID_INPUT, f"{source.describe()}: over the {max_bytes}-byte image limit")
