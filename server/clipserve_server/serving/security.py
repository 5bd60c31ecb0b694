"""Who may call: an optional bearer token, and TLS / mutual TLS on the listening port."""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from ..utils.config import ServerConfig

# Health stays open so that load balancers and orchestrators can probe without a secret.
_OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
_DENIED = "missing or invalid bearer token (send the metadata 'authorization: Bearer <token>')"


def read_token(path: str | Path) -> str:
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"the auth token file {path} is empty")
    return token


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_METHOD_PREFIXES):
            return handler
        supplied = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                supplied = value
        # Constant time, so the comparison leaks nothing about how much of a guess was right.
        if hmac.compare_digest(supplied.encode(), self._expected):
            return handler
        return _denying(handler)


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def deny(_request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny, **kwargs)


def interceptors(config: ServerConfig) -> list[grpc.aio.ServerInterceptor]:
    return [BearerTokenInterceptor(read_token(config.auth_token_file))] if config.auth_token_file else []


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS when --tls-cert/--tls-key are given; mutual TLS when --tls-client-ca is too."""
    if not (config.tls_cert or config.tls_key or config.tls_client_ca):
        return None
    if not (config.tls_cert and config.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    key = Path(config.tls_key).read_bytes()
    chain = Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def http_ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The same TLS (and client-certificate requirement) for the HTTP face as for gRPC."""
    if server_credentials(config) is None:  # also refuses a half-given pair, as for gRPC
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
