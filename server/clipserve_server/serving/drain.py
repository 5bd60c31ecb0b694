"""Draining: a stopping server waits for its calls in flight itself, still answering new ones.

Once grpc's own ``server.stop(grace)`` has begun, a call that reaches the server is cancelled by
gRPC (CANCELLED, which no client retries: scoring clients would see an error during a rolling
restart), not refused. So ``ClipServer.stop`` first marks the registry closing (the servicers
answer new calls UNAVAILABLE, which the SDK retries on another replica or after the restart),
waits here until no call is in flight or the grace period is over, and only then stops gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc


# Not counted: a health Watch (or a reflection session) may stay open for as long as its client
# likes, and must not hold a stop for the whole grace period.
_UNCOUNTED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class InFlightCalls(grpc.aio.ServerInterceptor):
    """Counts the calls being handled: scoring, embedding, model info, the Open Inference Protocol."""

    def __init__(self) -> None:
        self._count = 0
        self._idle: asyncio.Event | None = None  # made on the server's event loop, at the first call

    async def wait_idle(self, timeout: float) -> bool:
        """True once no call is in flight; False if ``timeout`` seconds pass first."""
        if self._count == 0:
            return True
        assert self._idle is not None
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        if self._idle is None:
            self._idle = asyncio.Event()
        self._count += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._count -= 1
            if self._count == 0:
                self._idle.set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_UNCOUNTED):
            return handler
        wrapped = {}
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                wrapped[kind] = (
                    self._streaming(behaviour) if inspect.isasyncgenfunction(behaviour) else self._awaited(behaviour)
                )
        return handler._replace(**wrapped)

    def _awaited(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def tracked(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with self._tracked():
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result

        return tracked

    def _streaming(self, behaviour: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
        async def tracked(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with self._tracked():
                async for response in behaviour(request, context):
                    yield response

        return tracked
