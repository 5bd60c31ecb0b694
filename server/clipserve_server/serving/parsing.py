"""Request messages parsed off the event loop when they are large.

gRPC calls a handler's deserializer on the event loop: a 16 MB message of tiny items, parsed
into Python objects there, stalled every other caller for seconds. Here handlers take the raw
bytes and parse them inline when small (no thread hop for the common message) and on a thread
when large, so that the loop keeps serving the other callers meanwhile (the parse still holds
the GIL, and gives it back every switch interval).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

# Below this, parsing takes well under a millisecond: not worth a thread hop.
PARSE_OFF_LOOP_BYTES = 256 * 1024

Parse = Callable[[bytes], Any]


async def parsed(data: bytes, parse: Parse) -> Any:
    if len(data) < PARSE_OFF_LOOP_BYTES:
        return parse(data)
    return await asyncio.to_thread(parse, data)


def unary(method: Callable[[Any, Any], Awaitable[Any]], parse: Parse) -> Callable[[bytes, Any], Awaitable[Any]]:
    """``method`` as a handler of raw request bytes."""

    async def handler(data: bytes, context: Any) -> Any:
        return await method(await parsed(data, parse), context)

    return handler


def streaming(
    method: Callable[[AsyncIterator[Any], Any], AsyncIterator[Any]], parse: Parse
) -> Callable[[AsyncIterator[bytes], Any], AsyncIterator[Any]]:
    """``method`` (a stream-stream servicer method) as a handler of raw request messages; a
    message that cannot be taken (``parse`` raised) ends the stream as the reader's error."""

    async def handler(messages: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
        async def requests() -> AsyncIterator[Any]:
            async for data in messages:
                yield await parsed(data, parse)

        async for response in method(requests(), context):
            yield response

    return handler
