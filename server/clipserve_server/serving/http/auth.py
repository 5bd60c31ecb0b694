"""The bearer token of --auth-token-file over HTTP: ``Authorization: Bearer <token>``, as
gRPC's ``authorization`` metadata; health routes stay open for probes."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from .common import HttpError

# Liveness and readiness of KServe v2 and of Weaviate's module: what orchestrators probe.
OPEN_PREFIXES = ("/v2/health/", "/.well-known/")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer_token(token: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(OPEN_PREFIXES):
            supplied = request.headers.get("Authorization", "").encode()
            # Constant time, so the comparison leaks nothing about how much of a guess was right.
            if not hmac.compare_digest(supplied, expected):
                raise HttpError(
                    401,
                    "missing or invalid bearer token (send the header 'Authorization: Bearer <token>')",
                    code="invalid_api_key",
                )
        return await handler(request)

    return check
