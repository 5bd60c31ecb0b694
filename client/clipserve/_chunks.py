"""Several requests per stream message (ScoreChunks, EmbedChunks).

gRPC costs a few hundred microseconds of Python per message on each side, more than a cached
pair costs the server to score; packing what is ready to go into one message pays that once
per chunk. A chunk never waits to fill: whatever the run has for a lane right now goes.
"""

from __future__ import annotations

from typing import Any

CHUNK_ITEMS = 64
# Uploads make requests large: a chunk stays under this unless one request alone is larger
# (it then goes alone; the server takes messages up to --max-message-mb, 48 MiB by default).
CHUNK_BYTES = 1 << 20


class Packer:
    """Collects one stream's requests into messages: ``chunk`` is the chunk message type
    (e.g. ``ScoreRequestChunk``), or None for one request per message (a server without the
    chunked RPCs)."""

    def __init__(self, chunk: type | None) -> None:
        self._chunk = chunk
        self._items: list[Any] = []
        self._bytes = 0

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, request: Any) -> list[Any]:
        """Take ``request``; return the messages to send now (full chunks)."""
        if self._chunk is None:
            return [request]
        out = []
        size = request.ByteSize()
        if self._items and self._bytes + size > CHUNK_BYTES:
            out.append(self._pack())
        self._items.append(request)
        self._bytes += size
        if len(self._items) >= CHUNK_ITEMS or self._bytes >= CHUNK_BYTES:
            out.append(self._pack())
        return out

    def flush(self) -> list[Any]:
        """The message holding what is left, if anything."""
        return [self._pack()] if self._items else []

    def _pack(self) -> Any:
        assert self._chunk is not None
        message = self._chunk(items=self._items)
        self._items, self._bytes = [], 0
        return message


def answers(response: Any, chunked: bool) -> Any:
    """The item responses one stream message carries."""
    return response.items if chunked else (response,)
