"""How the SDK reaches a server: address, TLS material and bearer token, for sync and aio."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ._config import DEFAULT_ADDRESS

# Large enough for big uploads; the server enforces its own (configurable) limit.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

PemSource = bytes | str | Path | None


def _pem(source: PemSource) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


Address = str | Sequence[str]


def resolve_address(address: Address | None, config_address: Address | None = None) -> str:
    """The gRPC target: explicit argument, then config file, then ``CLIPSERVE_ADDRESS``, then
    the default. Several ``host:port`` addresses (a list, or comma-separated) become one
    ``ipv4:``/``ipv6:`` target that round_robin spreads calls over."""
    chosen = address or config_address or os.environ.get("CLIPSERVE_ADDRESS") or DEFAULT_ADDRESS
    parts = [chosen] if isinstance(chosen, str) else list(chosen)
    parts = [p.strip() for part in parts for p in part.split(",") if p.strip()]
    if len(parts) == 1:
        return parts[0]
    return _static_target(parts)


def static_target_size(target: str) -> int:
    """How many servers an ``ipv4:``/``ipv6:`` list names; 1 for any other target."""
    if target.startswith(("ipv4:", "ipv6:")):
        return target.count(",") + 1
    return 1


def _static_target(addresses: list[str]) -> str:
    """Resolve each ``host:port`` once, now; for changing membership use ``dns:///name:port``."""
    v4: list[str] = []
    v6: list[str] = []
    for address in addresses:
        if "://" in address or address.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
            raise ValueError(f"{address!r}: a list of addresses takes plain host:port entries")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{address!r} is not host:port")
        for family, *_, sockaddr in socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM):
            if family == socket.AF_INET:
                v4.append(f"{sockaddr[0]}:{port}")
            elif family == socket.AF_INET6:
                v6.append(f"[{sockaddr[0]}]:{port}")
    if v4:
        return "ipv4:" + ",".join(dict.fromkeys(v4))
    return "ipv6:" + ",".join(dict.fromkeys(v6))


def channel_options() -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Spread calls over every address a target resolves to (several replicas behind one
        # DNS name, or an ipv4:a,b list); with a single address this changes nothing.
        ("grpc.lb_policy_name", "round_robin"),
    ]


@dataclass(frozen=True)
class Connection:
    """Where the server is and how to authenticate to it.

    Args:
        address: any gRPC target: ``host:port``, ``dns:///name:port``, ``ipv4:10.0.0.1:50051,10.0.0.2:50051``.
        tls: use TLS (implied by any of the PEM arguments).
        root_certificates: CA bundle that signed the server's certificate (PEM bytes or path);
            None with ``tls=True`` uses the system roots.
        certificate_chain, private_key: the client certificate for mutual TLS.
        auth_token: sent as ``authorization: Bearer <token>``; defaults to ``CLIPSERVE_AUTH_TOKEN``.
    """

    address: str
    tls: bool = False
    root_certificates: PemSource = None
    certificate_chain: PemSource = None
    private_key: PemSource = None
    auth_token: str | None = None

    @property
    def secure(self) -> bool:
        return self.tls or any(x is not None for x in (self.root_certificates, self.certificate_chain, self.private_key))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        token = self.auth_token or os.environ.get("CLIPSERVE_AUTH_TOKEN")
        return (("authorization", f"Bearer {token}"),) if token else None

    def _credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(_pem(self.root_certificates), _pem(self.private_key), _pem(self.certificate_chain))

    def channel(self) -> grpc.Channel:
        if self.secure:
            return grpc.secure_channel(self.address, self._credentials(), options=channel_options())
        return grpc.insecure_channel(self.address, options=channel_options())

    def aio_channel(self) -> grpc.aio.Channel:
        if self.secure:
            return grpc.aio.secure_channel(self.address, self._credentials(), options=channel_options())
        return grpc.aio.insecure_channel(self.address, options=channel_options())
