"""The HTTP face's aiohttp application and its listener, on the gRPC server's event loop.

Every route goes through two middlewares: ``_guard`` (errors into the called face's shape,
with the status serving/status.py maps each error kind to; metrics per route) and, with
--auth-token-file, the bearer token (auth.py). Limits: a body over --max-message-mb is 413
(aiohttp's ``client_max_size``), a body slower than --http-idle-timeout-s is 408, a
connection idle that long between requests is closed (``keepalive_timeout``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from ...utils.callers import begin_call
from ...utils.config import ServerConfig
from ...utils.errors import ErrorKind, ItemError
from ...utils.metrics import Metrics
from ..open_inference import InferenceModels
from ..registry import ModelRegistry
from ..security import http_ssl_context, read_token
from ..status import http_status
from . import kserve, openai, scoring, weaviate
from .auth import Handler, bearer_token
from .common import IDLE_TIMEOUT_S, METRICS, HttpError, error_response

log = logging.getLogger(__name__)
_MIB = 1024 * 1024


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    begin_call()
    try:
        response = await handler(request)
    except HttpError as exc:
        response = error_response(request.path, exc.status, exc.message, param=exc.param, code=exc.code)
    except ItemError as exc:
        response = error_response(request.path, http_status(exc.kind), exc.message, code=exc.kind.name.lower())
    except web.HTTPException as exc:  # aiohttp's own: no such route (404), method (405), body too large (413)
        if exc.status < 400:
            raise
        response = error_response(request.path, exc.status, exc.text or exc.reason)
    except asyncio.CancelledError:  # the client went away
        raise
    except Exception as exc:  # a bug costs this request, never the server
        log.exception("HTTP %s %s failed unexpectedly", request.method, request.path)
        response = error_response(
            request.path, 500, f"internal error: {type(exc).__name__}: {exc}", code=ErrorKind.INTERNAL.name.lower()
        )
    metrics = request.app[METRICS]
    metrics.http_requests.labels(route=route, status=str(response.status)).inc()
    metrics.http_seconds.labels(route=route).observe(time.monotonic() - started)
    return response


def build_application(
    registry: ModelRegistry, models: InferenceModels, config: ServerConfig, metrics: Metrics
) -> web.Application:
    middlewares = [_guard]
    if config.auth_token_file:
        middlewares.append(bearer_token(read_token(config.auth_token_file)))
    app = web.Application(middlewares=middlewares, client_max_size=config.max_message_mb * _MIB)
    app[METRICS] = metrics
    app[IDLE_TIMEOUT_S] = config.http_idle_timeout_s
    app.add_routes(openai.routes(registry, metrics))
    app.add_routes(scoring.routes(registry, metrics))
    app.add_routes(kserve.routes(models))
    app.add_routes(weaviate.routes(registry, metrics))
    return app


class HttpFace:
    """The HTTP listener of one ClipServer."""

    def __init__(
        self, registry: ModelRegistry, models: InferenceModels, config: ServerConfig, metrics: Metrics
    ) -> None:
        self._config = config
        self._runner = web.AppRunner(
            build_application(registry, models, config, metrics),
            handle_signals=False,  # the server's run() owns SIGTERM/SIGINT
            access_log=None,  # one line per request is the metrics' job, not the log's
            keepalive_timeout=config.http_idle_timeout_s,
            shutdown_timeout=config.grace_period_s,
        )

    async def start(self, port: int) -> int:
        """Listen on ``port`` (0: any free one); returns the bound port."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._config.host, port, ssl_context=http_ssl_context(self._config))
        try:
            await site.start()
        except BaseException:
            await self._runner.cleanup()
            raise
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening; requests in flight get the grace period to finish."""
        await self._runner.cleanup()
